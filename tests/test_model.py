"""The CaloFM transformer: shapes, loss, depth signal, expert routing, classes, model files."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.model import CaloFM, ModelConfig, load_model, preset, save_model, weights_hash
from calofm.model.conditions import Conditions
from calofm.model.config import DESIGN, class_name, parse_class
from calofm.tokens import TokenizerConfig

CLASSES = ["G4_W:gamma", "G4_Pb:gamma", "G4_W:e-"]


# The paper's design: a flat voxel head, the incident energy prepended only, no constraints.
# Every design option the small preset sets (DESIGN, and its relative energies) at the paper's value.
PAPER_DESIGN = {name: getattr(ModelConfig(), name) for name in [*DESIGN, "relative_energy"]}


def tiny_model(classes: list[str] = CLASSES, seed: int = 0, paper_design: bool = False) -> CaloFM:
    torch.manual_seed(seed)
    det = DetectorConfig()
    tok = TokenizerConfig.for_detector(det, n_bins=64, max_hits=40)
    config = preset("tiny")
    if paper_design:
        config = dataclasses.replace(config, **PAPER_DESIGN)
    return CaloFM(config, tok, det, classes).eval()


def largest_change(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Largest difference between two logit tensors over the entries finite in both (impossible
    tokens are -inf in both)."""
    finite = torch.isfinite(a) & torch.isfinite(b)
    return (a - b)[finite].abs().max()


def random_tokens(model: CaloFM, b: int, t: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tok = model.tokenizer
    s = torch.randint(0, tok.n_voxels, (b, t), generator=g)
    e = torch.randint(0, tok.n_bins, (b, t), generator=g)
    s[:, 0], e[:, 0] = tok.spatial_sos, tok.energy_sos
    incident = torch.rand(b, generator=g) * 2 - 1
    return s, e, with_totals(model, incident, seed)


def with_totals(model: CaloFM, incident: torch.Tensor, seed: int = 0) -> Conditions | torch.Tensor:
    """The conditions a model needs: for a model with shower totals, random hit counts (up to
    its max_hits) and visible energies added to the incident energies."""
    if not model.config.totals:
        return incident
    g = torch.Generator().manual_seed(seed)
    n_hits = torch.randint(1, model.tokenizer.max_hits + 1, (len(incident),), generator=g)
    return Conditions(incident, n_hits, torch.rand(len(incident), generator=g) * 2000 + 1)


def test_forward_gives_logits_for_every_input_position():
    model = tiny_model()
    s, e, inc = random_tokens(model, 3, 7)
    ls, le = model(s, e, inc, torch.tensor([0, 1, 2]))
    assert ls.shape == (3, 7, model.tokenizer.spatial_vocab)
    assert le.shape == (3, 7, model.tokenizer.energy_vocab)


def test_forward_is_causal():
    model = tiny_model()
    s, e, inc = random_tokens(model, 2, 9)
    cid = torch.tensor([0, 1])
    ls, le = model(s, e, inc, cid)
    s2, e2 = s.clone(), e.clone()
    s2[:, 6:], e2[:, 6:] = 5, 7
    ls2, le2 = model(s2, e2, inc, cid)
    torch.testing.assert_close(ls[:, :6], ls2[:, :6])
    torch.testing.assert_close(le[:, :6], le2[:, :6])
    assert not torch.allclose(ls[:, 6:], ls2[:, 6:])


def test_sequence_longer_than_training_length_runs():
    model = tiny_model()
    s, e, inc = random_tokens(model, 1, 3 * model.tokenizer.seq_len)
    ls, _ = model(s, e, inc, torch.tensor([0]))
    assert torch.isfinite(ls[..., : model.tokenizer.n_voxels]).all()
    assert not ls.isnan().any()


def test_loss_ignores_padding_and_counts_eos():
    model = tiny_model()
    tok = model.tokenizer
    s, e, inc = random_tokens(model, 2, 6)
    s[:, -1], e[:, -1] = tok.spatial_eos, tok.energy_eos
    cid = torch.tensor([0, 2])
    total, ce_s, ce_e = model.loss(s, e, inc, cid)
    torch.testing.assert_close(total, ce_s + ce_e)
    padded_s = torch.cat([s, torch.full((2, 4), tok.spatial_pad)], dim=1)
    padded_e = torch.cat([e, torch.full((2, 4), tok.energy_pad)], dim=1)
    torch.testing.assert_close(model.loss(padded_s, padded_e, inc, cid)[0], total)
    # EOS is a target: changing the last (EOS) target changes the loss.
    s2 = s.clone()
    s2[:, -1] = 3
    assert not torch.allclose(model.loss(s2, e, inc, cid)[1], ce_s)


def test_depth_embedding_reaches_the_logits():
    model = tiny_model()
    det = model.detector
    s, e, inc = random_tokens(model, 1, 6)
    cid = torch.tensor([0])
    # Two voxels with the same (x, y) in layers 2 and 20 and the same token embedding:
    # only the layer embedding tells them apart.
    v2, v20 = (int(det.lxy_to_voxel(layer, 15, 15)) for layer in (2, 20))
    with torch.no_grad():
        model.spatial_embed.weight[v20] = model.spatial_embed.weight[v2]
    s[0, 3] = v2
    ls_a, _ = model(s, e, inc, cid)
    s[0, 3] = v20
    ls_b, _ = model(s, e, inc, cid)
    assert largest_change(ls_a[0, 3:], ls_b[0, 3:]) > 1e-3
    # And changing the depth signal of a layer changes the logits from that token on.
    with torch.no_grad():
        model.layer_embed.weight[20] += 0.5 * torch.randn(model.config.d_model)
    ls_c, _ = model(s, e, inc, cid)
    torch.testing.assert_close(ls_c[0, :3], ls_b[0, :3])
    assert largest_change(ls_c[0, 3:], ls_b[0, 3:]) > 1e-3


def test_changing_one_expert_changes_only_that_class():
    model = tiny_model()
    s, e, inc = random_tokens(model, 4, 8)
    cid = torch.tensor([0, 1, 0, 2])
    before = model(s, e, inc, cid)
    with torch.no_grad():
        for block in model.blocks:
            w = block.experts.ffn[1].fc2.weight
            w.add_(0.5 * torch.randn_like(w))
    after = model(s, e, inc, cid)
    for b, a in zip(before, after, strict=True):
        assert torch.equal(b[[0, 2, 3]], a[[0, 2, 3]])
        assert largest_change(b[1], a[1]) > 1e-3


def test_mixed_class_batch_matches_each_class_alone():
    model = tiny_model()
    s, e, inc = random_tokens(model, 5, 8)
    cid = torch.tensor([2, 0, 1, 0, 2])
    ls, le = model(s, e, inc, cid)
    for c in range(3):
        rows = (cid == c).nonzero()[:, 0]
        ls_c, le_c = model(s[rows], e[rows], inc[rows], cid[rows])
        torch.testing.assert_close(ls[rows], ls_c, atol=1e-5, rtol=0)
        torch.testing.assert_close(le[rows], le_c, atol=1e-5, rtol=0)


def test_add_class_copies_expert_and_returns_only_new_parameters():
    model = tiny_model()
    n_before = model.n_parameters()
    params = model.add_class("G4_Ta:gamma", init_from="G4_W:gamma")
    assert model.classes[-1] == "G4_Ta:gamma"
    assert sum(p.numel() for p in params) == model.n_parameters() - n_before
    per_block = sum(p.numel() for p in model.blocks[0].experts.ffn[0].parameters())
    totals = sum(p.numel() for p in model.totals.nets[0].parameters()) if model.totals else 0
    assert sum(p.numel() for p in params) == per_block * model.config.n_blocks + totals
    s, e, inc = random_tokens(model, 1, 6)
    w = model(s, e, inc, torch.tensor([0]))[0]
    ta = model(s, e, inc, torch.tensor([3]))[0]
    assert torch.equal(w, ta)
    fresh = model.add_class("G4_Pb:e-")
    assert len(fresh) == len(params)
    assert not torch.equal(model(s, e, inc, torch.tensor([4]))[0], w)


def test_class_errors_list_the_model_classes():
    model = tiny_model()
    with pytest.raises(CalofmError, match="G4_W:gamma, G4_Pb:gamma"):
        model.class_index("G4_Fe:gamma")
    with pytest.raises(CalofmError, match="already"):
        model.add_class("G4_W:gamma")
    with pytest.raises(CalofmError, match="out of range"):
        s, e, inc = random_tokens(model, 1, 3)
        model(s, e, inc, torch.tensor([7]))


def test_config_validation_and_round_trip():
    with pytest.raises(CalofmError, match="divisible"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(CalofmError, match="unknown preset"):
        preset("huge")
    with pytest.raises(CalofmError, match="unknown config keys"):
        ModelConfig.from_dict({"d_model": 64, "depth": 3})
    cfg = preset("small")
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert preset("paper").head_dim == 32 and preset("paper").rope_dim == 16
    assert parse_class(class_name("G4_W", "e-")) == ("G4_W", "e-")
    with pytest.raises(CalofmError):
        parse_class("G4_W-gamma")


def test_tokenizer_and_detector_must_agree():
    det = DetectorConfig(nx=10, ny=10)
    with pytest.raises(CalofmError, match="voxels"):
        CaloFM(preset("tiny"), TokenizerConfig(), det, CLASSES)


# ---- model files ----------------------------------------------------------------------------


def test_save_load_round_trip_is_bit_identical(tmp_path):
    model = tiny_model()
    model.add_class("G4_Ta:gamma", init_from="G4_W:gamma")
    save_model(model, tmp_path / "m", {"data": "toy"})
    loaded = load_model(tmp_path / "m")
    assert loaded.classes == model.classes
    assert loaded.config == model.config and loaded.tokenizer == model.tokenizer
    for (k, a), (k2, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(a, b)
    s, e, inc = random_tokens(model, 2, 5)
    cid = torch.tensor([0, 3])
    assert torch.equal(model(s, e, inc, cid)[0], loaded(s, e, inc, cid)[0])
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["weights_sha256"] == weights_hash(model.state_dict())
    assert manifest["provenance"] == {"data": "toy"}
    assert not list((tmp_path / "m").glob("*.tmp")) and not list((tmp_path / "m").glob(".*"))


def test_loading_a_tampered_tensor_fails(tmp_path):
    save_model(tiny_model(), tmp_path, {})
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["ln_f.weight"][0] += 1e-3
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CalofmError, match="hash"):
        load_model(tmp_path)


def test_loading_a_missing_or_misshaped_tensor_fails(tmp_path):
    save_model(tiny_model(), tmp_path, {})
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["blocks.1.experts.ffn.2.fc1.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CalofmError, match="missing.*blocks.1.experts.ffn.2.fc1.bias"):
        load_model(tmp_path)
    tensors["blocks.1.experts.ffn.2.fc1.bias"] = torch.zeros(3)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CalofmError, match="the model expects"):
        load_model(tmp_path)


def test_loading_bad_directories_fails(tmp_path):
    with pytest.raises(CalofmError, match="no such model directory"):
        load_model(tmp_path / "absent")
    with pytest.raises(CalofmError, match="manifest"):
        load_model(tmp_path)
    save_model(tiny_model(), tmp_path, {})
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CalofmError, match="malformed"):
        load_model(tmp_path)
    save_model(tiny_model(), tmp_path, {})
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CalofmError, match="unreadable"):
        load_model(tmp_path)
