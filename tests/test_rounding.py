"""GPTQ rounding of transformed path weights (``weight_rounding: gptq``)."""

from __future__ import annotations

import torch

from splitq_modifier.quant import quantize_sym
from splitq_modifier.rounding import HessianAccumulator, gptq_round


def test_diagonal_hessian_gives_round_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(16, 48)
    clip = torch.full((16, 1), 0.9)
    codes, scale = gptq_round(w, torch.eye(48) * 3.0, 4, clip)
    ref, ref_scale = quantize_sym(w, 4, clip)
    assert torch.equal(codes, ref.to(torch.int8))
    torch.testing.assert_close(scale, ref_scale.squeeze(1), rtol=0, atol=0)


def test_gptq_lowers_output_error_on_correlated_inputs():
    torch.manual_seed(1)
    x = torch.randn(512, 32) @ torch.randn(32, 64)  # strongly correlated input channels
    w = torch.randn(24, 64)
    acc = HessianAccumulator()
    for chunk in x.split(100):
        acc.add(chunk)
    torch.testing.assert_close(acc.h, x.T @ x, rtol=1e-4, atol=1e-3)
    clip = torch.ones(24, 1)
    g_codes, g_scale = gptq_round(w, acc.normalized(), 3, clip)
    r_codes, r_scale = quantize_sym(w, 3, clip)
    assert g_codes.dtype == torch.int8 and int(g_codes.abs().max()) <= 4
    err = lambda q: float((x @ (w - q).T).pow(2).sum())  # noqa: E731
    assert err(g_codes.float() * g_scale[:, None]) < 0.7 * err(r_codes * r_scale)
