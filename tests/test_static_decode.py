"""The static decode step: the same hidden states and tokens as the full model whatever the
engine (eager, compiled, CUDA graphs), rows at their own positions, continuous batching."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_model import random_tokens, tiny_model

from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.generation.decoder import N_UNIFORMS, EngineConfig, StaticDecoder
from calofm.generation.engine import decode, generate
from calofm.generation.sampler import SamplingConfig
from calofm.model import CaloFM
from calofm.model.conditions import Conditions
from calofm.model.config import preset
from calofm.model.linear import Linear, can_prepack, prepacked
from calofm.model.sampling import BLOCK, _inverse_cdf
from calofm.tokens import TokenizerConfig

CUDA = torch.cuda.is_available()


def totals_model(scheme: str = "linear", **options: bool) -> CaloFM:
    torch.manual_seed(0)
    det = DetectorConfig()
    tok = TokenizerConfig.for_detector(det, scheme=scheme, n_bins=64, max_hits=40)
    config = dataclasses.replace(preset("tiny"), totals=True, **options)
    return CaloFM(config, tok, det, ["G4_W:gamma", "G4_Pb:gamma"]).eval()


def conditions(model: CaloFM, incident: Conditions | torch.Tensor) -> Conditions:
    """The conditions the model needs; a model with totals gets hit counts of 7, 8, ..."""
    cond = Conditions.of(incident)
    if model.config.totals and not cond.has_totals:
        b = len(cond)
        cond = cond.with_totals(torch.arange(b) + 7, torch.linspace(50.0, 900.0, b))
    return cond


@pytest.mark.parametrize(
    "make",
    [
        tiny_model,
        totals_model,
        lambda: totals_model(energy_left_per_hit=True),
        lambda: totals_model(ring_occupancy=True),
        lambda: totals_model(ring_occupancy=True, centre_occupancy=True),
        lambda: totals_model(ring_occupancy=True, full_rings=True),
        lambda: totals_model(transverse_state=True),
        lambda: totals_model("log", relative_energy=True),
        lambda: tiny_model(paper_design=True),
    ],
)
def test_decode_step_at_per_row_positions_matches_a_full_forward_pass(make):
    """Rows at different positions (as under continuous batching, row 1 starting late) get the
    hidden state of a full causal pass over their own prefix, with every model option."""
    model = make()
    b, t = 3, 12
    s, e, inc = random_tokens(model, b, t)
    cond = conditions(model, inc)
    cid = torch.tensor([0, 1, 0])
    routing = model.routing(cid)
    with torch.no_grad():
        want = model.hidden_states(s, e, cond, routing)[-1]  # (B, t, d): token k at position k+1
    start = torch.tensor([0, 4, 1])  # the step at which each row feeds its conditions token
    keys = torch.arange(t + 2)
    cos, sin = model.rope(keys)
    model.setup_cache(b, t + 1)
    try:
        for step in range(t + 1 + int(start.max())):
            pos = (step - start).clamp(0, t)
            k = (pos - 1).clamp(min=0)
            rows = torch.arange(b)
            mask = (keys[: int(pos.max()) + 1] <= pos[:, None])[:, None, None, :]
            rope = (cos[pos][:, None, None, :], sin[pos][:, None, None, :])
            with torch.no_grad():
                h = model.decode_step(s[rows, k], e[rows, k], pos, cond, routing, rope, mask)
            for r in range(b):
                if 1 <= int(pos[r]) and step - int(start[r]) <= t:
                    diff = (h[r] - want[r, int(k[r])]).abs().max().item()
                    assert diff < 1e-4, f"row {r} token {int(k[r])} differs by {diff}"
    finally:
        model.clear_cache()


def sampled(model: CaloFM, b: int, n: int, seed: int = 3):
    inc = torch.linspace(-0.9, 0.9, b)
    cid = torch.arange(b) % len(model.classes)
    u = torch.from_numpy(np.random.default_rng(seed).random((b, n + 1, N_UNIFORMS)))
    return conditions(model, inc), cid, u


def assert_same(a, b) -> None:
    np.testing.assert_array_equal(a.n_hits, b.n_hits)
    np.testing.assert_array_equal(a.spatial, b.spatial)
    np.testing.assert_array_equal(a.energy, b.energy)
    np.testing.assert_array_equal(a.truncated, b.truncated)


def layer_energy_model(**options) -> CaloFM:
    """A model whose layer head leans on the layer energy features (weights large enough to
    change the draws), so that the decoder's running sums are checked against the history's."""
    model = totals_model(layer_energy=True, **options)
    head = model.spatial_head
    with torch.no_grad():
        for m in (head.layer_occ, head.layer_gate):
            m.weight.normal_(std=2.0, generator=torch.Generator().manual_seed(1))
    return model


def centre_pull_model() -> CaloFM:
    """A model whose x and y heads lean on the shower's centre (gates large enough to change the
    draws), so that the decoder's running centre is checked against the history's."""
    model = totals_model(centre_pull=True)
    head = model.spatial_head
    with torch.no_grad():
        for m in (head.x_pull, head.y_pull):
            m.weight.normal_(std=2.0, generator=torch.Generator().manual_seed(1))
    return model


@pytest.mark.parametrize(
    "make",
    [
        tiny_model,
        totals_model,
        layer_energy_model,
        lambda: layer_energy_model(full_rings=True),
        centre_pull_model,
    ],
)
def test_static_decode_draws_the_tokens_of_recomputation(make):
    """Sampled, with a dynamic temperature: the static step and recomputing the whole prefix draw
    the same tokens, and a model with totals stops every row at its drawn hit count."""
    model = make()
    cond, cid, u = sampled(model, 4, 30)
    sampling = SamplingConfig(dynamic_temperature=(0.9, 1.2))
    a = decode(model, cond, cid, sampling, 30, u, engine=EngineConfig(check_every=3))
    b = decode(model, cond, cid, sampling, 30, u, use_cache=False)
    assert_same(a, b)
    if model.config.totals:
        np.testing.assert_array_equal(a.n_hits, cond.n_hits.numpy())


def test_the_stop_check_interval_changes_the_steps_run_but_not_the_showers():
    model = tiny_model()
    cond, cid, u = sampled(model, 3, 25)
    every = [decode(model, cond, cid, SamplingConfig(), 25, u, engine=EngineConfig(check_every=k))
             for k in (1, 4, 50)]  # fmt: skip
    for other in every[1:]:
        assert_same(every[0], other)
    longest = every[0].steps
    assert every[0].engine_steps == longest + 1  # the conditions token, then one step per token
    assert every[1].engine_steps == -(-(longest + 1) // 4) * 4


def test_windows_of_a_fixed_step_give_the_tokens_of_exact_windows():
    model = tiny_model()
    cond, cid, u = sampled(model, 3, 20)
    a = decode(model, cond, cid, SamplingConfig(), 20, u)
    b = decode(model, cond, cid, SamplingConfig(), 20, u, engine=EngineConfig(window_step=64))
    assert_same(a, b)


def test_compiled_step_draws_the_tokens_of_the_eager_step(monkeypatch):
    """torch.compile's tracing of the step (graph breaks, guards, in-place buffer updates) with the
    aot_eager backend, which runs in seconds; the inductor backend is measured by the benchmark."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    model = tiny_model()
    cond, cid, u = sampled(model, 3, 12)
    a = decode(model, cond, cid, SamplingConfig(), 12, u)
    b = decode(
        model, cond, cid, SamplingConfig(), 12, u, engine=EngineConfig.for_device("compile", "cpu")
    )
    assert_same(a, b)


@pytest.mark.parametrize(
    ("paper_design", "rows"),
    [(True, 3), (True, 1), (False, 3)],
    ids=["flat-head", "flat-head-one-row", "shipped-design"],
)
def test_compiled_step_with_packed_heads_draws_the_tokens_of_the_eager_step(
    monkeypatch, paper_design, rows
):
    """Inductor itself (the CPU engine users get with --engine compile): oneDNN-packed heads are
    an operator it cannot lower, so they reach it as the opaque ``calofm::packed_linear`` (one
    row: as a reduction it fuses); the occupancy's row counts reach it as
    ``calofm::row_counts``."""
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor needs a C++ compiler")
    monkeypatch.setattr("calofm.model.linear.PACK_MIN_WEIGHTS", 1000)  # the tiny heads too
    model = tiny_model(paper_design=paper_design)
    model.spatial_head.never_end()
    assert can_prepack(model.spatial_head if paper_design else model.energy_head)
    cond, cid, u = sampled(model, rows, 6)
    a = decode(model, cond, cid, SamplingConfig(), 6, u)
    b = decode(
        model, cond, cid, SamplingConfig(), 6, u, engine=EngineConfig.for_device("compile", "cpu")
    )
    assert_same(a, b)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_draws_the_tokens_of_the_eager_step():
    """Showers of 70 hits (a flat head, EOS out of reach), so the replay moves from the first
    window's graph to the second's; conditions and uniforms are moved to the GPU on loading."""
    model = tiny_model(paper_design=True).cuda()
    model.spatial_head.never_end()
    cond, cid, u = sampled(model, 5, 70)
    eager = decode(model, cond, cid, SamplingConfig(), 70, u, engine=EngineConfig(window_step=64))
    graphs = EngineConfig.for_device("graphs", "cuda")
    assert_same(eager, decode(model, cond, cid, SamplingConfig(), 70, u, engine=graphs))
    assert int(eager.n_hits.min()) == 70


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_continuous_batching_with_graph_replay_gives_the_eager_showers():
    model = tiny_model(paper_design=True).cuda()
    energies = np.linspace(10, 100, 9)
    key = "G4_W:gamma"
    graphs = EngineConfig.for_device("graphs", "cuda")
    eager = EngineConfig(window_step=64)  # the windows the graphs use
    want = generate(model, key, energies, seed=2, batch_size=4, max_hits=30, engine=eager)[0][key]
    got = generate(model, key, energies, seed=2, batch_size=4, max_hits=30, engine=graphs)[0][key]
    np.testing.assert_array_equal(got.voxels, want.voxels)
    np.testing.assert_allclose(got.energies, want.energies, rtol=1e-6)


def test_graphs_need_cuda_and_unknown_engines_are_refused():
    if not CUDA:
        with pytest.raises(CalofmError, match="CUDA"):
            EngineConfig.for_device("graphs", "cpu")
    with pytest.raises(CalofmError, match="engine"):
        EngineConfig(engine="warp")
    with pytest.raises(CalofmError):
        EngineConfig(check_every=0)


@pytest.mark.parametrize("continuous", [False, True])
def test_a_shower_is_the_same_whatever_the_batch_and_refill_order(continuous):
    """Per-row streams: slots of 2, 3 or 7 rows refill in different orders; every shower is the
    one a batch holding all rows draws."""
    model = tiny_model()
    energies = np.linspace(10, 100, 7)
    key = "G4_W:gamma"
    want = generate(model, key, energies, seed=4, batch_size=7, max_hits=25)[0][key]
    for batch in (2, 3):
        got, stats = generate(
            model, key, energies, seed=4, batch_size=batch, max_hits=25, continuous=continuous
        )
        got = got[key]
        np.testing.assert_array_equal(got.offsets, want.offsets)
        np.testing.assert_array_equal(got.voxels, want.voxels)
        # drawn visible energies (totals) may differ by round-off in batched matrix products
        np.testing.assert_allclose(got.energies, want.energies, rtol=1e-6)
        assert stats["continuous"] is continuous


@pytest.mark.parametrize("batch", [2, 5, 9])
def test_classes_decode_side_by_side_and_each_shower_is_its_rows(batch):
    """Rows of two classes decode in one batch, each class in its own slots: whatever the batch,
    every shower is the one its row draws, and the steps are those of one class, not a sum."""
    model = tiny_model()
    classes = [model.classes[r % 2] for r in range(9)]
    energies = np.linspace(10, 100, 9)
    kw = dict(seed=3, max_hits=12, engine=EngineConfig(check_every=1))
    want, together = generate(model, classes, energies, batch_size=9, **kw)
    got, stats = generate(model, classes, energies, batch_size=batch, **kw)
    for name in model.classes[:2]:
        np.testing.assert_array_equal(got[name].offsets, want[name].offsets)
        np.testing.assert_array_equal(got[name].voxels, want[name].voxels)
        np.testing.assert_allclose(got[name].energies, want[name].energies, rtol=1e-6)
    alone = [
        generate(model, name, energies[:5], batch_size=5, **kw)[1]["steps"]
        for name in model.classes[:2]
    ]
    assert together["steps"] <= max(alone) + 1 < sum(alone)


def test_continuous_batching_needs_fewer_steps_when_lengths_vary():
    """One long shower holds a lockstep batch back; with refills the short ones go on."""
    model = tiny_model(paper_design=True)
    with torch.no_grad():  # a shower ends with probability ~1/15 at every step: lengths vary
        model.spatial_head.bias[model.tokenizer.spatial_eos] = 7.5
    energies = np.full(12, 50.0)
    kw = dict(seed=1, batch_size=4, max_hits=40, engine=EngineConfig(check_every=1))
    _, lockstep = generate(model, "G4_W:gamma", energies, continuous=False, **kw)
    _, refilled = generate(model, "G4_W:gamma", energies, continuous=True, **kw)
    assert lockstep["n_hits"] == refilled["n_hits"]
    assert refilled["steps"] < lockstep["steps"]


def test_finished_rows_stop_advancing_and_free_their_slots():
    model = tiny_model()
    cond, cid, u = sampled(model, 2, 6)
    with StaticDecoder(model, cid, SamplingConfig(), 6) as dec:
        dec.load(np.arange(2), cond, u)
        dec.run(20)
        out = dec.finished()
        assert sorted(out.slots.tolist()) == [0, 1] and dec.busy() == 0
        assert int(dec.pos.max()) <= 7  # never past the cache
        assert len(dec.finished().slots) == 0  # read out once
        assert dec.kv_cache_bytes_per_shower() * 2 == model.cache_bytes()
    assert model.cache_bytes() == 0


def test_prepacked_heads_give_the_logits_of_plain_ones_and_are_dropped_after():
    layer = Linear(256, 5000).eval()
    if not can_prepack(layer):
        pytest.skip("oneDNN weight packing is not available in this torch build")
    x = torch.randn(16, 1, 256)
    with torch.no_grad():
        want = F.linear(x, layer.weight, layer.bias)
        with prepacked(layer, 16) as n:
            got = layer(x)
            assert n == 1 and layer.packed is not None
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert layer.packed is None
    small = Linear(64, 64)
    with prepacked(small, 4) as n:
        assert n == 0 and small.packed is None  # small layers are faster unpacked


@pytest.mark.parametrize("rows", [1, 3])
def test_compiled_prepacked_layer_gives_the_products_of_a_plain_one(rows):
    """One row in a compiled step is a row-wise reduction, more rows the packed operator."""
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor needs a C++ compiler")
    layer = Linear(256, 5000).eval()
    if not can_prepack(layer):
        pytest.skip("oneDNN weight packing is not available in this torch build")
    x = torch.randn(rows, 1, 256)
    with torch.no_grad(), prepacked(layer, rows):
        got = torch.compile(layer, fullgraph=True)(x)
        want = F.linear(x, layer.weight, layer.bias)
    assert got.shape == (rows, 1, 5000)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_two_level_search_draws_what_one_cumulative_sum_draws():
    g = torch.Generator().manual_seed(0)
    for v in (5 * BLOCK + 17, 8 * BLOCK):
        w = torch.rand(64, v, generator=g) ** 8
        w[:, ::3] = 0  # masked entries
        u = torch.rand(64, dtype=torch.float64, generator=g)
        cdf = w.double().cumsum(-1)
        want = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)[:, 0]
        got = _inverse_cdf(w, u)
        assert (got == want).float().mean() > 0.99  # a few may differ by round-off at edges
        assert bool((w.gather(1, got[:, None]) > 0).all())
    edge = torch.zeros(2, 6 * BLOCK)
    edge[:, 3] = edge[:, -3] = 1.0
    u = torch.tensor([0.0, 1 - 2**-53], dtype=torch.float64)
    assert _inverse_cdf(edge, u).tolist() == [3, 6 * BLOCK - 3]
