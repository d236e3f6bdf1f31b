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
    dense_to_mma,
    mma_weight_words,
    pack_mma_weight,
    pack_path_weight,
    site_gemm_reference,
    site_transform_reference,
    unpack_mma_weight,
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
# The MMA block packing of the path weights (format version 3)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_mma_pack_round_trip(bits: int) -> None:
    """Every width, whole and partial 64-code blocks; version-2 weights convert to the same."""
    qmax = 2 ** (bits - 1) - 1
    for k in (1, 31, 64, 96, 130):
        codes = torch.randint(-qmax - 1, qmax + 1, (7, k), dtype=torch.int8)
        packed = pack_mma_weight(codes, bits)
        assert packed.dtype == torch.int32 and packed.shape == (7, mma_weight_words(k, bits))
        assert packed.shape[1] == -(-k // 64) * (2 * bits if bits <= 4 else 16)
        assert torch.equal(unpack_mma_weight(packed, bits, k), codes)
        assert torch.equal(dense_to_mma(pack_path_weight(codes, bits), bits, k), packed)
    with pytest.raises(ValueError, match="words per row"):
        unpack_mma_weight(packed[:, :-1], bits, k)


def _layout_bytes(u: list[int], bits: int) -> list[int]:
    """One 64-code block's bytes, written out from the format's description (docs/format.md)
    code by code; ``u`` holds the stored (offset) codes."""
    if bits == 4:
        return [u[j] | (u[j + 32] << 4) for j in range(32)]
    if bits == 2:
        return [sum(u[j + 16 * s] << (2 * s) for s in range(4)) for j in range(16)]
    if bits == 3:
        a = [sum((u[j + 8 * s] & 3) << (2 * s) for s in range(4)) for j in range(8)]
        b = [sum((u[32 + j + 8 * s] & 3) << (2 * s) for s in range(4)) for j in range(8)]
        h = [sum((u[j + 8 * s] >> 2) << s for s in range(8)) for j in range(8)]
        return a + b + h
    return [v & 0xFF for v in u]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mma_pack_byte_layout(bits: int) -> None:
    """The stored bytes are the documented ones, block after block, the last block filled
    with code 0 (stored as the offset); words are little-endian."""
    qmax = 2 ** (bits - 1) - 1
    k = 100
    codes = torch.randint(-qmax - 1, qmax + 1, (3, k), dtype=torch.int8)
    off = 2 ** (bits - 1) if bits <= 4 else 0
    packed = pack_mma_weight(codes, bits)
    for row in range(3):
        u = [int(c) + off for c in codes[row]] + [off] * (128 - k)
        want = _layout_bytes(u[:64], bits) + _layout_bytes(u[64:], bits)
        words = [int(w) & 0xFFFFFFFF for w in packed[row]]
        got = [(w >> (8 * i)) & 0xFF for w in words for i in range(4)]
        assert got == want


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

    _max_n, bo, bt, bk, _w, _s, group = sg.SITE_GEMM_GPU_CONFIGS[row]
    cfg = {"BLOCK_O": bo, "BLOCK_T": bt, "BLOCK_K": bk, "GROUP_O": group, "num_warps": 4}
    monkeypatch.setattr(sg, "site_gemm_config", lambda n: dict(cfg))
    p = _three_linear_site((4, 3, 2))
    x = make_x(N_TOKENS, p.d_in, torch.bfloat16)
    xt = site_transform_reference(x, p)
    acts = ref_quantize(p, xt)
    mask = make_mask("mixed", N_TOKENS)
    y = sg.site_gemm_triton(acts, p, mask, torch.float32)
    ref = site_gemm_reference(acts, p, mask, torch.float32)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


def _three_linear_site(w_bits, seed=8):
    return make_site((70, 33, 33), (8, 8, 300), ((8,), (8,), (15, 20)), w_bits, (4, 4, 4),
                     (5, 2, 3), (6, 3, 1), bias=True, seed=seed)  # fmt: skip


@pytest.mark.parametrize("w_bits", [(4, 4, 4), (3, 2, 3), (2, 8, 2)])
def test_weight_layout_is_independent_of_the_tile(w_bits, monkeypatch) -> None:
    """One packed site, several K steps, output tiles and program groupings: every run
    equals the reference (the layout fixes nothing about the GPU tile)."""
    import splitq_modifier.kernels.site_gemm as sg

    p = _three_linear_site(w_bits)
    n = 40  # three token tiles of 16
    x = make_x(n, p.d_in, torch.float32)
    acts = ref_quantize(p, site_transform_reference(x, p))
    mask = make_mask("mixed", n)
    ref = site_gemm_reference(acts, p, mask, torch.float32)
    for bo, bk, group in ((64, 128, 1), (128, 256, 2), (64, 512, 3)):
        cfg = {"BLOCK_O": bo, "BLOCK_T": 16, "BLOCK_K": bk, "GROUP_O": group, "num_warps": 4}
        monkeypatch.setattr(sg, "site_gemm_config", lambda n, c=cfg: dict(c))
        y = sg.site_gemm_triton(acts, p, mask, torch.float32)
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


def test_code_sums_computed_when_absent() -> None:
    """Without ``qsum`` (a kernel A that does not return it) kernel B computes the sums."""
    p = _three_linear_site((4, 3, 2))
    x = make_x(N_TOKENS, p.d_in, torch.float32)
    acts = ref_quantize(p, site_transform_reference(x, p))
    y = site_gemm_triton(acts, p, None, torch.float32)
    y0 = site_gemm_triton({**acts, "qsum": None}, p, None, torch.float32)
    assert torch.equal(y, y0)


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
