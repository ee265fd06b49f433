"""The trainer as a library: learning, exact resume, parameter filters, schedule, directories."""

from __future__ import annotations

import json

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
from calofm.training.trainer import evaluate, learning_rate, train

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


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def test_time_limit_stops_the_run_and_still_validates_and_saves(tmp_path):
    train_set, val_set = datasets()
    config = TrainConfig(time_limit_min=0.02, batch_size=8, warmup_steps=2)
    result = train(
        model(), train_set, val_set, config, None, tmp_path, device="cpu", progress=False
    )
    assert 0 < result.steps and not result.interrupted and result.last_val_loss is not None
    assert result.elapsed_s < 60 * 0.02 + 10
    assert load_model(tmp_path) is not None
