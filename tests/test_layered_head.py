"""The layered voxel head: P(layer | hits per layer) P(x, y | layer), the cells a shower already has
leaving their layer's distribution, alike in the loss and in sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_design import SMALL_DET, SMALL_TOK, shower_tokens, small_model
from test_occupancy import used_so_far

from calofm.errors import CalofmError
from calofm.model import ModelConfig
from calofm.model.layered_head import LayeredVoxelHead

D = 16
CELLS = SMALL_DET.nx * SMALL_DET.ny


def layered_head(seed: int = 0) -> LayeredVoxelHead:
    torch.manual_seed(seed)
    head = LayeredVoxelHead(D, SMALL_TOK, SMALL_DET)
    with torch.no_grad():  # make the hits-per-layer weights large enough to matter
        head.layer_occ.weight.normal_(std=2.0)
    return head


def test_layered_head_needs_voxels_used_once():
    with pytest.raises(CalofmError, match="layered"):
        ModelConfig(voxel_head="layered", exclude_used_voxels=False)
    with pytest.raises(CalofmError, match="used voxels"):
        layered_head().sample(torch.randn(2, D), None, None, 0.0)


def test_layered_head_is_a_normalised_distribution_that_moves_with_the_hits_per_layer():
    hd = layered_head()
    h = torch.randn(3, D)
    empty = torch.zeros(3, SMALL_TOK.n_voxels, dtype=torch.bool)
    some = empty.clone()
    some[:, [0, 1, CELLS + 3]] = True
    for used in (empty, some):
        scores = hd.scores(h, used=used)
        assert scores.shape == (3, SMALL_TOK.spatial_vocab)
        torch.testing.assert_close(torch.logsumexp(scores, -1), torch.zeros(3), atol=1e-5, rtol=0)
        assert torch.isinf(scores[:, [SMALL_TOK.spatial_sos, SMALL_TOK.spatial_pad]]).all()
    n = SMALL_TOK.n_voxels
    assert (hd.scores(h, used=empty)[:, :n] - hd.scores(h, used=some)[:, :n]).abs().max() > 1e-3


def test_training_log_likelihood_removes_the_cells_taken_in_the_targets_layer():
    hd = layered_head()
    tok = SMALL_TOK
    s, _ = shower_tokens(2, 12, seed=5)
    history, target = s[:, :-1], s[:, 1:]
    h = torch.randn(2, history.shape[1], D)
    got = hd.log_prob(h, target, history)
    log_p = hd.scores(h, used=used_so_far(history))
    for b in range(2):
        for j in range(history.shape[1]):
            t, used = int(target[b, j]), history[b, 1 : j + 1].tolist()
            want = log_p[b, j, t]
            if t < tok.n_voxels:
                layer = torch.arange(t // CELLS * CELLS, t // CELLS * CELLS + CELLS)
                taken = [v for v in used if v // CELLS == t // CELLS]
                removed = log_p[b, j, taken].exp().sum() / log_p[b, j, layer].exp().sum()
                want = want - torch.log1p(-removed)
            torch.testing.assert_close(got[b, j], want, atol=1e-5, rtol=1e-5)


def test_greedy_sampling_follows_the_scored_distribution():
    hd = layered_head(seed=2)
    b, tok, det = 16, SMALL_TOK, SMALL_DET
    used = torch.rand(b, tok.n_voxels, generator=torch.Generator().manual_seed(1)) < 0.3
    used[:3, :CELLS] = True  # a full layer
    h = torch.randn(b, D)
    drawn = hd.sample(h, None, used, 0.0)
    lp = hd.scores(h, used=used)
    grid = used.view(b, det.n_layers, CELLS)
    vox = lp[:, : tok.n_voxels].exp().view(grid.shape)
    for i in range(b):
        p_layer = torch.cat([vox[i].sum(-1), lp[i, tok.spatial_eos].exp()[None]])
        p_layer[:-1].masked_fill_(grid[i].all(-1), 0.0)
        layer = int(p_layer.argmax())
        if layer == det.n_layers:
            assert int(drawn[i]) == tok.spatial_eos
            continue
        cell = int(vox[i, layer].masked_fill(grid[i, layer], 0.0).argmax())
        assert int(drawn[i]) == layer * CELLS + cell


def test_sampling_never_draws_a_used_voxel():
    hd = layered_head()
    b, tok = 64, SMALL_TOK
    used = torch.zeros(b, tok.n_voxels, dtype=torch.bool)
    used[:, CELLS : 2 * CELLS] = True  # a full layer
    used[:, :10] = True
    with torch.no_grad():  # make the used voxels the likeliest
        hd.layer.bias[:2] += 10.0
        hd.cell_out.bias[:10] += 10.0
    h = torch.randn(b, D)
    for seed in range(10):
        u = torch.from_numpy(np.random.default_rng(seed).random((b, 3)))
        drawn = hd.sample(h, u, used, 1.0)
        regular = drawn < tok.n_voxels
        assert not used[torch.arange(b)[regular], drawn[regular]].any()


def test_a_model_with_the_layered_head_trains_and_decodes_with_its_cache():
    from test_kv_cache import assert_steps_match

    model = small_model(
        voxel_head="layered",
        voxel_occupancy=False,
        ring_occupancy=False,
        centre_occupancy=False,
        own_occupancy=False,
        full_rings=False,
    )
    s, e = shower_tokens(2, 10, seed=3)
    inc, cid = torch.tensor([0.2, -0.4]), torch.tensor([0, 1])
    loss = model.loss(s, e, inc, cid)[0]
    loss.backward()
    assert torch.isfinite(loss)
    assert model.spatial_head.layer_occ.weight.grad.abs().sum() > 0
    assert_steps_match(model, s, e, inc, cid, [1] * 12)
