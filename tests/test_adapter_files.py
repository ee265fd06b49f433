"""Adapters on disk and in use: saved, loaded, refused when they do not fit, trained in a stage
(resumable), and mixed with base classes in one generation call."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_adapters import (
    BASE,
    PB_ELECTRON,
    PB_GAMMA,
    W_ELECTRON,
    assert_equal,
    base_model,
    logits,
    toy_file,
    trained,
)

from calofm.adapters import (
    AdaptedModel,
    AdapterConfig,
    load_adapters,
    load_model_with_adapters,
    read_manifest,
    save_adapter,
)
from calofm.adapters.files import TENSORS_FILE
from calofm.adapters.stage import run_stage
from calofm.errors import CalofmError
from calofm.generation.engine import generate
from calofm.model import model_hash, save_model
from calofm.training.config import TrainConfig

# ---- files --------------------------------------------------------------------------------------


def saved(tmp_path, model: AdaptedModel, *configs: AdapterConfig) -> list:
    base_dir = save_model(model.base, tmp_path / "base", {})
    dirs = []
    trained(model, *configs)
    for config in configs:
        dirs.append(save_adapter(model, config.name, tmp_path / config.name, {"note": "test"}))
    return [base_dir, *dirs]


def test_save_load_round_trip_reproduces_every_class_exactly(tmp_path):
    model = AdaptedModel(base_model())
    base_dir, pb, w_e, pb_e = saved(tmp_path, model, PB_GAMMA, W_ELECTRON, PB_ELECTRON)
    loaded = load_model_with_adapters(base_dir, [pb_e, pb, w_e])  # dependencies go first
    assert sorted(loaded.classes) == sorted(model.classes)
    for c in model.classes:
        assert_equal(logits(loaded, [c] * 2), logits(model, [c] * 2))
    assert all(not p.requires_grad for p in loaded.parameters())
    manifest = read_manifest(w_e)
    base_manifest = json.loads((base_dir / "manifest.json").read_text())
    assert manifest["kind"] == "particle+expert" and manifest["particle"] == "e-"
    assert manifest["config"]["rank"] == 4 and manifest["lora_scale"] == pytest.approx(4.0)
    assert manifest["base_weights_sha256"] == base_manifest["weights_sha256"]
    counts = model.adapter("G4_W:e-").counts()
    n = model.config.n_blocks
    base_heads = [model.spatial_head.base, model.energy_head]
    heads = sum(p.numel() for head in base_heads for p in head.parameters(recurse=True))
    heads -= sum(p.numel() for p in model.energy_head.particle.parameters())
    assert counts["heads"] == heads and counts["lora"] == n * 4 * 2 * 4 * model.config.d_model
    assert manifest["n_parameters"] == counts
    assert read_manifest(pb_e)["stacked_on"] == [
        {"name": "G4_W:e-", "sha256": manifest["adapter_sha256"]}
    ]
    assert read_manifest(pb)["kind"] == "expert" and read_manifest(pb)["stacked_on"] == []


def test_adapters_for_another_base_model_or_without_their_base_adapter_are_refused(tmp_path):
    model = AdaptedModel(base_model())
    _, pb, w_e, pb_e = saved(tmp_path, model, PB_GAMMA, W_ELECTRON, PB_ELECTRON)
    other = AdaptedModel(base_model(seed=1))
    with pytest.raises(CalofmError, match="another base model"):
        load_adapters(other, [pb])
    with pytest.raises(CalofmError, match="trained on top of adapter G4_W:e-"):
        load_adapters(AdaptedModel(base_model()), [pb_e])
    fresh = AdaptedModel(base_model())
    with pytest.raises(CalofmError, match="given twice"):
        load_adapters(fresh, [pb, pb])
    assert fresh.classes == BASE


def test_a_tampered_adapter_file_is_refused_and_leaves_the_model_as_it_was(tmp_path):
    model = AdaptedModel(base_model())
    _, pb, w_e = saved(tmp_path, model, PB_GAMMA, W_ELECTRON)
    manifest = read_manifest(w_e)
    manifest["config"]["rank"] = 8  # the tensors are rank 4
    (w_e / "adapter.json").write_text(json.dumps(manifest))
    fresh = AdaptedModel(base_model())
    h = model_hash(fresh)
    with pytest.raises(CalofmError, match="lora.A is torch.float32 \\(4, 32\\), the model expects"):
        load_adapters(fresh, [w_e])
    assert fresh.classes == BASE and model_hash(fresh) == h and not fresh.adapters
    from safetensors.torch import load_file, save_file

    tensors = load_file(pb / TENSORS_FILE)
    tensors["blocks.0.expert.fc1.bias"][0] += 1.0
    save_file(tensors, pb / TENSORS_FILE)
    fresh = AdaptedModel(base_model())
    with pytest.raises(CalofmError, match="do not match the manifest's hash"):
        load_adapters(fresh, [pb])
    assert fresh.classes == BASE


# ---- a stage, and generation -------------------------------------------------------------------


def showers_of(model, classes, seed=7):
    energies = np.linspace(1.5, 4.5, 4)
    return {c: generate(model, c, energies, seed=seed, max_hits=30)[0][c] for c in classes}


def test_a_stage_trains_only_its_adapter_and_generation_of_old_classes_is_unchanged(
    tmp_path, capsys
):
    model = AdaptedModel(base_model())
    h = model.base_hash
    before = showers_of(model, BASE)
    config = TrainConfig(max_steps=3, batch_size=8, lr=1e-2, warmup_steps=0)
    expert_before = [b.experts.ffn[1].fc1.weight.clone() for b in model.blocks]
    result = run_stage(
        model,
        PB_GAMMA,
        [toy_file(tmp_path, "G4_Pb", "gamma")],
        config,
        tmp_path / "pb",
        n_events=16,
        val_fraction=0.2,
        device="cpu",
        progress=False,
    )
    out = capsys.readouterr().out
    assert f"{result.counts['total']:,} trainable parameters" in out
    assert result.counts["total"] == sum(
        p.numel() for p in model.adapter("G4_Pb:gamma").parameters()
    )
    assert model.base_weights_hash() == h
    trained_expert = [b.experts.ffn[2].fc1.weight for b in model.blocks]
    assert not any(torch.equal(a, b) for a, b in zip(expert_before, trained_expert, strict=True))
    after = showers_of(model, BASE)
    for c in BASE:
        np.testing.assert_array_equal(after[c].offsets, before[c].offsets)
        np.testing.assert_array_equal(after[c].voxels, before[c].voxels)
        np.testing.assert_array_equal(after[c].energies, before[c].energies)
    assert (tmp_path / "pb" / TENSORS_FILE).is_file()
    assert not (tmp_path / "pb" / "checkpoints").exists()
    manifest = read_manifest(tmp_path / "pb")
    assert manifest["provenance"]["data"]["n_train"] == 16
    assert manifest["provenance"]["training"]["step"] > 0


def test_one_generate_call_mixes_base_and_adapted_classes():
    model = trained(base_model(), PB_GAMMA, W_ELECTRON, PB_ELECTRON)
    classes = ["G4_W:gamma", "G4_W:e-", "G4_Pb:e-", "G4_Pb:gamma", "G4_W:e-"]
    out, stats = generate(model, classes, np.array([1.5, 2, 3, 4, 4.5]), seed=0, max_hits=20)
    assert {c: len(s) for c, s in out.items()} == {
        "G4_W:gamma": 1,
        "G4_W:e-": 2,
        "G4_Pb:e-": 1,
        "G4_Pb:gamma": 1,
    }
    assert out["G4_Pb:e-"].particle == "e-" and out["G4_Pb:e-"].detector.material == "G4_Pb"
    assert stats["n_showers"] == 5
    # Each row's shower is the one its class gives alone (same seed and row number); the
    # classes' showers differ, so a row routed to another class's expert or heads is caught.
    energies = np.array([1.5, 2, 3, 4, 4.5])
    rows_of = {c: [i for i, x in enumerate(classes) if x == c] for c in out}
    told_apart, compared = 0, 0
    for c, rows in rows_of.items():
        for k, i in enumerate(rows):
            alone = generate(model, c, energies[i : i + 1], seed=0, max_hits=20, first_row=i)[0]
            mixed, single = out[c].select([k]), alone[c]
            np.testing.assert_array_equal(mixed.voxels, single.voxels)
            np.testing.assert_array_equal(mixed.energies, single.energies)
            others = [x for x in out if x != c]
            for other in others:
                wrong = generate(
                    model, other, energies[i : i + 1], seed=0, max_hits=20, first_row=i
                )
                w = wrong[0][other]
                if mixed.n_hits[0] < 2:  # an empty or one-hit shower may well be the same
                    continue
                same = np.array_equal(w.voxels, mixed.voxels) and np.array_equal(
                    w.energies, mixed.energies
                )
                compared += 1
                told_apart += not same
    # Inverse-CDF draws from the same uniforms coincide where two classes' distributions are
    # close (short showers of similar photon classes), so not every pair differs; most must.
    assert compared >= 4 and told_apart >= compared / 2, (told_apart, compared)


def test_an_interrupted_stage_resumes_to_the_same_adapter(tmp_path):
    data = [toy_file(tmp_path, "G4_W", "e-")]
    config = TrainConfig(epochs=2, batch_size=4, lr=1e-2, warmup_steps=0)
    kwargs = dict(n_events=8, val_fraction=0.2, device="cpu", progress=False)
    whole = AdaptedModel(base_model())
    run_stage(whole, W_ELECTRON, data, config, tmp_path / "a", **kwargs)
    stopped = run_stage(
        AdaptedModel(base_model()), W_ELECTRON, data, config, tmp_path / "b", should_stop=lambda s: s == 3,
        **kwargs,
    )  # fmt: skip
    assert stopped.train.interrupted and (tmp_path / "b" / "checkpoints").is_dir()
    resumed = AdaptedModel(base_model())
    run_stage(resumed, W_ELECTRON, data, config, tmp_path / "b", resume=True, **kwargs)
    want = whole.adapter("G4_W:e-").tensors()
    got = resumed.adapter("G4_W:e-").tensors()
    assert all(torch.equal(got[k], v) for k, v in want.items())
    assert (
        read_manifest(tmp_path / "b")["adapter_sha256"]
        == read_manifest(tmp_path / "a")["adapter_sha256"]
    )
