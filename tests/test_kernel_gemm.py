"""Kernel B (the GEMM over the packed weights, branch up-projections) under Triton's
interpreter; see ``tests/test_kernels.py`` for the tolerances."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from _kernel_sites import (
    N_TOKENS,
    OUT_TOL,
    QUANT_CASES,
    case_site,
    make_mask,
    make_site,
    make_x,
    op_args,
    ref_quantize,
)
from splitq_modifier.kernels import (
    site_gemm_triton,
    site_linear_triton,
)
from splitq_modifier.kernels.common import load_packed_kmajor, load_packed_rows

from splitq_modifier.runtime import (
    pack_path_weight,
    site_gemm_reference,
    site_transform_reference,
)


@triton.jit
def _unpack_kernel(p_ptr, out_ptr, out_t_ptr, N, K, stride_p, BITS: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    n = tl.arange(0, BLOCK_N)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        tile = load_packed_kmajor(p_ptr, n, n < N, stride_p, k0, K, BITS, BLOCK_K, BLOCK_N)
        m = (kk < K)[:, None] & (n < N)[None, :]
        tl.store(out_ptr + n[None, :] * K + kk[:, None], tile, mask=m)
        rows = load_packed_rows(p_ptr, n, n < N, stride_p, k0, K, BITS, BLOCK_K, BLOCK_N)
        tl.store(out_t_ptr + n[:, None] * K + kk[None, :], rows, mask=(n < N)[:, None] &
                 (kk < K)[None, :])  # fmt: skip


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_unpack_tiles(bits: int) -> None:
    """Both in-kernel unpackers read compressed-tensors' dense packing (k % 32 != 0)."""
    n, k = 5, 101
    qmax = 2 ** (bits - 1) - 1
    codes = torch.randint(-qmax - 1, qmax + 1, (n, k), dtype=torch.int8)
    packed = pack_path_weight(codes, bits)
    out, out_t = torch.zeros(n, k, dtype=torch.int8), torch.zeros(n, k, dtype=torch.int8)
    _unpack_kernel[(1,)](packed, out, out_t, n, k, packed.stride(0), BITS=bits, BLOCK_K=64,
                         BLOCK_N=8)  # fmt: skip
    assert torch.equal(out, codes)
    assert torch.equal(out_t, codes)


# --------------------------------------------------------------------------------------------
# Kernel B: GEMM over the concatenated weights, branch up-projections, bias
# --------------------------------------------------------------------------------------------
GEMM_CASES = [
    # case index (QUANT_CASES), w_bits, mask, bias, out_dtype
    (0, (4, 4, 4), "mixed", True, torch.float32),
    (1, (2, 3, 3), None, True, torch.bfloat16),
    (2, (3, 2, 4), "mixed", False, torch.float16),
    (3, (4, 4, 2), "vision", False, torch.float32),
    (4, (8, 4, 3), "text", True, torch.float32),
    (5, (8, 8, 8), None, False, torch.float32),
]


@pytest.mark.parametrize("gcase", GEMM_CASES)
def test_site_gemm(gcase) -> None:
    idx, w_bits, mask_kind, with_bias, out_dtype = gcase
    p, dtype = case_site(QUANT_CASES[idx], with_bias, w_bits, seed=idx + 10)
    x = make_x(N_TOKENS, p.d_in, dtype)
    xt = site_transform_reference(x, p)
    acts = ref_quantize(p, xt)
    mask = make_mask(mask_kind, N_TOKENS)
    y = site_gemm_triton(acts, p, mask, out_dtype)
    ref = site_gemm_reference(acts, p, mask, out_dtype)
    assert y.dtype == out_dtype and y.shape == (N_TOKENS, p.d_out)
    tol = OUT_TOL[out_dtype]
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol * ref.float().abs().max().item())


@pytest.mark.parametrize("row", [r for r in range(4)])
def test_site_gemm_gpu_configs(row, monkeypatch) -> None:
    """Each GPU block configuration (decode GEMV-style tile included) under the interpreter,
    on a 3-linear site whose segments do not align with the tiles."""
    import splitq_modifier.kernels.site_gemm as sg

    _max_n, bo, bt, bk, _w, _s = sg.SITE_GEMM_GPU_CONFIGS[row]
    cfg = {"BLOCK_O": bo, "BLOCK_T": bt, "BLOCK_K": bk, "num_warps": 4}
    monkeypatch.setattr(sg, "site_gemm_config", lambda n: dict(cfg))
    p = make_site((70, 33, 33), (8, 8, 300), ((8,), (8,), (15, 20)), (4, 3, 2), (4, 4, 4),
                  (5, 2, 3), (6, 3, 1), bias=True, seed=8)  # fmt: skip
    x = make_x(N_TOKENS, p.d_in, torch.bfloat16)
    xt = site_transform_reference(x, p)
    acts = ref_quantize(p, xt)
    mask = make_mask("mixed", N_TOKENS)
    y = sg.site_gemm_triton(acts, p, mask, torch.float32)
    ref = site_gemm_reference(acts, p, mask, torch.float32)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


def test_mac_rows_follow_text_mask() -> None:
    """Vision rows get no MAC term: they equal the output of the same site without MAC."""
    case = QUANT_CASES[0]
    p, _ = case_site(case)
    p_no_mac, _ = case_site(case)
    p_no_mac.mac = None
    x = make_x(N_TOKENS, p.d_in, torch.float32)
    mask = make_mask("mixed", N_TOKENS)
    y = site_linear_triton(*op_args(p, x, mask))
    y0 = site_linear_triton(*op_args(p_no_mac, x, mask))
    assert torch.equal(y[~mask], y0[~mask])
    assert not torch.allclose(y[mask], y0[mask])
