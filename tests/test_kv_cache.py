"""KV-cache decoding gives what a full forward pass over the same prefix gives, in every block."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_model import random_tokens, tiny_model, with_totals

from calofm.errors import CalofmError
from calofm.generation.engine import N_UNIFORMS, decode
from calofm.generation.sampler import SamplingConfig
from calofm.model.conditions import Conditions
from calofm.model.kv_cache import KVCache

ATOL = 1e-4


def used_at_end(model, s):
    """The voxels of the prefix ``s``, for a head that reads them."""
    return model.used_voxels(s)[:, -1:] if model.config.head_reads_used else None


def full_pass(model, s, e, inc, routing):
    """Hidden states of every block and both logits, for the last position of the prefix."""
    hidden = model.hidden_states(s, e, inc, routing)
    shift = model.energy_shift(Conditions.of(inc))
    ls, le = model.logits(hidden[-1][:, -1:], routing, used=used_at_end(model, s), shift=shift)
    return [h[:, -1] for h in hidden], ls[:, -1], le[:, -1]


def cached_step(model, s, e, start, routing, inc, used=None):
    hidden = model.hidden_states(s, e, inc if start == 0 else None, routing, start=start)
    shift = model.energy_shift(Conditions.of(inc))
    ls, le = model.logits(hidden[-1][:, -1:], routing, used=used, shift=shift)
    return [h[:, -1] for h in hidden], ls[:, -1], le[:, -1]


def assert_steps_match(model, s, e, inc, cid, chunks):
    """Feed the tokens in ``chunks`` (lengths) through the cache; compare after every chunk."""
    routing = model.routing(cid)
    model.setup_cache(len(cid), s.shape[1])
    start = 0
    with torch.no_grad():
        for n in chunks:
            stop = start + n
            used = used_at_end(model, s[:, :stop])
            got = cached_step(model, s[:, start:stop], e[:, start:stop], start, routing, inc, used)
            want = full_pass(model, s[:, :stop], e[:, :stop], inc, routing)
            for block, (g, w) in enumerate(zip(got[0], want[0], strict=True)):
                diff = (g - w).abs().max().item()
                assert diff < ATOL, f"block {block} hidden state differs by {diff} at {stop}"
            for g, w in zip(got[1:], want[1:], strict=True):
                # impossible tokens are -inf in both; everything else within ATOL
                torch.testing.assert_close(g, w, atol=ATOL, rtol=0, msg=f"logits at {stop}")
            start = stop
    model.clear_cache()


def test_every_cached_step_matches_a_full_forward_pass():
    model = tiny_model()
    s, e, inc = random_tokens(model, 3, 24)
    assert_steps_match(model, s, e, inc, torch.tensor([0, 2, 1]), [1] * 24)


def test_prefill_of_several_tokens_then_steps_matches():
    model = tiny_model()
    s, e, inc = random_tokens(model, 2, 20)
    assert_steps_match(model, s, e, inc, torch.tensor([1, 1]), [5, 3, 1, 1, 4, 6])


def test_rows_that_stopped_at_different_steps_do_not_disturb_the_others():
    model = tiny_model()
    tok = model.tokenizer
    s, e, inc = random_tokens(model, 3, 20)
    # Row 0 ends after 4 hits, row 1 after 11; afterwards they are fed EOS then PAD, as in decode.
    for row, end in ((0, 5), (1, 12)):
        s[row, end], e[row, end] = tok.spatial_eos, tok.energy_eos
        s[row, end + 1 :], e[row, end + 1 :] = tok.spatial_pad, tok.energy_pad
    assert_steps_match(model, s, e, inc, torch.tensor([0, 1, 2]), [1] * 20)


def test_greedy_decoding_is_the_same_with_and_without_cache():
    model = tiny_model()
    inc = with_totals(model, torch.tensor([-0.9, 0.0, 0.8, 0.3]))
    cid = torch.tensor([0, 1, 2, 0])
    greedy = SamplingConfig(temperature=0)
    a = decode(model, inc, cid, greedy, 30, None, use_cache=True)
    b = decode(model, inc, cid, greedy, 30, None, use_cache=False)
    np.testing.assert_array_equal(a.n_hits, b.n_hits)
    np.testing.assert_array_equal(a.spatial, b.spatial)
    np.testing.assert_array_equal(a.energy, b.energy)


def test_sampled_decoding_is_the_same_with_and_without_cache():
    model = tiny_model()
    inc = with_totals(model, torch.tensor([-0.5, 0.5, 0.9]))
    cid = torch.tensor([2, 1, 0])
    u = torch.from_numpy(np.random.default_rng(3).random((3, 31, N_UNIFORMS)))
    a = decode(model, inc, cid, SamplingConfig(), 30, u, use_cache=True)
    b = decode(model, inc, cid, SamplingConfig(), 30, u, use_cache=False)
    np.testing.assert_array_equal(a.spatial, b.spatial)
    np.testing.assert_array_equal(a.energy, b.energy)


def test_cache_rejects_writes_beyond_its_length_and_other_batch_sizes():
    cache = KVCache(2, 2, 4, 8)
    k = torch.zeros(2, 2, 3, 8)
    keys, values = cache.update(0, k, k)
    assert keys.shape == (2, 2, 3, 8)
    with pytest.raises(CalofmError, match="do not fit"):
        cache.update(2, k, k)
    with pytest.raises(CalofmError, match="batch"):
        cache.update(0, torch.zeros(3, 2, 1, 8), torch.zeros(3, 2, 1, 8))
    assert cache.nbytes == 2 * 2 * 2 * 4 * 8 * 4


def test_cache_buffers_are_not_saved_with_the_weights():
    model = tiny_model()
    names = set(model.state_dict())
    assert model.setup_cache(2, 10) == model.config.n_blocks * 2 * 2 * 11 * 32 * 4
    assert set(model.state_dict()) == names
    model.clear_cache()
    assert model.cache_bytes() == 0
