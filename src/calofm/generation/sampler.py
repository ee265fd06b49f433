"""How tokens are drawn (``SamplingConfig``); the draw itself is ``calofm.model.sampling.sample``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from calofm.errors import CalofmError
from calofm.model.sampling import sample

__all__ = ["SamplingConfig", "sample"]


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn. ``temperature=0`` means greedy (argmax, no randomness)."""

    temperature: float = 1.0
    # (lo, hi): temperature rising linearly from lo at the first hit to hi at the maximum length;
    # replaces ``temperature`` when set (the reference used 0.95 -> 1.05).
    dynamic_temperature: tuple[float, float] | None = None
    top_k: int | None = None
    top_p: float | None = None
    # Forbid a voxel that the shower already has: the training showers never repeat a voxel, so
    # this keeps samples on the data's support instead of merging duplicates afterwards.
    unique_voxels: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise CalofmError(f"temperature must be >= 0, got {self.temperature}")
        if self.dynamic_temperature is not None:
            lo, hi = self.dynamic_temperature
            if lo <= 0 or hi <= 0:
                raise CalofmError(f"dynamic temperature must be positive, got {lo} {hi}")
            object.__setattr__(self, "dynamic_temperature", (float(lo), float(hi)))
        if self.top_k is not None and self.top_k <= 0:
            raise CalofmError(f"top-k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise CalofmError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.dynamic_temperature is None and self.temperature == 0

    def temperature_at(self, step: int, max_steps: int) -> float:
        """Temperature for the ``step``-th hit (0-based) of a sequence of at most ``max_steps``."""
        if self.dynamic_temperature is None:
            return self.temperature
        lo, hi = self.dynamic_temperature
        return lo + (hi - lo) * min(step, max_steps) / max(max_steps, 1)

    def to_dict(self) -> dict:
        return asdict(self)
