"""Reduced-precision decoding: the matrix products in bf16 or fp16, RoPE, attention scores, the KV
cache and sampling in fp32; the step stays close to the fp32 one; the choice reaches the file."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_generation_cli import command
from test_static_decode import sampled, totals_model

from calofm.cli import main
from calofm.data.formats import file_info
from calofm.errors import CalofmError
from calofm.generation.decoder import EngineConfig, StaticDecoder
from calofm.generation.sampler import SamplingConfig
from calofm.model.attention import apply_rope, attend

REDUCED = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", REDUCED)
def test_rope_and_attention_scores_stay_fp32_under_a_reduced_precision_autocast(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g).to(dtype) for _ in range(3))
    angles = torch.arange(9.0)[:, None] * torch.linspace(0.01, 1.0, 4)[None]
    with torch.autocast("cpu", dtype=dtype):
        rotated = apply_rope(q, angles.cos(), angles.sin())
        y = attend(q, k, v, is_causal=True)
    assert rotated.dtype == torch.float32 and y.dtype == torch.float32
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_reduced_precision_step_stays_close_to_the_fp32_step(precision):
    """Every step's hidden state of a bf16 / fp16 decode is within a few percent of fp32's, the
    same tokens fed (the drawn tokens may differ where two are nearly equally likely)."""
    model = totals_model()
    cond, cid, u = sampled(model, 3, 12)
    states = {}
    for name in ("fp32", precision):
        dec = StaticDecoder(model, cid, SamplingConfig(), 12, EngineConfig(precision=name))
        hidden = []
        step = model.decode_step

        def record(*args, step=step, hidden=hidden):
            h = step(*args)
            hidden.append(h.float().clone())
            return h

        model.decode_step = record
        try:
            with dec, torch.no_grad():
                dec.load(torch.arange(3).numpy(), cond, u)
                for _ in range(6):
                    dec._run(dec.max_len - 1)
                    dec.spatial.fill_(5)  # the same tokens fed in both precisions
                    dec.energy.fill_(7)
        finally:
            del model.decode_step
        states[name] = torch.stack(hidden)
    a, b = states["fp32"], states[precision]
    assert a.dtype == b.dtype == torch.float32
    rel = (a - b).norm() / a.norm()
    assert 0 < rel < 0.05, rel


def test_the_command_line_offers_the_decoders_precisions():
    from calofm.cli._args import PRECISION_CHOICES
    from calofm.generation.decoder import PRECISIONS

    assert PRECISION_CHOICES == tuple(PRECISIONS)


def test_an_unknown_precision_is_refused():
    with pytest.raises(CalofmError, match="precision"):
        EngineConfig(precision="fp8")


def test_generate_records_the_precision_it_decoded_in(model_dir, tmp_path):
    out = tmp_path / "bf16.h5"
    assert main(command(model_dir, out, "--precision", "bf16")) == 0
    assert file_info(out).metadata["generator"]["precision"] == "bf16"
