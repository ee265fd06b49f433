"""Model sizes in one frozen dataclass, saved with every model, and the named presets.

A class is one (material, particle) pair, written ``"MATERIAL:particle"`` (e.g. ``"G4_W:gamma"``);
every block holds one expert per class.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import ClassVar

from calofm.configs import FromDict
from calofm.detector import material_long
from calofm.errors import CalofmError
from calofm.particles import pdg_code

VOXEL_HEADS = ("flat", "factorised", "layered")


@dataclass(frozen=True)
class ModelConfig(FromDict):
    """Transformer sizes; vocabularies come from the TokenizerConfig, the grid from the detector."""

    config_name: ClassVar[str] = "model"

    d_model: int = 256
    n_heads: int = 8
    n_blocks: int = 3  # block 0 is cross-attention, the rest self-attention
    ffn_mult: int = 2
    rope_fraction: float = 0.5  # share of each head's dimensions rotated by RoPE
    rope_base: float = 1000.0
    # What the model knows and how it predicts (defaults: the paper's design; see PRESETS).
    # "flat": one logit per voxel; "factorised": layer, then x, then y; "layered": layer, then
    # (x, y) among the layer's cells (calofm.model.layered_head)
    voxel_head: str = "flat"
    condition_every_position: bool = False  # conditions added to every position, not only prepended
    shower_state: bool = False  # every position sees the energy deposited so far and the hit count
    exclude_used_voxels: bool = False  # a voxel is used once: in the loss and in sampling
    falling_energy: bool = False  # the next energy bin is never above the previous one
    # The voxel head alone decides where a shower ends; the energy head gives the next energy of a
    # shower that goes on. With two stop decisions drawn independently a shower ends if either says
    # so, which nearly doubles the chance of stopping at every step.
    single_stop: bool = False
    # A shower's hit count and visible energy are drawn first (calofm.model.totals) and every
    # position is conditioned on them; the shower ends at that hit count.
    totals: bool = False
    # The factorised head's sub-heads see how full the shower already is where they choose: hits
    # per layer, per x row of the chosen layer, the taken y of the chosen row (needs voxels used once).
    voxel_occupancy: bool = False
    # Every position also sees the mean energy per hit still to come (the visible energy left over
    # the hits left): with a falling order the next hit's energy hangs on it, and the network need
    # not learn a ratio of two of its inputs (needs totals and shower_state). At 60 minutes it did
    # not improve the validation loss and made the cell spectrum worse: the design leaves it off.
    energy_left_per_hit: bool = False
    # The occupancy-aware layer head also sees, per layer, how full the inner rings around the beam
    # axis are: a layer whose core is taken sends its next hot hit to the first ring, where Geant4
    # puts it in another layer's core (needs voxel_occupancy). No gain at 300 steps; with
    # centre_occupancy at 2,234 steps the classifier AUC fell from 0.993 to 0.963 (W).
    ring_occupancy: bool = False
    # The x head also sees which central columns of each row of the chosen layer are taken: a row
    # whose core cell is taken sends its hit to the next column, the first ring, where Geant4
    # puts the hottest hits of a 90 GeV W shower almost never (needs voxel_occupancy).
    centre_occupancy: bool = False
    # The energy head and embedding count bins from the shower's drawn visible energy, so a cell's
    # energy scales with it exactly (calofm.model.relative_energy; needs totals and log bins).
    relative_energy: bool = False
    # Each layer's logit (layer head) and each row's (x head) also gets a gated linear function of
    # its own occupancy features, one weight vector shared by all layers (rows): "this layer's core
    # is full" lowers that layer's logit directly instead of through the sub-head's mixing layer
    # (needs voxel_occupancy).
    own_occupancy: bool = False
    # The layer head also sees, per layer, the energy the shower has put there over the last hit's
    # energy: whether the next hit, about as hot as the last, fits the first ring of a layer whose
    # core is taken. The hottest tenth of a W shower's hits never go to the first ring in Geant4;
    # the base before full_rings sent 4% there, all in layers with a full core (needs
    # ring_occupancy).
    layer_energy: bool = False
    # The layer head also sees, per layer, whether each inner ring is full. Its taken fraction
    # enters a linear term, which cannot tell a full core (no hot hit fits) from a core with one
    # free cell (where the next hot hit goes) without also pushing empty cores apart from both
    # (needs ring_occupancy).
    full_rings: bool = False
    # Every position also sees which way the shower so far leans: its energy-weighted transverse
    # centre, from the beam axis. A Geant4 shower's centre wanders from shower to shower more
    # than a generated one's (needs shower_state). On the small design, after 3,600 steps, the
    # generated centre's spread did not widen and the classifier AUC rose, so it stays off.
    transverse_state: bool = False
    # The x and y heads' logits also get a gated product of the shower's energy-weighted centre so
    # far (cells from the beam axis) and each row's (column's) position, clipped at
    # centre_pull_reach cells: a position can tilt its next hit towards the side its own shower leans
    # to. A term in x alone tilts every shower alike; fed the centre as an input
    # (transverse_state) the network did not learn the product. At the shipped budget the centre's
    # spread came to Geant4's at 50-90 GeV and the centre in y improved everywhere, but 10 GeV
    # showers drift in x and the classifier AUC did not move, so it stays off (needs
    # voxel_head=factorised).
    centre_pull: bool = False
    # How far from the axis (cells) the centre pull's tilt grows. A displaced shower's halo falls
    # off at a constant rate, so a shift tilts the far rows alike; unclipped, the tilt ran away in
    # generation (10 GeV W showers drifted to centres up to 82 mm off the axis; Geant4 none).
    centre_pull_reach: float = 2.0

    def __post_init__(self) -> None:
        if self.d_model <= 0 or self.n_heads <= 0 or self.n_blocks <= 0 or self.ffn_mult <= 0:
            raise CalofmError("model: d_model, n_heads, n_blocks and ffn_mult must be positive")
        if self.d_model % self.n_heads:
            raise CalofmError(
                f"model: d_model {self.d_model} is not divisible by n_heads {self.n_heads}"
            )
        if not 0 <= self.rope_fraction <= 1 or self.rope_dim % 2:
            raise CalofmError(
                f"model: rope_fraction {self.rope_fraction} must be in [0, 1] and rotate an even "
                f"number of the {self.head_dim} head dimensions"
            )
        if self.rope_base <= 1:
            raise CalofmError("model: rope_base must be above 1")
        if self.voxel_head not in VOXEL_HEADS:
            raise CalofmError(
                f"model: unknown voxel head {self.voxel_head!r}; choose one of {VOXEL_HEADS}"
            )
        if self.voxel_occupancy and (
            self.voxel_head != "factorised" or not self.exclude_used_voxels
        ):
            raise CalofmError(
                "model: voxel_occupancy needs voxel_head=factorised and exclude_used_voxels=true "
                "(or set voxel_occupancy=false)"
            )
        if self.voxel_head == "layered" and not self.exclude_used_voxels:
            raise CalofmError("model: voxel_head=layered needs exclude_used_voxels=true")
        # of the occupancy head
        features = (
            "ring_occupancy",
            "centre_occupancy",
            "own_occupancy",
            "layer_energy",
            "full_rings",
        )
        needing = [name for name in features if getattr(self, name)]
        if needing and not self.voxel_occupancy:
            raise CalofmError(
                f"model: {', '.join(needing)} need voxel_occupancy=true (or set "
                f"{', '.join(f'{name}=false' for name in needing)})"
            )
        for name in ("layer_energy", "full_rings"):
            if getattr(self, name) and not self.ring_occupancy:
                raise CalofmError(f"model: {name} needs ring_occupancy=true (or set {name}=false)")
        if not self.centre_pull_reach > 0:
            raise CalofmError(
                f"model: centre_pull_reach must be positive, got {self.centre_pull_reach}"
            )
        if self.centre_pull and self.voxel_head != "factorised":
            raise CalofmError(
                "model: centre_pull needs voxel_head=factorised (or set centre_pull=false)"
            )
        if self.transverse_state and not self.shower_state:
            raise CalofmError(
                "model: transverse_state needs shower_state=true (or set transverse_state=false)"
            )
        if self.relative_energy and not self.totals:
            raise CalofmError(
                "model: relative_energy needs totals=true (or set relative_energy=false)"
            )
        if self.energy_left_per_hit and not (self.totals and self.shower_state):
            raise CalofmError(
                "model: energy_left_per_hit needs totals=true and shower_state=true "
                "(or set energy_left_per_hit=false)"
            )

    @property
    def head_reads_used(self) -> bool:
        """Whether the voxel head's distribution depends on the voxels a shower already has."""
        return self.voxel_occupancy or self.voxel_head == "layered"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rope_dim(self) -> int:
        """Number of rotated dimensions per head (the first ones)."""
        return int(round(self.head_dim * self.rope_fraction))

    @property
    def ffn_dim(self) -> int:
        return self.d_model * self.ffn_mult

    def to_dict(self) -> dict:
        return asdict(self)


# The design that fits a CPU budget best (benchmarks/bench_fidelity.py; docs/results.md). Falling
# energies are off: at equal steps they made the hit count and the cell spectrum worse (a low
# early draw caps every later hit). Shower totals brought the response and the hit count to the
# Geant4 floor at equal steps (from 33x and 9.5x). The occupancy-aware factorised head took the
# transverse centre of W photons from 5.3x to 1.0x the floor at 60 minutes. The layered head beat
# the plain factorised one at 300 equal steps; at 60 minutes it halved the hottest hits' escapes
# but spread the far halo (transverse centre 4.5x, radial profile 8x), so it stays an option.
# Ring and centre occupancy (the layer head sees each layer's inner rings, the x head each row's
# central columns) took the classifier AUC from 0.993 to 0.963 at equal steps; relative energies
# (the small preset's; they need log bins) took the cell spectrum from 3.8x to 1.6x the floor.
# Own occupancy (each layer's and row's logit gets a gated term of its own occupancy) then took
# the classifier AUC to 0.940 (W) and 0.924 (Ta) at equal steps: hot hits beside a full core -42%.
# Full-ring flags (the layer head sees which layers' inner rings are full) took it from 0.937 to
# 0.721 (W) and 0.913 to 0.770 (Ta) at 3,600 equal steps.
DESIGN = dict(
    voxel_head="factorised",
    condition_every_position=True,
    shower_state=True,
    exclude_used_voxels=True,
    falling_energy=False,
    single_stop=True,
    totals=True,
    voxel_occupancy=True,
    ring_occupancy=True,
    centre_occupancy=True,
    own_occupancy=True,
    full_rings=True,
)

PRESETS: dict[str, ModelConfig] = {
    # The paper's sizes: width 256, 8 heads of 32, 1 cross + 2 self-attention blocks, FFN 256->512.
    "paper": ModelConfig(d_model=256, n_heads=8, n_blocks=3, ffn_mult=2),
    # Trainable on 2 CPU cores within an hour; the two vocabularies dominate the cost.
    "small": ModelConfig(
        d_model=128, n_heads=4, n_blocks=3, ffn_mult=2, relative_energy=True, **DESIGN
    ),
    # For tests: every code path of the small preset, a few milliseconds per step; energies stay
    # absolute so that tests can use linear bins (tests/test_relative_energy.py covers them).
    "tiny": ModelConfig(d_model=32, n_heads=2, n_blocks=2, ffn_mult=2, **DESIGN),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise CalofmError(f"model: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def with_overrides(config: ModelConfig, settings: list[str]) -> ModelConfig:
    """``config`` with ``["KEY=VALUE", ...]`` applied, each value parsed as its field's type."""
    changes: dict[str, object] = {}
    for item in settings:
        key, sep, value = item.partition("=")
        field = ModelConfig.__dataclass_fields__.get(key.strip())
        if not sep or field is None:
            raise CalofmError(
                f"model: cannot set {item!r}; use KEY=VALUE with KEY one of "
                f"{', '.join(ModelConfig.__dataclass_fields__)}"
            )
        kind, value = field.type, value.strip()
        try:
            if kind == "bool":
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                changes[field.name] = value.lower() in ("true", "1", "yes")
            else:
                changes[field.name] = {"int": int, "float": float, "str": str}[kind](value)
        except ValueError:
            raise CalofmError(f"model: {key} takes a {kind}, got {value!r}") from None
    return replace(config, **changes)


def class_name(material: str, particle: str) -> str:
    """'G4_W' or 'W', 'gamma' -> 'G4_W:gamma': the one spelling of a class, for every command.

    The particle must be a known one (its Geant4 name).
    """
    if not material or not particle or ":" in material or ":" in particle:
        raise CalofmError(f"model: bad material/particle pair {material!r}, {particle!r}")
    pdg_code(particle)
    return f"{material_long(material)}:{particle}"


def parse_class(name: str) -> tuple[str, str]:
    """'G4_W:gamma' -> ('G4_W', 'gamma')."""
    material, sep, particle = name.partition(":")
    if not sep or not material or not particle or ":" in particle:
        raise CalofmError(f"model: class name {name!r} is not of the form MATERIAL:particle")
    return material, particle
