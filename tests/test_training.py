"""The trainer as a library: learning, exact resume, parameter filters, schedule, directories."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import make_toy_showers

from calofm.data.batches import TokenDataset, eval_batches
from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.model import CaloFM, load_model, preset
from calofm.tokens import Tokenizer, TokenizerConfig
from calofm.training import distributed
from calofm.training.config import TrainConfig
from calofm.training.schedule import learning_rate
from calofm.training.steps import evaluate
from calofm.training.trainer import train

DET = DetectorConfig(absorber_mm=(2.1,) * 6, nx=6, ny=6)
CLASSES = ["G4_W:gamma", "G4_Ta:gamma"]
TOKENS = TokenizerConfig.for_detector(
    DET, scheme="log", n_bins=32, max_mev=20.0, incident_min_gev=1.0, incident_max_gev=5.0
)


def datasets() -> tuple[TokenDataset, TokenDataset]:
    tok = Tokenizer(TOKENS)
    parts = {
        name: make_toy_showers(
            50, seed=k, detector=DET.with_material(name.split(":")[0]), energy_range=(1, 5)
        )
        for k, name in enumerate(CLASSES)
    }
    train_set = TokenDataset([(n, s.select(slice(0, 40))) for n, s in parts.items()], tok, CLASSES)
    val_set = TokenDataset([(n, s.select(slice(40, 50))) for n, s in parts.items()], tok, CLASSES)
    return train_set, val_set


def model(seed: int = 0) -> CaloFM:
    torch.manual_seed(seed)
    return CaloFM(preset("tiny"), TOKENS, DET, CLASSES)


def test_training_reduces_validation_loss_and_writes_a_loadable_model(tmp_path):
    train_set, val_set = datasets()
    m = model()
    env = distributed.setup("cpu")
    batches = eval_batches(val_set.lengths, batch_size=16)
    before = evaluate(m, val_set, batches, env)["loss"]
    config = TrainConfig(epochs=4, batch_size=8, lr=3e-3, warmup_steps=5)
    result = train(m, train_set, val_set, config, None, tmp_path, device="cpu", progress=False)
    after = evaluate(m, val_set, batches, env)["loss"]
    assert after < before - 0.5
    assert result.steps == 4 * 10 and not result.interrupted
    loaded = load_model(tmp_path)
    assert evaluate(loaded, val_set, batches, env)["loss"] == pytest.approx(result.best_val_loss)
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "val"] == [10, 20, 30, 40]
    assert (tmp_path / "loss_curve.png").stat().st_size > 0
    assert json.loads((tmp_path / "training.json").read_text())["step"] == 40


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path):
    train_set, val_set = datasets()
    config = TrainConfig(epochs=3, batch_size=8, lr=3e-3, warmup_steps=4, log_every=3)
    whole = model()
    train(whole, train_set, val_set, config, None, tmp_path / "a", device="cpu", progress=False)

    first = model()
    stopped = train(
        first,
        train_set,
        val_set,
        config,
        None,
        tmp_path / "b",
        device="cpu",
        progress=False,
        should_stop=lambda step: step == 13,  # mid-epoch, after the first validation
    )
    assert stopped.interrupted and stopped.steps == 13
    resumed = model(seed=1)  # different initial weights: everything must come from the checkpoint
    done = train(
        resumed,
        train_set,
        val_set,
        config,
        None,
        tmp_path / "b",
        device="cpu",
        progress=False,
        resume=True,
    )
    assert done.steps == 30 and not done.interrupted
    for (name, a), (_, b) in zip(
        whole.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    log_a = (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()
    log_b = (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
    strip = [
        {k: v for k, v in json.loads(x).items() if k not in ("elapsed_s", "tokens_per_s")}
        for x in log_a
    ]
    assert strip == [
        {k: v for k, v in json.loads(x).items() if k not in ("elapsed_s", "tokens_per_s")}
        for x in log_b
    ]


def test_a_fixed_seed_run_is_reproducible_and_leaves_the_global_rng_alone(tmp_path):
    """Two runs from the same start and seed log the same losses step by step and end with the
    same weights; the caller's torch generator is where it was (training draws from it nothing)."""
    train_set, val_set = datasets()
    config = TrainConfig(epochs=2, batch_size=8, lr=3e-3, warmup_steps=4, log_every=1, seed=5)
    runs = []
    for name in ("a", "b"):
        m = model()
        rng = torch.get_rng_state()
        train(m, train_set, val_set, config, None, tmp_path / name, device="cpu", progress=False)
        assert torch.equal(torch.get_rng_state(), rng)
        runs.append(m)
    assert _weights_equal(*runs)
    log = _log(tmp_path / "a")
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, 21))
    assert all(np.isfinite(r["loss"]) for r in log)
    assert log == _log(tmp_path / "b")


def test_resume_refuses_other_settings_and_fresh_runs_refuse_used_directories(tmp_path):
    train_set, val_set = datasets()
    config = TrainConfig(max_steps=3, batch_size=8)
    train(model(), train_set, val_set, config, None, tmp_path, device="cpu", progress=False)
    with pytest.raises(CalofmError, match="already holds a training run"):
        train(model(), train_set, val_set, config, None, tmp_path, device="cpu", progress=False)
    other = TrainConfig(max_steps=3, batch_size=8, lr=1e-4)
    with pytest.raises(CalofmError, match="train_config"):
        train(
            model(),
            train_set,
            val_set,
            other,
            None,
            tmp_path,
            device="cpu",
            resume=True,
            progress=False,
        )
    with pytest.raises(CalofmError, match="no checkpoint"):
        train(
            model(),
            train_set,
            val_set,
            config,
            None,
            tmp_path / "new",
            device="cpu",
            resume=True,
            progress=False,
        )


def test_only_the_given_parameters_change(tmp_path, capsys):
    train_set, val_set = datasets()
    m = model()
    trainable = [p for block in m.blocks for p in block.experts.parameters()]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    config = TrainConfig(max_steps=5, batch_size=8, warmup_steps=0)
    train(m, train_set, val_set, config, trainable, tmp_path, device="cpu", progress=False)
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".experts." in k for k in changed)
    assert all(p.requires_grad for p in m.parameters())  # flags restored
    n = sum(p.numel() for p in trainable)
    assert f"trainable parameters: {n:,} of {m.n_parameters():,}" in capsys.readouterr().out


def test_schedule_warms_up_then_decays_to_a_tenth_not_to_zero():
    config = TrainConfig(max_steps=1000, lr=1e-3, warmup_steps=100)
    lrs = np.array([learning_rate(config, s, 1000, 0.0) for s in range(1000)])
    assert lrs[0] == pytest.approx(1e-5) and lrs[99] == pytest.approx(1e-3)
    assert np.all(np.diff(lrs[100:]) <= 0)
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-3) and lrs[100:].min() >= 1e-4 - 1e-12
    assert lrs[550] == pytest.approx(5.5e-4, rel=1e-2)  # half-way: mid-point of the cosine


def test_time_limited_schedule_follows_the_clock():
    config = TrainConfig(time_limit_min=10, lr=1e-3, warmup_steps=0)
    assert learning_rate(config, 50, None, 0.0) == pytest.approx(1e-3)
    assert learning_rate(config, 50, None, 300.0) == pytest.approx(5.5e-4)
    assert learning_rate(config, 50, None, 900.0) == pytest.approx(1e-4)


def test_config_needs_a_budget_and_one_batch_size():
    with pytest.raises(CalofmError, match="budget"):
        TrainConfig()
    with pytest.raises(CalofmError, match="exactly one"):
        TrainConfig(epochs=1, batch_size=8, batch_tokens=100)


class FakeClock:
    """The trainer's clock, one second further at every reading: a time limit without timing."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        self.now += 1.0
        return self.now

    perf_counter = monotonic

    def time(self) -> float:
        return self.monotonic()


def test_time_limit_stops_the_run_and_still_validates_and_saves(tmp_path, monkeypatch):
    import calofm.training.run as run_module

    train_set, val_set = datasets()
    monkeypatch.setattr(run_module, "time", FakeClock())
    config = TrainConfig(time_limit_min=1.0, max_steps=500, batch_size=8, warmup_steps=2)
    result = train(
        model(), train_set, val_set, config, None, tmp_path, device="cpu", progress=False
    )
    # Stopped by the 60 (fake) seconds, not by the 500 steps, and not by an interruption.
    assert 0 < result.steps < 60 and not result.interrupted
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val"]
    assert val and val[-1]["step"] == result.steps  # validated where it stopped
    assert result.last_val_loss == pytest.approx(val[-1]["loss"])
    assert load_model(tmp_path) is not None
    summary = json.loads((tmp_path / "training.json").read_text())
    assert summary["step"] == result.steps
    state = json.loads((tmp_path / "checkpoints" / "last" / "state.json").read_text())
    assert state["step"] == result.steps


def _weights_equal(a: CaloFM, b: CaloFM) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def _log(path) -> list[dict]:
    skip = ("elapsed_s", "tokens_per_s")
    return [
        {k: v for k, v in json.loads(line).items() if k not in skip}
        for line in (path / "train_log.jsonl").read_text().splitlines()
    ]


def test_a_checkpoint_swap_cut_short_resumes_from_the_previous_checkpoint(tmp_path, monkeypatch):
    """A kill between moving the old checkpoint aside and moving the new one in leaves only
    ``last.old`` (and a temporary directory): resuming starts from it and ends as if nothing
    had happened."""
    import os

    import calofm.training.checkpoint as checkpoint_module

    train_set, val_set = datasets()
    config = TrainConfig(epochs=2, batch_size=8, lr=3e-3, warmup_steps=4, log_every=3)
    whole = model()
    train(whole, train_set, val_set, config, None, tmp_path / "a", device="cpu", progress=False)

    swaps = []

    class CutShort:  # the checkpoint module's os: killed before the second swap-in completes
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(src, dst):
            if ".tmp-" in str(src):
                swaps.append(dst)
                if len(swaps) == 2:
                    raise KeyboardInterrupt
            os.replace(src, dst)

    monkeypatch.setattr(checkpoint_module, "os", CutShort())
    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):  # the checkpoint after step 13 is never swapped in
        train(
            model(), train_set, val_set, config, None, out, device="cpu", progress=False,
            should_stop=lambda step: step == 13,
        )  # fmt: skip
    monkeypatch.undo()
    checkpoints = out / "checkpoints"
    assert not (checkpoints / "last").exists()
    assert json.loads((checkpoints / "last.old" / "state.json").read_text())["step"] == 10
    resumed = model(seed=1)
    done = train(
        resumed, train_set, val_set, config, None, out, device="cpu", progress=False, resume=True
    )
    assert done.steps == 20 and not done.interrupted
    assert _weights_equal(whole, resumed)
    assert _log(tmp_path / "a") == _log(out)
    assert (checkpoints / "last").is_dir() and not (checkpoints / "last.old").exists()


def test_bf16_autocast_trains_validates_and_resumes_exactly(tmp_path):
    train_set, val_set = datasets()
    config = TrainConfig(epochs=1, batch_size=8, lr=3e-3, warmup_steps=2, amp=True)
    kwargs = dict(device="cpu", progress=False)
    whole = model()
    result = train(whole, train_set, val_set, config, None, tmp_path / "a", **kwargs)
    assert result.steps == 10 and np.isfinite(result.last_val_loss)
    # Training ran under autocast: fp32 training from the same start ends elsewhere ...
    fp32 = model()
    train(fp32, train_set, val_set, replace(config, amp=False), None, tmp_path / "f", **kwargs)
    assert not _weights_equal(whole, fp32)
    # ... and so did validation: its loss is the bf16 one of the final weights, not the fp32 one.
    env = distributed.setup("cpu")
    batches = eval_batches(val_set.lengths, batch_size=8)
    bf16 = evaluate(whole, val_set, batches, env, amp=True)["loss"]
    assert result.last_val_loss == pytest.approx(bf16, rel=1e-9)
    assert evaluate(whole, val_set, batches, env)["loss"] != pytest.approx(bf16, rel=1e-9)
    stopped = train(
        model(), train_set, val_set, config, None, tmp_path / "b", should_stop=lambda s: s == 4,
        **kwargs,
    )  # fmt: skip
    assert stopped.interrupted and stopped.steps == 4
    resumed = model(seed=1)
    done = train(resumed, train_set, val_set, config, None, tmp_path / "b", resume=True, **kwargs)
    assert done.steps == 10 and done.last_val_loss == pytest.approx(result.last_val_loss)
    assert _weights_equal(whole, resumed)
