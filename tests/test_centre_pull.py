"""The centre pull: the x and y heads' logits get a gated product of the shower's energy-weighted
centre so far and each row's (column's) position, the same centre in the loss and in sampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_design import SMALL_DET, SMALL_TOK, shower_tokens, small_model

from calofm.errors import CalofmError
from calofm.model import ModelConfig
from calofm.model.heads import FactorisedVoxelHead

D = 16
REACH = ModelConfig().centre_pull_reach


def test_the_centre_pull_needs_the_factorised_head():
    with pytest.raises(CalofmError, match="centre_pull needs voxel_head=factorised"):
        ModelConfig(voxel_head="flat", centre_pull=True)
    head = FactorisedVoxelHead(D, SMALL_TOK, SMALL_DET, pull_reach=REACH)
    with pytest.raises(CalofmError, match="needs the shower's centre"):
        head.scores(torch.randn(2, D))


def test_the_pull_tilts_each_row_and_column_by_the_gate_times_the_centre_times_its_position():
    torch.manual_seed(0)
    head = FactorisedVoxelHead(D, SMALL_TOK, SMALL_DET, pull_reach=REACH)
    h = torch.randn(3, D)
    layer, x = torch.tensor([0, 1, 2]), torch.tensor([1, 0, 2])
    centre = torch.tensor([[0.5, -1.0], [0.0, 0.0], [2.0, 0.3]])
    zero = torch.zeros(3, 2)
    a = F.gelu(head.x_in(h) + head.x_layer(layer))
    tilt_x = head._x_logits(h, layer, None, centre) - head._x_logits(h, layer, None, zero)
    torch.testing.assert_close(tilt_x, head.x_pull(a) * centre[:, :1] * head.x_pos)
    a = F.gelu(head.y_in(h) + head.y_layer(layer) + head.y_x(x))
    tilt_y = head._y_logits(h, layer, x, None, centre) - head._y_logits(h, layer, x, None, zero)
    torch.testing.assert_close(tilt_y, head.y_pull(a) * centre[:, 1:] * head.y_pos)
    assert (tilt_x[1] == 0).all() and tilt_x[0].abs().sum() > 0  # no lean, no tilt


def test_the_centre_is_the_energy_weighted_centre_of_the_hits_so_far():
    model = small_model(centre_pull=True)
    s, e = shower_tokens(2, 6, seed=3)
    centre = model._centre(model.centre_sums(s, e))["centre"]
    det = SMALL_DET
    for b in range(2):
        for j in range(s.shape[1]):
            hits = [k for k in range(j + 1) if int(s[b, k]) < SMALL_TOK.n_voxels]
            if not hits:
                assert (centre[b, j] == 0).all()
                continue
            mev = torch.stack([model.bin_mev[e[b, k]] for k in hits])
            _, hx, hy = det.voxel_to_lxy(s[b, hits].numpy())
            offsets = torch.tensor([hx - (det.nx - 1) / 2, hy - (det.ny - 1) / 2]).T.float()
            want = (mev[:, None] * offsets).sum(0) / mev.sum()
            torch.testing.assert_close(centre[b, j], want)


def test_a_model_with_the_pull_trains_and_its_gates_get_gradients():
    model = small_model(centre_pull=True).train()
    s, e = shower_tokens(3, 8, seed=1)
    loss = model.loss(s, e, torch.tensor([0.1, -0.5, 0.7]), torch.tensor([0, 1, 0]))[0]
    loss.backward()
    for gate in (model.spatial_head.x_pull, model.spatial_head.y_pull):
        assert torch.isfinite(gate.weight.grad).all() and gate.weight.grad.abs().sum() > 0


def test_the_tilt_stops_growing_two_cells_from_the_axis():
    """An unclipped tilt ran away in generation (showers drifting to the grid's edge)."""
    from calofm.model.heads import _reach

    pos = _reach(30, REACH)
    assert pos[14] == -0.5 and pos[15] == 0.5 and pos[16] == 1.5
    assert (pos[17:] == REACH).all() and (pos[:13] == -REACH).all()
    with pytest.raises(CalofmError, match="centre_pull_reach must be positive"):
        ModelConfig(centre_pull_reach=0.0)
