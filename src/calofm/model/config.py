"""Model sizes in one frozen dataclass, saved with every model, and the named presets.

A class is one (material, particle) pair, written ``"MATERIAL:particle"`` (e.g. ``"G4_W:gamma"``);
every block holds one expert per class.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from calofm.errors import CalofmError


@dataclass(frozen=True)
class ModelConfig:
    """Transformer sizes; vocabularies come from the TokenizerConfig, the grid from the detector."""

    d_model: int = 256
    n_heads: int = 8
    n_blocks: int = 3  # block 0 is cross-attention, the rest self-attention
    ffn_mult: int = 2
    rope_fraction: float = 0.5  # share of each head's dimensions rotated by RoPE
    rope_base: float = 1000.0

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

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise CalofmError(f"model: unknown config keys {sorted(unknown)}")
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    # The paper's sizes: width 256, 8 heads of 32, 1 cross + 2 self-attention blocks, FFN 256->512.
    "paper": ModelConfig(d_model=256, n_heads=8, n_blocks=3, ffn_mult=2),
    # Trainable on 2 CPU cores within an hour; the two vocabularies dominate the cost.
    "small": ModelConfig(d_model=128, n_heads=4, n_blocks=3, ffn_mult=2),
    # For tests: every code path, a few milliseconds per step.
    "tiny": ModelConfig(d_model=32, n_heads=2, n_blocks=2, ffn_mult=2),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise CalofmError(f"model: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def class_name(material: str, particle: str) -> str:
    """'G4_W', 'gamma' -> 'G4_W:gamma'."""
    if not material or not particle or ":" in material or ":" in particle:
        raise CalofmError(f"model: bad material/particle pair {material!r}, {particle!r}")
    return f"{material}:{particle}"


def parse_class(name: str) -> tuple[str, str]:
    """'G4_W:gamma' -> ('G4_W', 'gamma')."""
    material, sep, particle = name.partition(":")
    if not sep or not material or not particle or ":" in particle:
        raise CalofmError(f"model: class name {name!r} is not of the form MATERIAL:particle")
    return material, particle
