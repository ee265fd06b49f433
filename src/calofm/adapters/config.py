"""What one adapter holds, in a frozen dataclass saved in its manifest, and the stage defaults."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

from calofm.configs import FromDict
from calofm.detector import material_long
from calofm.errors import CalofmError
from calofm.model.config import class_name as join_class
from calofm.model.config import parse_class
from calofm.particles import pdg_code

KINDS = ("expert", "particle", "particle+expert")


@dataclass(frozen=True)
class AdapterConfig(FromDict):
    """One adapter: a particle part, an expert part, or both (a new particle's first material).

    Particle part (``particle``): LoRA of rank ``rank`` on q, k, v and the output projection of
    every block, scaled by ``alpha / sqrt(rank)`` (rank-stabilised LoRA, as the reference: one
    ``alpha`` serves every rank); particle-specific spatial and energy heads, copies of the base
    heads to start with; and, when ``embed_bottleneck > 0``, bottlenecks of that width on the token
    and incident-energy embeddings. LoRA and bottlenecks start at zero, so a new particle adapter
    starts as the base model. Its modules act only on rows whose class has this particle.

    Expert part (``class_name``): one FFN expert per block for a new class, a copy of class
    ``init_from``'s expert or freshly initialised. With ``condition`` it also holds two per-class
    tables, zero to start: a shift of the layer embedding and a bias of the spatial logits per
    layer, which let the new class move its longitudinal profile directly (the reference needed a
    post-hoc shift of the most energetic hits for that).
    """

    config_name: ClassVar[str] = "adapter"

    particle: str | None = None
    rank: int = 16
    alpha: float = 16.0
    embed_bottleneck: int = 0
    class_name: str | None = None
    init_from: str | None = None
    condition: bool = False

    def __post_init__(self) -> None:
        if self.particle is None and self.class_name is None:
            raise CalofmError("adapter: needs a particle, a class or both")
        if self.particle is not None:
            pdg_code(self.particle)
            if self.rank < 1 or not self.alpha > 0 or self.embed_bottleneck < 0:
                raise CalofmError(
                    f"adapter: need rank >= 1, alpha > 0 and embed_bottleneck >= 0 (got "
                    f"{self.rank}, {self.alpha}, {self.embed_bottleneck})"
                )
        if self.class_name is None:
            if self.init_from is not None or self.condition:
                raise CalofmError("adapter: init_from and condition belong to an expert part")
            return
        _, particle = parse_class(self.class_name)
        if self.particle is not None and particle != self.particle:
            raise CalofmError(
                f"adapter: class {self.class_name} is not of the adapter's particle {self.particle}"
            )
        if self.init_from is not None:
            parse_class(self.init_from)

    @property
    def kind(self) -> str:
        if self.particle is None:
            return "expert"
        return "particle" if self.class_name is None else "particle+expert"

    @property
    def name(self) -> str:
        """The class for an adapter with an expert, else the particle: unique per model."""
        return self.class_name or self.particle

    @property
    def class_particle(self) -> str:
        """The particle whose rows this adapter acts on."""
        return self.particle or parse_class(self.class_name)[1]

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank)

    def to_dict(self) -> dict:
        """The fields of the parts this adapter has (the others keep their defaults)."""
        d = asdict(self)
        if self.particle is None:
            for key in ("rank", "alpha", "embed_bottleneck"):
                del d[key]
        if self.class_name is None:
            for key in ("init_from", "condition"):
                del d[key]
        return d


@dataclass(frozen=True)
class StageDefaults:
    """Optimiser settings of the adaptation stages unless a flag says otherwise."""

    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20
    val_fraction: float = 0.05


STAGE_DEFAULTS = StageDefaults()


def init_class(classes: list[str], text: str | None, particle: str) -> str | None:
    """The class whose expert a new one copies: ``text`` is a material (same particle), a class
    name, or None (random). It must be one of ``classes``."""
    if text is None:
        return None
    if ":" in text:
        material, other = parse_class(text)
        name = join_class(material, other)
    else:
        name = join_class(text, particle)
    if name not in classes:
        raise CalofmError(
            f"--init-from {text}: the model has no class {name} ({', '.join(classes)})"
        )
    return name


def same_material_class(classes: list[str], material: str) -> str | None:
    """The first of ``classes`` with this material (the natural start for a new particle)."""
    material = material_long(material)
    return next((c for c in classes if parse_class(c)[0] == material), None)
