"""The model design beyond the paper: factorised voxel head, conditions and shower state at every
position, voxels used once and falling energies, in the loss and in sampling alike."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_model import PAPER_DESIGN, random_tokens, tiny_model

from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.generation.engine import N_UNIFORMS, decode, generate
from calofm.generation.sampler import SamplingConfig
from calofm.model import CaloFM, ModelConfig, preset, with_overrides
from calofm.model.conditions import LOG_MEV_SCALE, Conditions
from calofm.model.heads import FactorisedVoxelHead, FlatVoxelHead
from calofm.tokens import TokenizerConfig

SMALL_DET = DetectorConfig(absorber_mm=(2.1,) * 4, nx=5, ny=6)
SMALL_TOK = TokenizerConfig.for_detector(SMALL_DET, scheme="log", n_bins=16, max_mev=20.0)


def head(kind: str, seed: int = 0) -> FlatVoxelHead | FactorisedVoxelHead:
    torch.manual_seed(seed)
    layers = torch.tensor(SMALL_DET.voxel_to_lxy(np.arange(SMALL_DET.n_voxels))[0])
    layers = torch.cat([layers, torch.full((3,), SMALL_DET.n_layers)])
    if kind == "flat":
        return FlatVoxelHead(16, SMALL_TOK, layers)
    return FactorisedVoxelHead(16, SMALL_TOK, SMALL_DET)


def small_model(seed: int = 0, **options) -> CaloFM:
    """The tiny preset with ``options``; without shower totals unless asked, so that each test
    sees the one option it checks (tests/test_totals.py checks the totals)."""
    torch.manual_seed(seed)
    config = dataclasses.replace(preset("tiny"), **{"totals": False, **options})
    return CaloFM(config, SMALL_TOK, SMALL_DET, ["G4_W:gamma", "G4_Ta:gamma"]).eval()


def shower_tokens(b: int, n_hits: int, seed: int = 0):
    """Valid sequences: distinct voxels, energy bins falling, SOS first and EOS last."""
    g = torch.Generator().manual_seed(seed)
    tok = SMALL_TOK
    s = torch.stack([torch.randperm(tok.n_voxels, generator=g)[:n_hits] for _ in range(b)])
    e = torch.randint(0, tok.n_bins, (b, n_hits), generator=g).sort(1, descending=True).values
    sos_s, sos_e = torch.full((b, 1), tok.spatial_sos), torch.full((b, 1), tok.energy_sos)
    eos_s, eos_e = torch.full((b, 1), tok.spatial_eos), torch.full((b, 1), tok.energy_eos)
    return torch.cat([sos_s, s, eos_s], 1), torch.cat([sos_e, e, eos_e], 1)


# ---- the factorised head ------------------------------------------------------------------------


def test_factorised_head_is_a_normalised_distribution_over_every_voxel_and_eos():
    h = torch.randn(3, 5, 16)
    scores = head("factorised").scores(h)
    assert scores.shape == (3, 5, SMALL_TOK.spatial_vocab)
    torch.testing.assert_close(torch.logsumexp(scores, -1), torch.zeros(3, 5), atol=1e-5, rtol=0)
    assert torch.isinf(scores[..., [SMALL_TOK.spatial_sos, SMALL_TOK.spatial_pad]]).all()


def test_factorised_log_likelihood_is_the_sum_of_its_three_parts():
    hd = head("factorised")
    h = torch.randn(2, 4, 16)
    target = torch.tensor([[0, 37, 119, SMALL_TOK.spatial_eos], [5, 6, 30, 89]])
    log_p = hd.log_prob(h, target)
    layer, x, y = hd._split(target)
    regular = target < SMALL_TOK.n_voxels
    lp_layer = torch.log_softmax(hd._layer_logits(h, None), -1)
    layer_class = torch.where(regular, layer, SMALL_DET.n_layers)
    parts = lp_layer.gather(-1, layer_class[..., None])[..., 0]
    parts = parts + regular * (
        torch.log_softmax(hd._x_logits(h, layer), -1).gather(-1, x[..., None])[..., 0]
        + torch.log_softmax(hd._y_logits(h, layer, x), -1).gather(-1, y[..., None])[..., 0]
    )
    torch.testing.assert_close(log_p, parts)
    torch.testing.assert_close(log_p, hd.scores(h).gather(-1, target[..., None])[..., 0])


@pytest.mark.parametrize("kind", ["flat", "factorised"])
def test_excluding_used_voxels_renormalises_over_the_voxels_left(kind):
    """log P(target | the shower's voxels excluded) is the full distribution with those voxels
    removed and renormalised; for the factorised head the y already taken in the target's
    (layer, x) row leave that row's y distribution."""
    hd = head(kind)
    tok, ny = SMALL_TOK, SMALL_DET.ny
    h = torch.randn(2, 6, 16)
    history = torch.tensor([[tok.spatial_sos, 13, 14, 3, 15, 40], [tok.spatial_sos, 7, 8, 2, 9, 1]])
    target = torch.tensor([[13, 14, 12, 15, 16, 17], [7, 8, 6, 9, 10, tok.spatial_eos]])
    got = hd.log_prob(h, target, history)
    log_p = torch.log_softmax(hd.scores(h).float(), -1)  # the full distribution
    for b in range(2):
        for j in range(6):
            t, used = int(target[b, j]), history[b, 1 : j + 1].tolist()
            if kind == "flat":
                keep = torch.ones(tok.spatial_vocab, dtype=torch.bool)
                keep[used] = False
                want = log_p[b, j, t] - torch.logsumexp(log_p[b, j][keep], 0)
            elif t == tok.spatial_eos:
                want = log_p[b, j, t]
            else:
                row = torch.arange(t // ny * ny, t // ny * ny + ny)
                p_row = log_p[b, j, row].exp().sum()
                taken = [v for v in used if v // ny == t // ny]
                removed = log_p[b, j, taken].exp().sum() / p_row
                want = log_p[b, j, t] - torch.log1p(-removed)
            torch.testing.assert_close(got[b, j], want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, hd.log_prob(h, target))  # the exclusion does bite here


@pytest.mark.parametrize("kind", ["flat", "factorised"])
def test_sampling_never_draws_a_used_voxel_even_in_full_rows_and_layers(kind):
    hd = head(kind)
    b, tok = 64, SMALL_TOK
    used = torch.zeros(b, tok.n_voxels, dtype=torch.bool)
    grid = used.view(b, SMALL_DET.n_layers, SMALL_DET.nx, SMALL_DET.ny)
    grid[:, 1] = True  # a full layer
    grid[:, 2, 3] = True  # a full row
    grid[:, 0, :, :4] = True  # most of a layer
    with torch.no_grad():  # make the used voxels the likeliest
        if kind == "flat":
            hd.bias[: tok.n_voxels][used[0]] += 10.0
        else:
            hd.layer.bias[1:3] += 10.0
    h = torch.randn(b, 16)
    for seed in range(20):
        u = torch.from_numpy(np.random.default_rng(seed).random((b, 3)))
        drawn = hd.sample(h, u, used, 1.0)
        regular = drawn < tok.n_voxels
        assert not used[torch.arange(b)[regular], drawn[regular]].any()
        assert torch.all(regular | (drawn == tok.spatial_eos))


# ---- conditioning and state ---------------------------------------------------------------------


def test_conditions_reach_every_position_directly_only_when_asked():
    s, e = shower_tokens(2, 6)
    for every in (True, False):
        model = small_model(condition_every_position=every, shower_state=False)
        routing = model.routing(torch.tensor([0, 1]))
        xs_a, _ = model._embed(s, e, _cond(torch.tensor([-0.5, 0.2])), routing, None)
        xs_b, _ = model._embed(s, e, _cond(torch.tensor([0.7, 0.9])), routing, None)
        changed = (xs_a - xs_b).abs().amax(-1) > 1e-6  # (B, 1 + T): prepended token first
        assert changed[:, 0].all()
        assert bool(changed[:, 1:].all()) is every
    # and through the blocks the logits of every position move with the incident energy
    model = small_model()
    ls_a, le_a = model(s, e, torch.tensor([-0.5, 0.2]), torch.tensor([0, 1]))
    ls_b, le_b = model(s, e, torch.tensor([0.7, 0.9]), torch.tensor([0, 1]))
    assert ((ls_a - ls_b).nan_to_num().abs().amax(-1) > 1e-6).all()
    assert ((le_a - le_b).nan_to_num().abs().amax(-1) > 1e-6).all()


def _cond(incident: torch.Tensor) -> Conditions:
    return Conditions(incident)


def test_shower_state_changes_later_positions_only():
    model = small_model(condition_every_position=False, shower_state=True)
    routing = model.routing(torch.tensor([0]))
    s, e = shower_tokens(1, 8)
    e2 = e.clone()
    e2[0, 4] = max(int(e[0, 4]) - 3, 0)
    a, _ = model._embed(s, e, _cond(torch.tensor([0.1])), routing, None)
    b, _ = model._embed(s, e2, _cond(torch.tensor([0.1])), routing, None)
    differs = (a - b).abs().amax(-1)[0, 1:] > 1e-7  # drop the prepended conditions token
    # the energy token itself and every later position (deposited energy so far) change
    assert not differs[:4].any() and differs[4:].all()


def test_cached_decoding_carries_the_shower_state_between_steps():
    from test_kv_cache import assert_steps_match

    model = small_model()
    s, e = shower_tokens(3, 12, seed=2)
    assert_steps_match(
        model, s, e, torch.tensor([0.1, -0.3, 0.9]), torch.tensor([0, 1, 0]), [1] * 14
    )
    assert_steps_match(
        model, s, e, torch.tensor([0.1, -0.3, 0.9]), torch.tensor([1, 1, 0]), [4, 1, 9]
    )


def test_energy_left_per_hit_is_the_visible_energy_left_over_the_hits_left():
    with pytest.raises(CalofmError, match="energy_left_per_hit"):
        small_model(energy_left_per_hit=True)  # needs the totals it divides
    model = small_model(totals=True, energy_left_per_hit=True)
    cond = Conditions(torch.tensor([0.1, 0.5]), torch.tensor([10, 40]), torch.tensor([60.0, 900.0]))
    deposited, hits = torch.tensor([[0.0, 30.0], [0.0, 899.95]]), torch.tensor([[0.0, 4], [0, 39]])
    state = model._state(deposited, hits, cond, torch.float32)
    assert state.shape == (2, 2, 5)
    per_hit = torch.tensor([[6.0, 5.0], [22.5, 0.1]])  # MeV left / hits left; never below 0.1
    torch.testing.assert_close(state[..., 4], torch.log(per_hit / 0.1) / LOG_MEV_SCALE)
    # the decode step's (B,) form gives the same features as the full pass's (B, t) form
    torch.testing.assert_close(
        model._state(deposited[:, 1], hits[:, 1], cond, torch.float32), state[:, 1]
    )


# ---- constraints in the loss and in generation ---------------------------------------------------


def test_falling_energy_renormalises_the_energy_loss_over_bins_not_above_the_previous():
    model = small_model(falling_energy=True)
    s, e = shower_tokens(2, 7)
    inc, cid = torch.tensor([0.0, 0.5]), torch.tensor([0, 1])
    nll_e = model.loss(s, e, inc, cid)[2]
    free = dataclasses.replace(model.config, falling_energy=False)
    unconstrained = CaloFM(free, SMALL_TOK, SMALL_DET, model.classes).eval()
    unconstrained.load_state_dict(model.state_dict())
    _, le = unconstrained(s[:, :-1], e[:, :-1], inc, cid)
    want = []
    for b in range(2):
        for j in range(e.shape[1] - 1):
            logits = le[b, j].clone()
            prev = int(e[b, j])
            if prev < SMALL_TOK.n_bins:
                logits[prev + 1 : SMALL_TOK.n_bins] = float("-inf")
            if e[b, j + 1] != SMALL_TOK.energy_eos:  # single stop: the end is the voxel head's
                want.append(-torch.log_softmax(logits, 0)[e[b, j + 1]])
            else:
                want.append(torch.tensor(0.0))
    torch.testing.assert_close(nll_e, torch.stack(want).mean())


def test_generated_showers_never_repeat_a_voxel_and_their_energies_never_rise():
    model = small_model(seed=3, falling_energy=True)
    model.spatial_head.never_end()  # long showers: 110 of the 120 voxels, full rows and layers
    with torch.no_grad():
        model.energy_head.bias[SMALL_TOK.energy_eos] = -1e4
    b, n = 24, 110
    u = torch.from_numpy(np.random.default_rng(0).random((b, n + 1, N_UNIFORMS)))
    out = decode(model, torch.linspace(-1, 1, b), torch.arange(b) % 2, SamplingConfig(), n, u)
    assert np.all(out.n_hits == n)
    for row in range(b):
        n = out.n_hits[row]
        voxels, bins = out.spatial[row, :n], out.energy[row, :n]
        assert len(set(voxels.tolist())) == n
        assert np.all(np.diff(bins) <= 0)
    _, stats = generate(model, "G4_Ta:gamma", np.full(4, 3.0), seed=1, max_hits=n)
    assert stats["n_duplicates"] == 0 and stats["n_hits"] == 4 * n


def test_loss_of_the_new_design_trains_and_its_gradients_are_finite():
    model = small_model().train()
    s, e = shower_tokens(4, 9)
    total, nll_s, nll_e = model.loss(s, e, torch.rand(4) * 2 - 1, torch.tensor([0, 1, 0, 1]))
    total.backward()
    assert torch.isfinite(total) and nll_s > 0 and nll_e > 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ---- configuration ------------------------------------------------------------------------------


def test_model_options_are_set_by_name_with_their_types_and_refused_when_unknown():
    config = with_overrides(
        preset("small"),
        [
            "voxel_head=flat",
            "voxel_occupancy=false",
            "ring_occupancy=false",
            "centre_occupancy=false",
            "own_occupancy=false",
            "full_rings=false",
            "falling_energy=false",
            "d_model=64",
        ],
    )
    assert config.voxel_head == "flat" and not config.falling_energy and config.d_model == 64
    for bad in ("voxel_head=round", "falling_energy=maybe", "colour=red", "d_model"):
        with pytest.raises(CalofmError):
            with_overrides(preset("small"), [bad])


def test_the_paper_preset_keeps_the_paper_design_and_old_manifests_load_as_it():
    assert {k: getattr(preset("paper"), k) for k in PAPER_DESIGN} == PAPER_DESIGN
    old = {k: v for k, v in preset("small").to_dict().items() if k not in PAPER_DESIGN}
    assert {k: getattr(ModelConfig.from_dict(old), k) for k in PAPER_DESIGN} == PAPER_DESIGN


def test_paper_design_model_still_decodes_like_its_full_forward():
    from test_kv_cache import assert_steps_match

    model = tiny_model(paper_design=True)
    s, e, inc = random_tokens(model, 2, 10)
    assert_steps_match(model, s, e, inc, torch.tensor([0, 2]), [1] * 10)


@pytest.mark.parametrize("single_stop", [True, False])
def test_one_stop_decision_keeps_the_shower_length_the_heads_predict(single_stop):
    """Both heads give end-of-sequence a probability of 0.1 at every step. With one stop decision
    (the voxel head's) showers last 1/0.1 - 1 = 9 hits on average; with two independent ones a
    shower ends when either says so, at 1 - 0.9^2 = 0.19 per step: 4.3 hits."""
    model = small_model(single_stop=single_stop, falling_energy=False)
    tok, head = SMALL_TOK, model.spatial_head
    with torch.no_grad():
        for linear in (head.layer, model.energy_head):
            linear.weight.zero_()
            linear.bias.zero_()
        n_layers, n_bins = SMALL_DET.n_layers, tok.n_bins
        head.layer.bias[n_layers] = float(np.log(0.1 / 0.9 * n_layers))
        model.energy_head.bias[tok.energy_eos] = float(np.log(0.1 / 0.9 * n_bins))
        model.energy_head.bias[[tok.energy_sos, tok.energy_pad]] = -1e4
    out, stats = generate(model, "G4_W:gamma", np.full(400, 3.0), seed=0, max_hits=100)
    lengths = out["G4_W:gamma"].n_hits
    want = 9.0 if single_stop else 0.81 / 0.19
    assert abs(lengths.mean() - want) < 4 * lengths.std() / np.sqrt(len(lengths))
    assert stats["n_truncated"] == 0


def test_with_one_stop_decision_the_energy_head_never_ends_a_shower_nor_learns_to():
    model = small_model()
    assert model.config.single_stop
    s, e = shower_tokens(2, 5)
    _, le = model(s[:, :-1], e[:, :-1], torch.tensor([0.1, 0.2]), torch.tensor([0, 1]))
    assert torch.isinf(le[..., SMALL_TOK.energy_eos]).all()
    model.loss(s, e, torch.tensor([0.1, 0.2]), torch.tensor([0, 1]))[0].backward()  # finite
    assert torch.isfinite(model.energy_head.weight.grad).all()


def test_transverse_state_is_the_energy_weighted_centre_of_the_hits_so_far():
    """Position k sees the hits 1..k's centre in x and y from the beam axis (tenths of a cell),
    weighted by their bins' energies; and the option needs the shower state."""
    with pytest.raises(CalofmError, match="transverse_state needs shower_state"):
        dataclasses.replace(preset("tiny"), shower_state=False, transverse_state=True)
    from calofm.model.inputs import LEAN_SCALE, _lean

    model = small_model(transverse_state=True)
    s, e = shower_tokens(2, 6, seed=2)
    moments = model._moments(s, e).cumsum(1)
    lean = _lean(moments, model.bin_mev[e].cumsum(1))
    det = SMALL_DET
    for b in range(2):
        for k in range(1, s.shape[1]):
            v = s[b, 1 : k + 1]
            keep = v < det.n_voxels
            w = model.bin_mev[e[b, 1 : k + 1]][keep]
            x = (v[keep] // det.ny) % det.nx - (det.nx - 1) / 2
            y = v[keep] % det.ny - (det.ny - 1) / 2
            want = LEAN_SCALE * torch.stack([(w * x).sum(), (w * y).sum()]) / w.sum()
            torch.testing.assert_close(lean[b, k], want, rtol=1e-5, atol=1e-5)
    assert (lean[:, 0] == 0).all()
