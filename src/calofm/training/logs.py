"""The training log (JSON lines: one record per logged step or validation) and its loss curve."""

from __future__ import annotations

import json
from pathlib import Path

from calofm.files import atomic_output


class TrainLog:
    """Append-only JSONL records ``{"kind": "train"|"val", "step": ..., ...}``.

    On resume, records past the checkpoint's step are dropped: the log tells one consistent story.
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.records: list[dict] = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    if record["step"] <= resume_step:
                        self.records.append(record)
        with atomic_output(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self, path: Path) -> None:
        """Training loss per logged interval and validation loss against the step.

        A bare ``Figure`` (no pyplot): no global backend or figure state is touched.
        """
        from matplotlib.figure import Figure

        train = [r for r in self.records if r["kind"] == "train"]
        val = [r for r in self.records if r["kind"] == "val"]
        fig = Figure(figsize=(6.4, 4.0), dpi=120)
        ax = fig.subplots()
        if train:
            ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train")
        if val:
            ax.plot(
                [r["step"] for r in val], [r["loss"] for r in val], "o-", ms=3, label="validation"
            )
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (spatial + energy cross-entropy, nats)")
        ax.grid(alpha=0.3)
        if train or val:
            ax.legend()
        fig.tight_layout()
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png")
