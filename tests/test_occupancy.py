"""The occupancy-aware factorised head: its sub-heads see how full the shower already is, with the
same features in the loss (from the token history) and in sampling (from the used-voxel grid)."""

from __future__ import annotations

import pytest
import torch
from test_design import SMALL_DET, SMALL_TOK, shower_tokens, small_model

from calofm.errors import CalofmError
from calofm.model import ModelConfig
from calofm.model.heads import FactorisedVoxelHead

D = 16


def occupancy_head(
    seed: int = 0,
    rings: bool = False,
    centre: bool = False,
    own: bool = False,
    layer_energy: bool = False,
    full_rings: bool = False,
    pull: bool = False,
) -> FactorisedVoxelHead:
    torch.manual_seed(seed)
    head = FactorisedVoxelHead(
        D,
        SMALL_TOK,
        SMALL_DET,
        True,
        rings,
        centre,
        own,
        layer_energy,
        full_rings,
        ModelConfig().centre_pull_reach if pull else None,
    )
    gates = (head.layer_gate, head.x_gate) if own else ()
    with torch.no_grad():  # make the occupancy weights large enough to matter
        for m in (head.layer_occ, head.x_occ, head.y_occ, *gates):
            m.weight.normal_(std=2.0)
    return head


def used_so_far(history: torch.Tensor) -> torch.Tensor:
    """(B, T, voxels): the voxels among inputs 1..j, per position j (a slow, obvious version)."""
    b, t = history.shape
    used = torch.zeros(b, t, SMALL_TOK.n_voxels, dtype=torch.bool)
    for i in range(b):
        for j in range(t):
            for v in history[i, 1 : j + 1].tolist():
                if v < SMALL_TOK.n_voxels:
                    used[i, j, v] = True
    return used


def test_occupancy_needs_the_factorised_head_and_voxels_used_once():
    with pytest.raises(CalofmError, match="voxel_occupancy"):
        ModelConfig(voxel_head="flat", exclude_used_voxels=True, voxel_occupancy=True)
    with pytest.raises(CalofmError, match="voxel_occupancy"):
        ModelConfig(voxel_head="factorised", exclude_used_voxels=False, voxel_occupancy=True)
    with pytest.raises(CalofmError, match="needs the history"):
        occupancy_head().log_prob(torch.randn(1, 3, D), torch.tensor([[1, 2, 3]]))
    with pytest.raises(CalofmError, match="needs the used voxels"):
        occupancy_head().scores(torch.randn(1, 3, D))


@pytest.mark.parametrize(
    "rings,centre,own,layer_energy,full_rings,pull",
    [
        (False, False, False, False, False, False),
        (True, False, False, False, False, False),
        (True, True, False, False, False, False),
        (False, False, True, False, False, False),
        (True, True, True, False, False, False),
        (True, True, True, True, False, False),
        (True, True, True, True, True, False),
        (True, True, True, False, True, True),
    ],
)
def test_training_log_likelihood_is_the_distribution_scored_from_the_used_voxels(
    rings, centre, own, layer_energy, full_rings, pull
):
    """log_prob's occupancy (one-hot sums over the history) is the one ``scores`` reads from the
    used-voxel mask, and the y already taken in the target's row are renormalised away."""
    hd = occupancy_head(
        rings=rings,
        centre=centre,
        own=own,
        layer_energy=layer_energy,
        full_rings=full_rings,
        pull=pull,
    )
    tok, ny = SMALL_TOK, SMALL_DET.ny
    s, _ = shower_tokens(2, 9, seed=4)
    history, target = s[:, :-1], s[:, 1:]
    h = torch.randn(2, history.shape[1], D)
    extra = {"energy": torch.rand(2, history.shape[1], SMALL_DET.n_layers)} if layer_energy else {}
    if pull:
        extra["centre"] = 0.5 * torch.randn(2, history.shape[1], 2)
    got = hd.log_prob(h, target, history, **extra)
    log_p = hd.scores(h, used=used_so_far(history), **extra)
    for b in range(2):
        for j in range(history.shape[1]):
            t, used = int(target[b, j]), history[b, 1 : j + 1].tolist()
            want = log_p[b, j, t]
            if t < tok.n_voxels:
                row = torch.arange(t // ny * ny, t // ny * ny + ny)
                taken = [v for v in used if v // ny == t // ny]
                removed = log_p[b, j, taken].exp().sum() / log_p[b, j, row].exp().sum()
                want = want - torch.log1p(-removed)
            torch.testing.assert_close(got[b, j], want, atol=1e-5, rtol=1e-5)


def test_the_distribution_moves_with_the_voxels_the_shower_has():
    hd = occupancy_head()
    h = torch.randn(1, D)
    empty = torch.zeros(1, SMALL_TOK.n_voxels, dtype=torch.bool)
    some = empty.clone()
    some[0, [0, 1, 7, 40]] = True
    a, b = hd.scores(h, used=empty), hd.scores(h, used=some)
    free = ~some[0]
    assert (a[0, : SMALL_TOK.n_voxels][free] - b[0, : SMALL_TOK.n_voxels][free]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "centre,own,layer_energy,full_rings,pull",
    [
        (False, False, False, False, False),
        (True, False, False, False, False),
        (True, True, False, False, False),
        (True, True, True, False, False),
        (True, True, False, True, False),
        (True, True, False, True, True),
    ],
)
def test_greedy_sampling_follows_the_scored_distribution_for_any_used_voxels(
    centre, own, layer_energy, full_rings, pull
):
    """Layer, then x, then y by argmax of the conditionals that ``scores`` multiplies, full layers
    and rows and taken voxels left out: sampling reads the occupancy the way training does."""
    hd = occupancy_head(
        seed=1,
        rings=centre,
        centre=centre,
        own=own,
        layer_energy=layer_energy,
        full_rings=full_rings,
        pull=pull,
    )
    b, tok, det = 16, SMALL_TOK, SMALL_DET
    used = torch.rand(b, tok.n_voxels, generator=torch.Generator().manual_seed(0)) < 0.3
    h = torch.randn(b, D)
    extra = {"energy": torch.rand(b, det.n_layers)} if layer_energy else {}
    if pull:
        extra["centre"] = 0.5 * torch.randn(b, 2)
    drawn = hd.sample(h, None, used, 0.0, **extra)
    lp = hd.scores(h, used=used, **extra)
    grid = used.view(b, det.n_layers, det.nx, det.ny)
    vox = lp[:, : tok.n_voxels].exp().view(grid.shape)
    for i in range(b):
        p_layer = torch.cat([vox[i].sum((1, 2)), lp[i, tok.spatial_eos].exp()[None]])
        p_layer[:-1].masked_fill_(grid[i].flatten(1).all(-1), 0.0)
        layer = int(p_layer.argmax())
        if layer == det.n_layers:
            assert int(drawn[i]) == tok.spatial_eos
            continue
        x = int(vox[i, layer].sum(-1).masked_fill(grid[i, layer].all(-1), 0.0).argmax())
        y = int(vox[i, layer, x].masked_fill(grid[i, layer, x], 0.0).argmax())
        assert int(drawn[i]) == (layer * det.nx + x) * det.ny + y


def test_layer_energy_is_each_layers_energy_so_far_over_the_last_hits():
    """The training features, from the token history, are what a decoder adds up hit by hit:
    every layer's energy after each position (a slow loop here), over the fed hit's energy."""
    with pytest.raises(CalofmError, match="layer_energy needs ring_occupancy"):
        ModelConfig(
            voxel_head="factorised",
            exclude_used_voxels=True,
            voxel_occupancy=True,
            layer_energy=True,
        )
    model = small_model(
        voxel_occupancy=True, ring_occupancy=True, own_occupancy=True, layer_energy=True
    )
    s, e = shower_tokens(2, 10, seed=5)
    got = model.layer_mev(s, e)
    n_layers, cells = SMALL_DET.n_layers, SMALL_DET.nx * SMALL_DET.ny
    for b in range(2):
        want = torch.zeros(n_layers)
        for j in range(s.shape[1]):
            v = int(s[b, j])
            if v < SMALL_TOK.n_voxels:
                want[v // cells] += model.bin_mev[e[b, j]]
            torch.testing.assert_close(got[b, j], want)
    features = model._layer_energy(got, e)["energy"]
    last = model.bin_mev[e].clamp(min=SMALL_TOK.threshold_mev)
    torch.testing.assert_close(features, torch.log1p(got / last[..., None]))
    loss = model.loss(s, e, torch.tensor([0.2, -0.4]), torch.tensor([0, 1]))[0]
    loss.backward()
    assert torch.isfinite(loss)
    assert model.spatial_head.layer_gate.weight.grad[-2:].abs().sum() > 0


def test_layer_energy_moves_only_the_logit_of_its_own_layer():
    """With the gate weighting the energy feature of a full core by -3, a layer whose core is
    taken and whose energy is e times the last hit's has its logit lowered by 3 log(1 + e)."""
    nx, ny, n_layers = SMALL_DET.nx, SMALL_DET.ny, SMALL_DET.n_layers
    cx, cy, layer = nx // 2, ny // 2, 1
    core = [(layer * nx + cx - 1 + i) * ny + cy - 1 + j for i in (0, 1) for j in (0, 1)]
    used = torch.zeros(1, SMALL_TOK.n_voxels, dtype=torch.bool)
    used[0, core] = True
    hd = occupancy_head(rings=True, own=True, layer_energy=True)
    with torch.no_grad():
        hd.layer_gate.weight.zero_()
        hd.layer_gate.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, -3.0]))
    energy = torch.log1p(torch.tensor([[4.0, 4.0, 9.0, 2.0]]))[:, :n_layers]
    occ = hd._used_occupancy(used, energy)[0].layers
    h = torch.randn(1, D)
    with_own = hd._layer_logits(h, None, occ)
    hd.own = False
    shift = with_own - hd._layer_logits(h, None, occ)
    want = torch.zeros(1, n_layers + 1)
    want[0, layer] = -3.0 * energy[0, layer]
    torch.testing.assert_close(shift, want)


@pytest.mark.parametrize("own", [False, True])
def test_a_model_with_occupancy_trains_and_decodes_with_its_cache(own):
    from test_kv_cache import assert_steps_match

    model = small_model(voxel_occupancy=True, ring_occupancy=own, own_occupancy=own, full_rings=own)
    s, e = shower_tokens(2, 10, seed=3)
    inc, cid = torch.tensor([0.2, -0.4]), torch.tensor([0, 1])
    loss = model.loss(s, e, inc, cid)[0]
    loss.backward()
    assert torch.isfinite(loss)
    assert model.spatial_head.x_occ.weight.grad.abs().sum() > 0
    assert model.spatial_head.layer_occ.weight.grad.abs().sum() > 0
    assert_steps_match(model, s, e, inc, cid, [1] * 12)


def test_ring_occupancy_tells_a_full_core_from_the_same_hit_count_elsewhere():
    """Four hits in a layer's 2 x 2 core and four hits in its halo give the layer head the same hit
    count but different inputs, and only with ring occupancy."""
    with pytest.raises(CalofmError, match="ring_occupancy"):
        ModelConfig(voxel_head="factorised", exclude_used_voxels=True, ring_occupancy=True)
    nx, ny = SMALL_DET.nx, SMALL_DET.ny
    cx, cy = nx // 2, ny // 2
    core = [(cx - 1 + i) * ny + cy - 1 + j for i in (0, 1) for j in (0, 1)]
    halo = [0, 1, ny, ny + 1]  # a corner of layer 0
    for rings, differs in ((False, False), (True, True)):
        hd = occupancy_head(rings=rings)
        occ = []
        for cells in (core, halo):
            used = torch.zeros(1, SMALL_TOK.n_voxels, dtype=torch.bool)
            used[0, cells] = True
            occ.append(hd._used_occupancy(used)[0].layers)
        assert (occ[0] != occ[1]).any().item() is differs
    assert hd._used_occupancy(used)[0].layers.shape[-1] == SMALL_DET.n_layers * 4


def test_full_rings_flag_a_full_core_but_not_one_with_a_free_cell():
    """A layer with every core cell taken gets its core's flag; its neighbour with one core cell
    free keeps the flag at 0, while its taken fraction is most of the full one's."""
    with pytest.raises(CalofmError, match="full_rings needs ring_occupancy"):
        ModelConfig(
            voxel_head="factorised", exclude_used_voxels=True, voxel_occupancy=True, full_rings=True
        )
    n_layers, cells = SMALL_DET.n_layers, SMALL_DET.nx * SMALL_DET.ny
    hd = occupancy_head(rings=True, full_rings=True)
    core = hd.features.ring_member[:, 0].nonzero()[:, 0].tolist()
    used = torch.zeros(1, SMALL_TOK.n_voxels, dtype=torch.bool)
    used[0, core] = True  # layer 0: full core
    used[0, [cells + v for v in core[:-1]]] = True  # layer 1: one core cell free
    layers = hd._used_occupancy(used)[0].layers[0]
    assert layers.shape[-1] == n_layers * (1 + 2 * 3)
    per_layer = layers[n_layers:].view(n_layers, 6)  # fractions of the three rings, then flags
    partial = (len(core) - 1) / len(core)
    torch.testing.assert_close(per_layer[:2, 0], torch.tensor([1.0, partial]))
    torch.testing.assert_close(per_layer[:, 3], (torch.arange(n_layers) == 0).float())
    assert (per_layer[:, 4:] == 0).all()


def test_centre_occupancy_tells_a_taken_core_cell_from_the_same_row_count_elsewhere():
    """A row with its core cell taken and a row with a cell taken at its edge have the same hit
    count; only with centre occupancy does the x head see which one can still take a core hit."""
    with pytest.raises(CalofmError, match="centre_occupancy"):
        ModelConfig(voxel_head="factorised", exclude_used_voxels=True, centre_occupancy=True)
    nx, ny = SMALL_DET.nx, SMALL_DET.ny
    row = nx // 2
    for centre, differs in ((False, False), (True, True)):
        hd = occupancy_head(centre=centre)
        occ = []
        for y in (ny // 2, 0):
            used = torch.zeros(1, SMALL_TOK.n_voxels, dtype=torch.bool)
            used[0, row * ny + y] = True
            occ.append(hd._used_occupancy(used)[0].rows)
        assert (occ[0] != occ[1]).any().item() is differs
    assert hd._used_occupancy(used)[0].rows.shape[-1] == nx * 5


def test_own_occupancy_moves_only_the_logit_of_the_layer_whose_core_is_full():
    """With the gate weighting the core's taken fraction by -5, filling one layer's 2 x 2 core
    lowers that layer's logit by 5 more than the mixing layer does, and no other layer's."""
    with pytest.raises(CalofmError, match="own_occupancy"):
        ModelConfig(voxel_head="factorised", exclude_used_voxels=True, own_occupancy=True)
    nx, ny, n_layers = SMALL_DET.nx, SMALL_DET.ny, SMALL_DET.n_layers
    cx, cy, layer = nx // 2, ny // 2, 2
    core = [(layer * nx + cx - 1 + i) * ny + cy - 1 + j for i in (0, 1) for j in (0, 1)]
    used = torch.zeros(1, SMALL_TOK.n_voxels, dtype=torch.bool)
    used[0, core] = True
    hd = occupancy_head(rings=True, own=True)
    with torch.no_grad():
        hd.layer_gate.weight.zero_()
        hd.layer_gate.bias.copy_(torch.tensor([0.0, -5.0, 0.0, 0.0]))
    occ = hd._used_occupancy(used)[0].layers
    h = torch.randn(1, D)
    with_own = hd._layer_logits(h, None, occ)
    hd.own = False
    shift = with_own - hd._layer_logits(h, None, occ)
    want = torch.zeros(1, n_layers + 1)
    want[0, layer] = -5.0
    torch.testing.assert_close(shift, want)


def test_turning_occupancy_off_names_every_option_that_needs_it_in_one_line():
    import dataclasses

    from calofm.model.config import preset

    with pytest.raises(CalofmError) as info:
        dataclasses.replace(preset("small"), voxel_occupancy=False)
    message = str(info.value)
    assert "\n" not in message
    for name in ("ring_occupancy", "centre_occupancy", "own_occupancy", "full_rings"):
        assert f"{name}=false" in message


def test_adapters_on_a_layer_energy_base_keep_its_classes_and_use_the_features():
    """A particle's own voxel head gets the layer energy features in scoring, in the loss and in
    sampling; the base classes' logits stay bit-identical."""
    import dataclasses

    import numpy as np
    from test_adapters import BASE, DET, PB_GAMMA, TOKENS, W_ELECTRON, assert_equal, logits, trained
    from test_adapters import tokens as adapter_tokens

    from calofm.generation.engine import generate
    from calofm.model import CaloFM
    from calofm.model.config import preset

    torch.manual_seed(0)
    config = dataclasses.replace(preset("tiny"), layer_energy=True)
    base = CaloFM(config, TOKENS, DET, BASE).eval()
    before = logits(base, BASE)
    model = trained(base, PB_GAMMA, W_ELECTRON)
    assert_equal(logits(model, BASE), before)
    classes = ["G4_W:gamma", "G4_W:e-", "G4_Pb:gamma"]
    spatial, _ = logits(model, classes)
    assert torch.isfinite(spatial[..., : TOKENS.n_voxels]).any()
    s, e, cond = adapter_tokens(3)
    ids = torch.tensor([model.class_index(c) for c in classes])
    assert torch.isfinite(model.loss(s, e, cond, ids)[0])
    showers, _ = generate(model, classes[1:], np.array([2.0, 3.0]), seed=0, max_hits=12)
    assert all(len(showers[c]) == 1 for c in classes[1:])
