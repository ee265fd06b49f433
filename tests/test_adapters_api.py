"""The adapted model as an object: inspection is side-effect free, switching and unloading are
exact, save_model refuses it, and a particle adapter merges into a plain model."""

from __future__ import annotations

import inspect

import pytest
import torch
from test_adapters import BASE, PB_GAMMA, W_ELECTRON, assert_equal, base_model, logits, trained

from calofm.adapters import AdaptedModel, AdapterConfig
from calofm.errors import CalofmError
from calofm.model import load_model, model_hash, save_model
from calofm.model.experts import RowRouted

W_ELECTRON_LORA = AdapterConfig(
    particle="e-", rank=4, alpha=8.0, class_name="G4_W:e-", init_from="G4_W:gamma"
)
PB_ELECTRON_PLAIN = AdapterConfig(class_name="G4_Pb:e-", init_from="G4_W:e-")
ALL = [*BASE, "G4_Pb:gamma", "G4_W:e-"]


def snapshot(model: AdaptedModel) -> tuple:
    """Everything inspection could change: trainability, tensors, outputs, adapter states."""
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    outputs = [logits(model, [c] * 2) for c in model.classes]
    return grads, state, outputs, [a.enabled for a in model.adapters.values()]


def assert_same_snapshot(a: tuple, b: tuple) -> None:
    assert a[0] == b[0] and a[3] == b[3]
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    for x, y in zip(a[2], b[2], strict=True):
        assert_equal(x, y)


def test_describing_or_listing_an_adapted_model_changes_nothing():
    model = trained(base_model(), PB_GAMMA, W_ELECTRON)
    model.adapter("G4_Pb:gamma").parameters()[0].requires_grad_(False)  # a mix of flags
    model.disable(["G4_W:e-"])
    before = snapshot(model)
    description, listing = model.describe(), model.list_adapters()
    model.base_weights_hash()
    model.check_base()
    assert_same_snapshot(snapshot(model), before)
    assert description["base_weights_sha256"] == model.base_hash
    assert [a["name"] for a in description["adapters"]] == ["G4_Pb:gamma", "G4_W:e-"]
    assert [(a["kind"], a["enabled"]) for a in listing] == [
        ("expert", True),
        ("particle+expert", False),
    ]
    assert listing[1]["n_parameters"] == model.adapter("G4_W:e-").counts()["total"]


def test_wrapping_freezes_the_base_and_unloading_gives_it_back_as_it_was():
    base = base_model()
    types = [type(m) for m in base.modules()]
    h = model_hash(base)
    model = trained(base, PB_GAMMA, W_ELECTRON)
    trainable = {id(p) for a in model.adapters.values() for p in a.parameters()}
    assert model.base is base
    assert all(p.requires_grad == (id(p) in trainable) for p in base.parameters())
    with pytest.raises(CalofmError, match="without adapters"):
        AdaptedModel(base)
    assert model.unload() is base
    assert [type(m) for m in base.modules()] == types and base.embed_adapters is None
    assert model_hash(base) == h and all(p.requires_grad for p in base.parameters())


def test_saving_an_adapted_model_with_save_model_is_refused_with_one_line(tmp_path):
    model = trained(base_model(), W_ELECTRON)
    for target in (model, model.base):
        with pytest.raises(CalofmError, match="save_model writes base models only") as err:
            save_model(target, tmp_path / "model", {})
        assert "\n" not in str(err.value)
    assert not (tmp_path / "model").exists()
    save_model(model.unload(), tmp_path / "model", {})  # the base alone saves as before


def test_enable_disable_round_trip_restores_the_base_bit_identically():
    base = base_model()
    want = {c: logits(base, [c] * 2) for c in BASE}
    model = trained(base, PB_GAMMA, W_ELECTRON_LORA)
    with torch.no_grad():  # the expert back to W gamma's: only LoRA and heads differ from it
        for block in model.blocks:
            block.experts.ffn[3].load_state_dict(block.experts.ffn[0].state_dict())
    adapted = {c: logits(model, [c] * 2) for c in ALL}
    model.disable()
    for c in BASE:
        assert_equal(logits(model, [c] * 2), want[c])
    assert_equal(logits(model, ["G4_W:e-"] * 2), want["G4_W:gamma"])  # LoRA and heads off
    model.enable()
    for c in ALL:
        assert_equal(logits(model, [c] * 2), adapted[c])
    model.disable(["G4_W:e-"])
    model.enable(["G4_W:e-"])
    with model.disabled(["G4_Pb:gamma"]):  # its conditioning off, every other adapter on
        for c in ALL:
            if c != "G4_Pb:gamma":
                assert_equal(logits(model, [c] * 2), adapted[c])
        assert not torch.equal(logits(model, ["G4_Pb:gamma"] * 2)[0], adapted["G4_Pb:gamma"][0])
    for c in ALL:
        assert_equal(logits(model, [c] * 2), adapted[c])


def test_a_merged_lora_model_gives_the_logits_of_the_unmerged_one(tmp_path):
    model = trained(base_model(), PB_GAMMA, W_ELECTRON_LORA, PB_ELECTRON_PLAIN)
    before = snapshot(model)
    merged = model.merge_lora("G4_W:e-")
    assert_same_snapshot(snapshot(model), before)  # the adapted model is left as it was
    assert merged.classes == ["G4_W:e-", "G4_Pb:e-"]
    classes = ["G4_W:e-", "G4_Pb:e-", "G4_W:e-"]
    for got, want in zip(logits(merged, classes), logits(model, classes), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    saved = save_model(merged, tmp_path / "merged", {})  # a plain model: saves and loads
    assert_equal(logits(load_model(saved), classes), logits(merged, classes))
    with pytest.raises(CalofmError, match="no LoRA to merge"):
        model.merge_lora("G4_Pb:gamma")
    bottlenecked = trained(base_model(), W_ELECTRON)
    with pytest.raises(CalofmError, match="cannot be merged into a plain model"):
        bottlenecked.merge_lora("G4_W:e-")


def _takes_routing(module: torch.nn.Module) -> bool:
    """Whether any of the module's operations has a ``routing`` parameter."""
    ops = ("forward", "scores", "log_prob", "sample", "mixture")
    return any(
        "routing" in inspect.signature(getattr(module, op)).parameters
        for op in ops
        if callable(getattr(module, op, None))
    )


def test_only_row_routed_modules_take_the_routing_and_the_base_heads_are_plain():
    """Of the modules that act on rows, one takes the routing exactly when it declares itself
    row-routed: the base model's projections and heads take none; an adapted model's LoRA and
    particle heads do. The blocks and their attention take it only to hand it on."""
    passing_on = {"Block", "Attention"}
    base = base_model()
    takers = {type(m).__name__ for m in base.modules() if _takes_routing(m)}
    assert takers == {"Experts", "ShowerTotals"} | passing_on
    adapted = trained(base_model(), PB_GAMMA, W_ELECTRON)
    for model in (base, adapted.base):
        for name, m in model.named_modules():
            if type(m).__name__ not in passing_on:
                assert _takes_routing(m) == isinstance(m, RowRouted), name
    wrapped = {type(m).__name__ for m in adapted.base.modules() if isinstance(m, RowRouted)}
    assert {"LoRALinear", "RoutedHead", "RoutedVoxelHead", "EmbeddingAdapters"} <= wrapped
