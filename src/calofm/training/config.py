"""Training settings: one dataclass for a run, and per-preset defaults for tokens and optimiser."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from calofm.configs import FromDict
from calofm.errors import CalofmError


@dataclass(frozen=True)
class TrainConfig(FromDict):
    """Everything that decides a training run's result (the device aside).

    Budgets: training stops at the first of ``epochs``, ``max_steps`` and ``time_limit_min``; at
    least one is needed. The learning rate warms up linearly over ``warmup_steps``, then follows a
    cosine from ``lr`` down to ``min_lr_ratio * lr`` over the run's progress: the share of steps
    done when the step count is known, or of the time limit used, whichever is further. With a
    time limit the schedule therefore follows wall time, and a run is reproducible only without.
    ``batch_size`` (showers) or ``batch_tokens`` (padded tokens per stream) is the *global* batch,
    split over all processes, so results do not depend on the number of processes.
    ``self_drawn_energy``: the share of the hits whose energy token a step feeds from the model's
    own draw instead of the shower's (``CaloFM.energy_draws``): teacher forcing never shows the
    model the energies it draws itself, which generation feeds it.
    """

    config_name: ClassVar[str] = "training"

    epochs: int | None = None
    max_steps: int | None = None
    time_limit_min: float | None = None
    batch_size: int | None = 32
    batch_tokens: int | None = None
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    amp: bool = False
    pool_batches: int = 64
    log_every: int = 10
    checkpoint_minutes: float = 10.0
    self_drawn_energy: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs is None and self.max_steps is None and self.time_limit_min is None:
            raise CalofmError("training needs a budget: epochs, max_steps or a time limit")
        if (self.batch_size is None) == (self.batch_tokens is None):
            raise CalofmError("give exactly one of a batch size in showers and one in tokens")
        for name in ("epochs", "max_steps", "batch_size", "batch_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise CalofmError(f"training: {name} must be at least 1, got {value}")
        if self.time_limit_min is not None and self.time_limit_min <= 0:
            raise CalofmError("training: the time limit must be positive")
        if self.lr <= 0 or not 0 < self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise CalofmError("training: need lr > 0, 0 < min_lr_ratio <= 1 and warmup >= 0")
        if not 0 <= self.self_drawn_energy < 1:
            raise CalofmError(
                f"training: self_drawn_energy is a share in [0, 1), got {self.self_drawn_energy}"
            )
        if min(self.grad_clip, self.log_every, self.pool_batches, self.checkpoint_minutes) <= 0:
            raise CalofmError(
                "training: grad_clip, log_every, pool_batches and checkpoint_minutes must be "
                "positive"
            )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PresetDefaults:
    """What ``calofm train --preset NAME`` uses unless a flag says otherwise.

    ``energy_bins`` None means linear bins ``bin_kev`` wide up to the data's top edge (the paper).
    The small preset uses 1024 logarithmic bins: 0.64 % relative width everywhere between 0.1 and
    70 MeV, finer than the cells' sampling fluctuations and far finer than the log-binned cell
    spectrum used in evaluation, while the energy head shrinks 50-fold against 1.4 keV linear bins.

    Small-preset optimisation is sized for a one-hour, 2-core CPU run (benchmarks/bench_training.py,
    about 3,300 tokens/s with 2 idle cores, i.e. 6 epochs of the 3,800 W+Ta photon showers in 55
    minutes): the budget is a few thousand steps at most, and in 6-minute trials batches of 8
    showers (about 3,700 tokens) beat 16 at equal tokens seen, and peak rates of 2e-3 and 4e-3
    beat 1e-3. Paper-preset values are for a GPU and were not tuned here.
    """

    energy_scheme: str
    energy_bins: int | None
    bin_kev: float
    max_hits: int
    batch_size: int
    lr: float
    warmup_steps: int


PRESET_DEFAULTS: dict[str, PresetDefaults] = {
    "paper": PresetDefaults("linear", None, 1.4, 1800, 64, 5e-4, 1000),
    "small": PresetDefaults("log", 1024, 1.4, 1200, 8, 3e-3, 100),
    "tiny": PresetDefaults("log", 64, 1.4, 1200, 8, 3e-3, 5),
}


def preset_defaults(name: str) -> PresetDefaults:
    if name not in PRESET_DEFAULTS:
        raise CalofmError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_DEFAULTS)}")
    return PRESET_DEFAULTS[name]
