"""An adapted model: a frozen base CaloFM and the adapters added to it (peft's PeftModel, for CaloFM).

``AdaptedModel(base)`` freezes the base and notes its weights (names and content hash); adapters
are then added, loaded, switched on and off, listed, saved, removed and merged here, never on the
base directly. It behaves as the model it wraps (attributes and methods not its own are the
base's), so training, generation and evaluation take either. The rules that keep every base class
(and every other adapter) untouched:

- a particle adapter is refused for a particle the base model already has (its LoRA and heads would
  act on base rows) or that another adapter already adapts;
- an expert adapter's class must be new and of a particle the base model or a particle adapter
  knows;
- every module of an adapter acts only on its own rows (its particle's or its class's);
- ``check_base`` recomputes the base hash; the stages call it after training.

An adapter's modules act from inside the base's forward pass: they are routed wrappers put in place
of the attention projections and the heads, and the embedding adapters at the base's embedding seam
(``rows.Sites``); ``unload`` puts the base modules back and returns the base as it was.

An adapter's ``stacked_on`` lists the adapters that act on its rows and were present when it was
trained (the particle adapter under a new material's expert); they must be loaded with it and
cannot be removed before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from calofm.adapters.config import AdapterConfig
from calofm.adapters.embeddings import EmbeddingAdapters, add_bottlenecks, remove_embedding_adapters
from calofm.adapters.expert import add_conditioning, add_expert, remove_conditioning, remove_expert
from calofm.adapters.heads import (
    RoutedHead,
    RoutedVoxelHead,
    add_particle_heads,
    remove_particle_heads,
)
from calofm.adapters.lora import LoRALinear, add_lora, remove_lora
from calofm.adapters.merge import merged_model
from calofm.adapters.rows import Sites
from calofm.errors import CalofmError
from calofm.model.config import parse_class
from calofm.model.transformer import CaloFM
from calofm.tensorfiles import weights_hash

ROUTED = (LoRALinear, RoutedHead, RoutedVoxelHead, EmbeddingAdapters)


@dataclass
class Adapter:
    """One adapter's config and modules (part -> {tensor-name prefix -> module}) and provenance."""

    config: AdapterConfig
    parts: dict[str, dict[str, nn.Module]]
    stacked_on: list[str]  # names of the adapters it was trained on top of
    enabled: bool = True
    sha256: str | None = None  # content hash of its tensors, once saved or loaded
    source: str | None = None  # the directory it was loaded from or saved to
    manifest: dict | None = None

    def modules(self) -> Iterator[nn.Module]:
        for part in self.parts.values():
            yield from part.values()

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules() for p in m.parameters()]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors under names that do not depend on the model's other contents."""
        return {
            f"{prefix}.{name}": t
            for part in self.parts.values()
            for prefix, module in part.items()
            for name, t in module.state_dict().items()
        }

    def counts(self) -> dict[str, int]:
        """Parameters per part and in total."""
        out = {
            part: sum(p.numel() for m in modules.values() for p in m.parameters())
            for part, modules in self.parts.items()
        }
        out["total"] = sum(out.values())
        return out

    def keys(self) -> list[str]:
        """The row groups its switchable modules act on: its particle, its class (conditioning)."""
        c = self.config
        return [k for k in (c.particle, c.class_name if c.condition else None) if k is not None]


class AdaptedModel(nn.Module):
    """A frozen base model and its adapters, in the order they were added."""

    def __init__(self, base: CaloFM):
        super().__init__()
        if not isinstance(base, CaloFM) or any(isinstance(m, ROUTED) for m in base.modules()):
            raise CalofmError("AdaptedModel wraps a base model without adapters")
        self._trainable = [p.requires_grad for p in base.parameters()]
        base.requires_grad_(False)
        state = base.state_dict()
        self.base = base
        self.base_hash = weights_hash(state)
        self.base_keys = frozenset(state)
        self.base_classes = tuple(base.classes)
        self.adapters: dict[str, Adapter] = {}
        self.sites = Sites()

    def __getattr__(self, name: str):
        """Anything not the adapted model's own is the base model's (config, classes, methods)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """The base model's forward pass, the adapters acting from inside it."""
        return self.base(*args, **kwargs)

    # ---- the base -------------------------------------------------------------------------------

    @property
    def base_particles(self) -> set[str]:
        return {parse_class(c)[1] for c in self.base_classes}

    def base_weights_hash(self) -> str:
        """The content hash of the base weights alone, as they are now."""
        state = self.base.state_dict()
        return weights_hash({k: state[k] for k in self.base_keys})

    def check_base(self) -> None:
        """Raise if the base weights differ from those noted when the model was wrapped."""
        if self.base_weights_hash() != self.base_hash:
            raise CalofmError(
                "the base model's weights have changed; adapters must leave them alone"
            )

    def unload(self) -> CaloFM:
        """Remove every adapter and return the base as it was wrapped (modules, trainability)."""
        for name in reversed(list(self.adapters)):
            self.remove_adapter(name)
        self.sites.restore()
        for p, trainable in zip(self.base.parameters(), self._trainable, strict=True):
            p.requires_grad_(trainable)
        return self.base

    # ---- adding and removing --------------------------------------------------------------------

    def particle_adapter(self, particle: str) -> Adapter | None:
        return next((a for a in self.adapters.values() if a.config.particle == particle), None)

    def add_adapter(
        self,
        config: AdapterConfig,
        *,
        generator: torch.Generator | None = None,
        initialise: bool = True,
    ) -> Adapter:
        """Add a new adapter's modules (trainable, the rest untouched) and return it.

        ``initialise=False`` skips the expert's initial copy or random draw (for loading, where the
        saved tensors replace them anyway).
        """
        model, name, particle = self.base, config.name, config.class_particle
        if name in self.adapters:
            raise CalofmError(f"an adapter named {name} is already attached")
        under = self.particle_adapter(particle)
        if config.particle is not None:
            if particle in self.base_particles:
                raise CalofmError(
                    f"particle {particle} is one of the base model's; a particle adapter would "
                    "change its classes (add a new material with an expert adapter instead)"
                )
            if under is not None:
                raise CalofmError(f"particle {particle} already has an adapter attached")
        elif particle not in self.base_particles and under is None:
            raise CalofmError(
                f"class {config.class_name}: particle {particle} is unknown to the base model; "
                "load its particle adapter first (--adapter) or train one (calofm adapt-particle)"
            )
        if config.class_name is not None and config.class_name in model.classes:
            raise CalofmError(f"model already has class {config.class_name}")
        if config.init_from is not None and initialise:
            model.class_index(config.init_from)

        stacked_on = [under.config.name] if config.particle is None and under is not None else []
        parts: dict[str, dict[str, nn.Module]] = {}
        try:
            if config.particle is not None:
                parts["lora"] = add_lora(
                    model, self.sites, particle, config.rank, config.alpha, generator
                )
                parts["heads"] = add_particle_heads(model, self.sites, particle)
                if config.embed_bottleneck:
                    b = add_bottlenecks(
                        model, self.sites, particle, config.embed_bottleneck, generator
                    )
                    parts["bottleneck"] = {"embed.bottleneck": b}
            if config.class_name is not None:
                init = config.init_from if initialise else model.classes[0]
                parts["expert"] = add_expert(model, config.class_name, init)
                if config.condition:
                    parts["condition"] = add_conditioning(model, self.sites, config.class_name)
        except Exception:
            self._remove_modules(config)
            raise
        adapter = Adapter(config, parts, stacked_on)
        for p in adapter.parameters():
            p.requires_grad_(True)
        self.adapters[name] = adapter
        return adapter

    def _remove_modules(self, config: AdapterConfig) -> None:
        """Remove whatever modules ``config``'s adapter has (add_adapter checked none pre-existed)."""
        model = self.base
        if config.particle is not None:
            remove_lora(model, config.particle)
            remove_particle_heads(model, config.particle)
            remove_embedding_adapters(model, config.particle, None)
        if config.class_name is not None:
            remove_conditioning(model, config.class_name)
            if config.class_name in model.classes:
                remove_expert(model, config.class_name)

    def remove_adapter(self, name: str) -> None:
        """Remove an adapter and its modules (and its class, for an adapter with an expert)."""
        adapter = self.adapter(name)
        users = [a.config.name for a in self.adapters.values() if name in a.stacked_on]
        if users:
            raise CalofmError(f"adapter {name} is under {', '.join(users)}; remove those first")
        self._remove_modules(adapter.config)
        self.sites.off.difference_update(adapter.keys())
        del self.adapters[name]

    # ---- switching and inspecting ---------------------------------------------------------------

    def adapter(self, name: str) -> Adapter:
        if name not in self.adapters:
            attached = ", ".join(self.adapters) or "none"
            raise CalofmError(f"no adapter named {name} is attached (attached: {attached})")
        return self.adapters[name]

    def set_enabled(self, enabled: bool, names: list[str] | None = None) -> None:
        """Switch adapters on or off (all when ``names`` is None).

        A switched-off adapter's LoRA, heads, bottlenecks and conditioning stop acting. Its expert,
        if any, stays: it is its class's only expert and acts on no other class's rows.
        """
        for name in self.adapters if names is None else names:
            adapter = self.adapter(name)
            adapter.enabled = enabled
            update = self.sites.off.difference_update if enabled else self.sites.off.update
            update(adapter.keys())

    def enable(self, names: list[str] | None = None) -> None:
        self.set_enabled(True, names)

    def disable(self, names: list[str] | None = None) -> None:
        self.set_enabled(False, names)

    @contextmanager
    def disabled(self, names: list[str] | None = None) -> Iterator[AdaptedModel]:
        """Adapters switched off inside the block; their previous states restored afterwards."""
        chosen = [self.adapter(n) for n in (self.adapters if names is None else names)]
        states = [a.enabled for a in chosen]
        self.disable([a.config.name for a in chosen])
        try:
            yield self
        finally:
            for adapter, state in zip(chosen, states, strict=True):
                self.set_enabled(state, [adapter.config.name])

    def list_adapters(self) -> list[dict]:
        """Name, kind, on or off, parameter count and provenance of every adapter, in order."""
        return [
            {
                "name": a.config.name,
                "kind": a.config.kind,
                "enabled": a.enabled,
                "n_parameters": a.counts()["total"],
                "stacked_on": list(a.stacked_on),
                "sha256": a.sha256,
                "dir": a.source,
            }
            for a in self.adapters.values()
        ]

    def describe(self) -> dict:
        """What the model is made of, for provenance: the base weights' hash and each adapter's."""
        return {
            "base_weights_sha256": self.base_hash,
            "adapters": [
                {"name": a.config.name, "kind": a.config.kind, "sha256": a.sha256, "dir": a.source}
                for a in self.adapters.values()
            ],
        }

    def merge_lora(self, name: str) -> CaloFM:
        """A plain model for adapter ``name``'s particle, its LoRA folded in (``merge.py``)."""
        return merged_model(self, self.adapter(name))
