"""Kernel B of a SplitQ activation site: one GEMM over the concatenated packed weights of the
site's linears, with the low-rank up-projections and the bias in the epilogue.

Hopper has no int4 tensor-core MMA, so each weight tile is unpacked to int8 in registers and fed
to an int8 ``tl.dot`` with int32 accumulation (DESIGN.md section 4). The product is computed
transposed, ``y^T = W qx^T``: the unpacked weight tile is the left operand (on Hopper, WGMMA
reads only its A operand from registers, so the unpacked tile needs no trip through shared
memory) and the tokens are the N side, which can be as small as 16 (decode).

One program computes a ``[BLOCK_O, BLOCK_T]`` tile of ``y^T`` (output channels x tokens):

* for each path p in (vision, text, main): ``acc_p = W_p[o, :] . qx[t, path p]`` (int32; the
  path is skipped at compile time when empty), then ``out += acc_p * sx[t, p] * ws_p[o]``;
* CWS, for each linear ``j`` whose output rows meet the tile:
  ``out[o in j] += (L1[o, :r_j] . hq[t, seg j]) * sh[t, j] * l1_scale[o]``;
* MAC, the same with ``L3``/``gq``/``sg``, on text tokens only (``text_mask``);
* ``+ bias``, cast to the output dtype, stored to ``y`` (N, D).

The epilogue applies the terms in the reference's order, so with equal codes the output equals
the reference up to FMA contraction (allowed here: no quantization code depends on it).

Token-count configurations (:func:`site_gemm_config`): at 1-16 tokens a GEMV-style tile
(``BLOCK_T = 16``, 32 output rows, 256-deep K steps) keeps the grid wide enough to stream the
weights from every SM without a split-K reduction (which would need a second launch or atomics
on a zeroed buffer); larger tiles above.

Layouts: ``qx`` (N, d) int8, paths at columns ``[0, kv)``, ``[kv, kv+kt)``, ``[kv+kt, d)``;
``sx`` (N, 3) fp32; path weights dense-packed int32 (D, words_p); ``hq`` (N, R1), ``gq`` (N, R2)
int8 with ``sh``/``sg`` (N, M) fp32; ``L1``/``L3`` packed (D, words(max rank)).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from .common import interpreting, load_packed_rows, pow2_at_least
from .site_quant import _ptr, branch_args, rank_pad, segments

if TYPE_CHECKING:
    from splitq_modifier.runtime.params import SiteParams


@triton.jit
def _path_acc(
    qx_ptr, t_off, tm, w_ptr, stride_w, o, om,
    START: tl.constexpr, K: tl.constexpr, BITS: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """int32 ``W[o, :K] @ qx[t, START:START+K]^T`` for one path, ``[BLOCK_O, BLOCK_T]``."""
    acc = tl.zeros([BLOCK_O, BLOCK_T], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        # [BLOCK_O, BLOCK_K]; codes at k >= K are garbage and meet b == 0.
        a = load_packed_rows(w_ptr, o, om, stride_w, k0, K, BITS, BLOCK_K, BLOCK_O)
        b = tl.load(
            qx_ptr + t_off[None, :] + START + kk[:, None],
            mask=tm[None, :] & (kk < K)[:, None],
            other=0,
        )  # [BLOCK_K, BLOCK_T]
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _branch_up(
    out, c_ptr, s_ptr, up_ptr, stride_up, ups_ptr, mask_ptr, o, om, t, tm, o_lo,
    OUT_SEGS: tl.constexpr, SEGS: tl.constexpr, BITS: tl.constexpr, R_MAX: tl.constexpr,
    R_P: tl.constexpr, MASKED: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    """Add one branch's up-projection, linear by linear (see the module doc)."""
    M: tl.constexpr = len(SEGS)
    R: tl.constexpr = SEGS[M - 1][1]
    r = tl.arange(0, R_P)
    # [BLOCK_O, R_P]: row o holds its linear's r_j codes, zero codes after them.
    w = load_packed_rows(up_ptr, o, om, stride_up, 0, R_MAX, BITS, R_P, BLOCK_O)
    ups = tl.load(ups_ptr + o, mask=om, other=0.0)
    if MASKED:
        is_text = tl.load(mask_ptr + t, mask=tm, other=0) != 0
    for j in tl.static_range(M):
        lo_o = OUT_SEGS[j][0]
        hi_o = OUT_SEGS[j][1]
        lo_r = SEGS[j][0]
        if (o_lo < hi_o) & (o_lo + BLOCK_O > lo_o):
            c = tl.load(
                c_ptr + t[None, :].to(tl.int64) * R + lo_r + r[:, None],
                mask=tm[None, :] & (r < SEGS[j][1] - lo_r)[:, None],
                other=0,
            )  # [R_P, BLOCK_T]: linear j's hidden codes
            acc = tl.dot(w, c)
            s = tl.load(s_ptr + t * M + j, mask=tm, other=0.0)
            dy = acc.to(tl.float32) * s[None, :] * ups[:, None]
            keep = ((o >= lo_o) & (o < hi_o))[:, None]
            if MASKED:
                keep = keep & is_text[None, :]
            out += tl.where(keep, dy, 0.0)
    return out


@triton.jit
def site_gemm_kernel(
    qx_ptr, sx_ptr, out_ptr,
    wv_ptr, wt_ptr, wm_ptr, stride_wv, stride_wt, stride_wm, wsv_ptr, wst_ptr, wsm_ptr,
    hq_ptr, sh_ptr, l1_ptr, stride_l1, l1s_ptr,
    gq_ptr, sg_ptr, l3_ptr, stride_l3, l3s_ptr, mask_ptr, bias_ptr,
    N,
    KV: tl.constexpr, KT: tl.constexpr, KM: tl.constexpr, OUT_SEGS: tl.constexpr,
    BITS_V: tl.constexpr, BITS_T: tl.constexpr, BITS_M: tl.constexpr,
    HAS_CWS: tl.constexpr, CWS_W_BITS: tl.constexpr, SEG1: tl.constexpr, R1_MAX: tl.constexpr,
    R1_P: tl.constexpr,
    HAS_MAC: tl.constexpr, MAC_W_BITS: tl.constexpr, SEG2: tl.constexpr, R2_MAX: tl.constexpr,
    R2_P: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """See the module docstring. Grid: ``(cdiv(D, BLOCK_O), cdiv(N, BLOCK_T))``.

    ``OUT_SEGS``: ``(lo, hi)`` output-row range of each linear; ``SEG1``/``SEG2``: its rank
    range in ``hq``/``gq`` (``((0, 1),)`` when the branch is absent).
    """
    D: tl.constexpr = KV + KT + KM
    D_OUT: tl.constexpr = OUT_SEGS[len(OUT_SEGS) - 1][1]
    o_lo = tl.program_id(0) * BLOCK_O
    o = o_lo + tl.arange(0, BLOCK_O)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    om = o < D_OUT
    tm = t < N
    t_off = t.to(tl.int64) * D

    out = tl.zeros([BLOCK_O, BLOCK_T], dtype=tl.float32)
    if KV > 0:
        acc = _path_acc(qx_ptr, t_off, tm, wv_ptr, stride_wv, o, om, 0, KV, BITS_V,
                        BLOCK_O, BLOCK_T, BLOCK_K)  # fmt: skip
        s = tl.load(sx_ptr + t * 3 + 0, mask=tm, other=0.0)
        ws = tl.load(wsv_ptr + o, mask=om, other=0.0)
        out += acc.to(tl.float32) * s[None, :] * ws[:, None]
    if KT > 0:
        acc = _path_acc(qx_ptr, t_off, tm, wt_ptr, stride_wt, o, om, KV, KT, BITS_T,
                        BLOCK_O, BLOCK_T, BLOCK_K)  # fmt: skip
        s = tl.load(sx_ptr + t * 3 + 1, mask=tm, other=0.0)
        ws = tl.load(wst_ptr + o, mask=om, other=0.0)
        out += acc.to(tl.float32) * s[None, :] * ws[:, None]
    if KM > 0:
        acc = _path_acc(qx_ptr, t_off, tm, wm_ptr, stride_wm, o, om, KV + KT, KM, BITS_M,
                        BLOCK_O, BLOCK_T, BLOCK_K)  # fmt: skip
        s = tl.load(sx_ptr + t * 3 + 2, mask=tm, other=0.0)
        ws = tl.load(wsm_ptr + o, mask=om, other=0.0)
        out += acc.to(tl.float32) * s[None, :] * ws[:, None]
    if HAS_CWS:
        out = _branch_up(out, hq_ptr, sh_ptr, l1_ptr, stride_l1, l1s_ptr, mask_ptr, o, om, t,
                         tm, o_lo, OUT_SEGS, SEG1, CWS_W_BITS, R1_MAX, R1_P, False,
                         BLOCK_O)  # fmt: skip
    if HAS_MAC:
        out = _branch_up(out, gq_ptr, sg_ptr, l3_ptr, stride_l3, l3s_ptr, mask_ptr, o, om, t,
                         tm, o_lo, OUT_SEGS, SEG2, MAC_W_BITS, R2_MAX, R2_P, HAS_MASK,
                         BLOCK_O)  # fmt: skip
    if HAS_BIAS:
        out += tl.load(bias_ptr + o, mask=om, other=0.0).to(tl.float32)[:, None]

    y_ptrs = out_ptr + t.to(tl.int64)[None, :] * D_OUT + o[:, None]
    tl.store(y_ptrs, out.to(out_ptr.dtype.element_ty), mask=om[:, None] & tm[None, :])


# Fixed GPU configs by token count (no autotuning: it needs a GPU and hides the choice).
# (max tokens, BLOCK_O, BLOCK_T, BLOCK_K, num_warps, num_stages). BLOCK_K >= 32 for int8 dots.
# Untuned: no GPU was available when they were chosen.
# Register use at Qwen2.5-VL-7B sites, from the sm_90 cubins (compile_check): 96 / 162 / 255 /
# 237 registers, no spills; a 128 x 128 tile spills with 8 warps, so large N uses 128 x 64.
SITE_GEMM_GPU_CONFIGS = (
    (16, 32, 16, 256, 4, 4),  # decode: GEMV-style, narrow output tiles, deep K steps
    (32, 64, 32, 128, 4, 4),
    (64, 64, 64, 128, 4, 3),
    (None, 128, 64, 128, 8, 3),
)


def site_gemm_config(n_tokens: int, interpret: bool | None = None) -> dict:
    """Block sizes and launch options of :func:`site_gemm_kernel` for ``n_tokens`` rows
    (``interpret``: the interpreter's configuration; default: whether Triton runs
    interpreted)."""
    if interpreting() if interpret is None else interpret:
        return {
            "BLOCK_O": 64,
            "BLOCK_T": pow2_at_least(min(max(n_tokens, 1), 64), 16),
            "BLOCK_K": 256,
            "num_warps": 4,
        }
    for max_n, bo, bt, bk, warps, stages in SITE_GEMM_GPU_CONFIGS:
        if max_n is None or n_tokens <= max_n:
            return {
                "BLOCK_O": bo,
                "BLOCK_T": bt,
                "BLOCK_K": bk,
                "num_warps": warps,
                "num_stages": stages,
            }
    raise AssertionError("unreachable")


def site_gemm_constexprs(
    sizes: Sequence[int],
    out_splits: Sequence[int],
    cws_ranks: Sequence[int] | None,
    mac_ranks: Sequence[int] | None,
    w_bits: Sequence[int],
    branch_bits: Sequence[int],
    has_mask: bool,
    has_bias: bool,
    cfg: dict,
) -> dict:
    """Every constexpr argument of :func:`site_gemm_kernel` (shared with the compile check)."""
    has_cws, has_mac = bool(cws_ranks), bool(mac_ranks)
    kv, kt, km = (int(k) for k in sizes)
    return {
        "KV": kv,
        "KT": kt,
        "KM": km,
        "OUT_SEGS": segments(out_splits),
        "BITS_V": int(w_bits[0]),
        "BITS_T": int(w_bits[1]),
        "BITS_M": int(w_bits[2]),
        "HAS_CWS": has_cws,
        "CWS_W_BITS": int(branch_bits[0]),
        "SEG1": segments(cws_ranks) if has_cws else ((0, 1),),
        "R1_MAX": max(cws_ranks) if has_cws else 1,
        "R1_P": rank_pad(max(cws_ranks) if has_cws else 1),
        "HAS_MAC": has_mac,
        "MAC_W_BITS": int(branch_bits[2]),
        "SEG2": segments(mac_ranks) if has_mac else ((0, 1),),
        "R2_MAX": max(mac_ranks) if has_mac else 1,
        "R2_P": rank_pad(max(mac_ranks) if has_mac else 1),
        "HAS_MASK": bool(has_mask),
        "HAS_BIAS": bool(has_bias),
        "BLOCK_O": cfg["BLOCK_O"],
        "BLOCK_T": cfg["BLOCK_T"],
        "BLOCK_K": cfg["BLOCK_K"],
    }


def site_gemm_triton(
    acts: dict[str, torch.Tensor | None],
    p: SiteParams,
    text_mask: torch.Tensor | None,
    out_dtype: torch.dtype | None,
) -> torch.Tensor:
    """Launch :func:`site_gemm_kernel`; same arguments as ``site_gemm_reference``.

    ``acts`` holds ``qx``, ``sx`` and, with the branches, ``hq``/``sh`` and ``gq``/``sg`` (from
    :func:`site_quantize_triton` or the reference). ``out_dtype`` None = fp32, as in the
    reference. Activations must be quantized.
    """
    sizes, out_splits = p.sizes, p.out_splits
    cws_ranks, mac_ranks, branch_bits = branch_args(p)
    w_v, w_t, w_m = p.w_packed
    ws_v, ws_t, ws_m = p.w_scale
    l1 = l1_scale = l3 = l3_scale = None
    if p.cws is not None:
        l1, l1_scale = p.cws.up, p.cws.up_scale
    if p.mac is not None:
        l3, l3_scale = p.mac.up, p.mac.up_scale
    bias, w_bits = p.bias, p.w_bits
    qx, sx = acts["qx"], acts["sx"]
    n = qx.shape[0]
    d_out = int(sum(int(k) for k in out_splits))
    dev = qx.device
    if out_dtype is None:
        out_dtype = torch.float32
    out = torch.empty((n, d_out), dtype=out_dtype, device=dev)
    if n == 0 or d_out == 0:
        return out
    has_cws, has_mac = l1 is not None, l3 is not None
    mask_u8 = None
    if text_mask is not None:
        m = text_mask.reshape(-1)
        mask_u8 = (m if m.dtype == torch.bool else m != 0).view(torch.uint8)
    cfg = site_gemm_config(n)
    const = site_gemm_constexprs(
        sizes, out_splits, cws_ranks if has_cws else None, mac_ranks if has_mac else None,
        w_bits, branch_bits, mask_u8 is not None, bias is not None, cfg,
    )  # fmt: skip
    launch = {k: v for k, v in cfg.items() if k.startswith("num_")}
    wv, wt, wm = (_ptr(t, qx) for t in (w_v, w_t, w_m))
    grid = (triton.cdiv(d_out, cfg["BLOCK_O"]), triton.cdiv(n, cfg["BLOCK_T"]))
    site_gemm_kernel[grid](
        qx, sx, out,
        wv, wt, wm, wv.stride(0), wt.stride(0), wm.stride(0),
        _ptr(ws_v, sx), _ptr(ws_t, sx), _ptr(ws_m, sx),
        _ptr(acts["hq"] if has_cws else None, qx), _ptr(acts["sh"] if has_cws else None, sx),
        _ptr(l1, qx), l1.stride(0) if has_cws else 0, _ptr(l1_scale, sx),
        _ptr(acts["gq"] if has_mac else None, qx), _ptr(acts["sg"] if has_mac else None, sx),
        _ptr(l3, qx), l3.stride(0) if has_mac else 0, _ptr(l3_scale, sx),
        _ptr(mask_u8, qx), _ptr(bias, sx),
        n,
        **const, **launch,
        # FMA contraction allowed: it only touches the fp32 epilogue (not a quantization code).
        enable_fp_fusion=True,
    )  # fmt: skip
    return out
