"""What a fine-tuning study runs: the new class and its data, the methods, training-set sizes and
repeats, and the classes checked for forgetting; checked when made, before any run starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from calofm.errors import CalofmError

METHODS = ("expert", "expert+condition", "full")


@dataclass(frozen=True)
class StudyConfig:
    class_name: str
    train_paths: tuple[str, ...]
    test_path: str
    n_events: tuple[int, ...]
    repeats: int = 1
    methods: tuple[str, ...] = ("expert", "full")
    init_from: str | None = None
    n_generate: int | None = None  # None: one shower per test shower
    n_forgetting: int | None = None  # showers per forgetting class (None: n_generate)
    forgetting: tuple[tuple[str, str], ...] = ()  # (class, its test file)
    val_fraction: float = 0.05
    seed: int = 0
    generate_batch: int = 128
    max_hits: int | None = None  # None: the model tokenizer's
    eval_splits: int = 5
    adapter_dirs: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown or not self.methods:
            raise CalofmError(f"study: methods must be among {', '.join(METHODS)}")
        if not self.n_events or min(self.n_events) < 1 or self.repeats < 1:
            raise CalofmError("study: need training sizes >= 1 and at least one repeat")
        if "full" in self.methods and self.adapter_dirs:
            raise CalofmError("study: full fine-tuning starts from a base model without adapters")

    def runs(self) -> list[tuple[str, int, int]]:
        return [(m, n, r) for m in self.methods for n in self.n_events for r in range(self.repeats)]
