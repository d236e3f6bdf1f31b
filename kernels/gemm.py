"""SplitQ GEMM over dense-packed 2/3/4/8-bit weights, with the low-rank up-projections fused in
the epilogue.

Hopper has no int4 tensor-core MMA, so each weight tile is unpacked to int8 in registers and fed
to an int8 ``tl.dot`` with int32 accumulation (DESIGN.md section 4).

One program computes a ``[BLOCK_M, BLOCK_N]`` tile of ``y`` (tokens x output channels):

* for each path p in (vision, text, main): ``acc_p = sum_k qx[:, k] * Wp[:, k]`` over the path's
  column range of ``qx`` (int32; zero iterations when the path is empty), then
  ``out += acc_p * s_p[n] * ws_p[o]`` (fp32), one accumulator and one scale pair per path;
* CWS: ``out += (hq @ L1^T) * sh[n] * l1_scale[o]`` (rank padded to a power of two >= 32);
* MAC: ``out += text_mask[n] ? (gq @ L3^T) * sg[n] * l3_scale[o] : 0``;
* ``+ bias``, cast to the output dtype.

Layouts: ``qx`` (N, d) int8 contiguous, paths at columns ``[0, kv)``, ``[kv, kv+kt)``,
``[kv+kt, d)``; ``sx`` (N, 3) fp32; each path weight is dense-packed int32 (d_out, words_p)
(compressed-tensors ``pack_to_int32(..., packed_dim=1)``), unpacked by ``common.load_packed_kmajor``
straight into a K-major ``[BLOCK_K, BLOCK_N]`` tile; ``hq`` (N, r1), ``gq`` (N, r2) int8; ``L1``
(d_out, ceil(r1*b/32)), ``L3`` (d_out, ceil(r2*b/32)) packed the same way; ``out`` (N, d_out).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import interpreting, load_packed_kmajor, pow2_at_least
from .quant import rank_pad


@triton.jit
def _path_acc(
    qx_ptr, q_row_off, row_mask, start, K, w_ptr, stride_w, cols, col_mask,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """int32 ``qx[:, start:start+K] @ W[cols, :K]^T`` for one path."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < K
        a = tl.load(
            qx_ptr + q_row_off[:, None] + (start + kk)[None, :],
            mask=row_mask[:, None] & kmask[None, :],
            other=0,
        )
        # [BLOCK_K, BLOCK_N], element (k, o) = W[o, k0 + k]; garbage at k >= K meets a == 0.
        b = load_packed_kmajor(w_ptr, cols, col_mask, stride_w, k0, K, BITS, BLOCK_K, BLOCK_N)
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _lowrank_up(
    c_ptr, s_ptr, w_ptr, stride_w, ws_ptr, R, rows, row_mask, cols, col_mask,
    BITS: tl.constexpr, R_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """fp32 ``(c @ L^T) * s[n] * ws[o]`` for a rank-R branch (c: (N, R) int8 codes)."""
    r = tl.arange(0, R_P)
    rmask = r < R
    c = tl.load(
        c_ptr + rows.to(tl.int64)[:, None] * R + r[None, :],
        mask=row_mask[:, None] & rmask[None, :],
        other=0,
    )
    w = load_packed_kmajor(w_ptr, cols, col_mask, stride_w, 0, R, BITS, R_P, BLOCK_N)
    acc = tl.dot(c, w)
    s = tl.load(s_ptr + rows, mask=row_mask, other=0.0)
    ws = tl.load(ws_ptr + cols, mask=col_mask, other=0.0)
    return acc.to(tl.float32) * s[:, None] * ws[None, :]


@triton.jit
def splitq_gemm_kernel(
    qx_ptr, sx_ptr, out_ptr, stride_out,
    wv_ptr, wt_ptr, wm_ptr, stride_wv, stride_wt, stride_wm, wsv_ptr, wst_ptr, wsm_ptr,
    hq_ptr, sh_ptr, l1_ptr, stride_l1, l1s_ptr, R1,
    gq_ptr, sg_ptr, l3_ptr, stride_l3, l3s_ptr, R2, mask_ptr,
    bias_ptr,
    N, D_OUT, KV, KT, KM,
    BITS_V: tl.constexpr, BITS_T: tl.constexpr, BITS_M: tl.constexpr,
    HAS_CWS: tl.constexpr, CWS_W_BITS: tl.constexpr, R1_P: tl.constexpr,
    HAS_MAC: tl.constexpr, MAC_W_BITS: tl.constexpr, R2_P: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """See the module docstring. Grid: ``(cdiv(N, BLOCK_M), cdiv(D_OUT, BLOCK_N))``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    col_mask = cols < D_OUT
    q_row_off = rows.to(tl.int64) * (KV + KT + KM)

    out = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # vision-outlier path
    acc = _path_acc(qx_ptr, q_row_off, row_mask, 0, KV, wv_ptr, stride_wv, cols, col_mask,
                    BITS_V, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    s = tl.load(sx_ptr + rows * 3 + 0, mask=row_mask, other=0.0)
    ws = tl.load(wsv_ptr + cols, mask=col_mask, other=0.0)
    out += acc.to(tl.float32) * s[:, None] * ws[None, :]
    # text-outlier path
    acc = _path_acc(qx_ptr, q_row_off, row_mask, KV, KT, wt_ptr, stride_wt, cols, col_mask,
                    BITS_T, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    s = tl.load(sx_ptr + rows * 3 + 1, mask=row_mask, other=0.0)
    ws = tl.load(wst_ptr + cols, mask=col_mask, other=0.0)
    out += acc.to(tl.float32) * s[:, None] * ws[None, :]
    # main path
    acc = _path_acc(qx_ptr, q_row_off, row_mask, KV + KT, KM, wm_ptr, stride_wm, cols, col_mask,
                    BITS_M, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    s = tl.load(sx_ptr + rows * 3 + 2, mask=row_mask, other=0.0)
    ws = tl.load(wsm_ptr + cols, mask=col_mask, other=0.0)
    out += acc.to(tl.float32) * s[:, None] * ws[None, :]

    if HAS_CWS:
        out += _lowrank_up(hq_ptr, sh_ptr, l1_ptr, stride_l1, l1s_ptr, R1, rows, row_mask, cols,
                           col_mask, CWS_W_BITS, R1_P, BLOCK_N)  # fmt: skip
    if HAS_MAC:
        dy = _lowrank_up(gq_ptr, sg_ptr, l3_ptr, stride_l3, l3s_ptr, R2, rows, row_mask, cols,
                         col_mask, MAC_W_BITS, R2_P, BLOCK_N)  # fmt: skip
        if HAS_MASK:
            is_text = tl.load(mask_ptr + rows, mask=row_mask, other=0) != 0
            dy = tl.where(is_text[:, None], dy, 0.0)
        out += dy
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]

    o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# Fixed GPU configs by token count (no autotuning: it needs a GPU and hides the choice).
# (max tokens, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). BLOCK_K >= 32 for int8 dots.
GEMM_GPU_CONFIGS = (
    (16, 16, 64, 128, 4, 3),
    (32, 32, 64, 128, 4, 3),
    (64, 64, 128, 64, 4, 3),
    (None, 128, 128, 64, 8, 3),
)


def gemm_config(n_tokens: int) -> dict:
    """Block sizes and launch options of :func:`splitq_gemm_kernel` for ``n_tokens`` rows."""
    if interpreting():
        return {
            "BLOCK_M": pow2_at_least(min(n_tokens, 64), 16),
            "BLOCK_N": 64,
            "BLOCK_K": 128,
            "num_warps": 4,
        }
    for max_n, bm, bn, bk, warps, stages in GEMM_GPU_CONFIGS:
        if max_n is None or n_tokens <= max_n:
            return {
                "BLOCK_M": bm,
                "BLOCK_N": bn,
                "BLOCK_K": bk,
                "num_warps": warps,
                "num_stages": stages,
            }
    raise AssertionError("unreachable")


def gemm_constexprs(
    w_bits, branch_bits, r1: int | None, r2: int | None, has_mask: bool, has_bias: bool
) -> dict:
    """The constexpr arguments of :func:`splitq_gemm_kernel` (shared with the compile check)."""
    return {
        "BITS_V": int(w_bits[0]),
        "BITS_T": int(w_bits[1]),
        "BITS_M": int(w_bits[2]),
        "HAS_CWS": r1 is not None,
        "CWS_W_BITS": int(branch_bits[0]),
        "R1_P": rank_pad(r1 or 1),
        "HAS_MAC": r2 is not None,
        "MAC_W_BITS": int(branch_bits[2]),
        "R2_P": rank_pad(r2 or 1),
        "HAS_MASK": bool(has_mask),
        "HAS_BIAS": bool(has_bias),
    }


def _nonempty(t: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a placeholder pointer where ``t`` is absent or holds no element."""
    return fallback if t is None or t.numel() == 0 else t


def splitq_gemm(
    qx: torch.Tensor,
    sx: torch.Tensor,
    w: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    w_scale: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    sizes,
    w_bits,
    hq: torch.Tensor | None = None,
    sh: torch.Tensor | None = None,
    l1: torch.Tensor | None = None,
    l1_scale: torch.Tensor | None = None,
    gq: torch.Tensor | None = None,
    sg: torch.Tensor | None = None,
    l3: torch.Tensor | None = None,
    l3_scale: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    branch_bits=(4, 4, 4, 4),
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Launch :func:`splitq_gemm_kernel`.

    Args:
        qx, sx: int8 (N, d) codes and fp32 (N, 3) per-path scales from the quantize kernel.
        w: packed int32 path weights ``(v, t, m)``, each (d_out, ceil(k_p * b_p / 32)).
        w_scale: fp32 per-output-channel scales ``(v, t, m)``, each (d_out,).
        sizes: ``(kv, kt, km)``.
        w_bits: per path weight bits.
        hq, sh, l1, l1_scale: CWS hidden codes/scales and packed up factor L1/scale, or None.
        gq, sg, l3, l3_scale: MAC hidden codes/scales and packed up factor L3/scale, or None.
        text_mask: (N,) bool (True = text), None = all text.
        bias: (d_out,) or None.
        branch_bits: ``(cws_w_bits, cws_act_bits, mac_w_bits, mac_act_bits)``.
        out_dtype: output dtype.

    Returns:
        (N, d_out) tensor of ``out_dtype``.
    """
    kv, kt, km = (int(k) for k in sizes)
    n = qx.shape[0]
    d_out = int(w_scale[2].numel())
    dev = qx.device
    out = torch.empty((n, d_out), dtype=out_dtype, device=dev)
    if n == 0 or d_out == 0:
        return out
    has_cws, has_mac = l1 is not None, l3 is not None
    r1 = int(hq.shape[1]) if has_cws else None
    r2 = int(gq.shape[1]) if has_mac else None
    f32 = sx  # placeholder pointers for absent tensors (never dereferenced)
    wv, wt, wm = (_nonempty(t, qx) for t in w)
    mask_u8 = None if text_mask is None else text_mask.reshape(-1).to(torch.bool).view(torch.uint8)
    cfg = gemm_config(n)
    const = gemm_constexprs(w_bits, branch_bits, r1, r2, mask_u8 is not None, bias is not None)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(d_out, cfg["BLOCK_N"]))
    splitq_gemm_kernel[grid](
        qx, sx, out, out.stride(0),
        wv, wt, wm, wv.stride(0), wt.stride(0), wm.stride(0),
        w_scale[0].float(), w_scale[1].float(), w_scale[2].float(),
        _nonempty(hq, qx), _nonempty(sh, f32), _nonempty(l1, qx),
        l1.stride(0) if has_cws else 0, _nonempty(l1_scale, f32), r1 or 0,
        _nonempty(gq, qx), _nonempty(sg, f32), _nonempty(l3, qx),
        l3.stride(0) if has_mac else 0, _nonempty(l3_scale, f32), r2 or 0,
        _nonempty(mask_u8, qx), _nonempty(bias, f32),
        n, d_out, kv, kt, km,
        **const, **cfg,
        # FMA contraction allowed: it only touches the fp32 epilogue (not a quantization code).
        enable_fp_fusion=True,
    )  # fmt: skip
    return out
