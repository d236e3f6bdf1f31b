"""Per-token activation quantization of the three SplitQ paths, fused with the branch
down-projections.

One program handles ``BLOCK_M`` tokens (rows of ``x``) over the whole input width:

* pass 1: per-path absmax -> ``s_p = max(absmax * clip_p, 1e-8) / qmax_p`` (stored in ``sx``);
* pass 2: quantize every path into ``qx`` (int8, same layout as ``x``); on the main path also
  accumulate the CWS down-projection ``qx_m @ L2^T`` (int8 dot, int32) and the absmax of the MAC
  input ``u`` (residual ``x_m - qx_m * s_m`` or dequantized ``qx_m * s_m``);
* pass 3 (MAC only): quantize ``u`` per token and accumulate ``uq @ L4^T``;
* epilogue: the rank-r hidden states ``h`` and ``g`` are scaled to fp32 and quantized per token
  into ``hq``/``gq`` (int8, (N, r)) with scales ``sh``/``sg``, ready for the GEMM epilogue.

Layouts: ``x`` (N, d) with unit stride along d; ``qx`` (N, d) int8 contiguous; ``sx`` (N, 3)
fp32; ``L2``/``L4`` dense-packed int32 (r, ceil(km*b/32)) (see ``common.load_packed_kmajor``);
``hq`` (N, r1), ``gq`` (N, r2), ``uq`` (N, km) int8 contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    interpreting,
    load_packed_kmajor,
    pow2_at_least,
    quantize_codes,
    token_scale,
)


@triton.jit
def _path_absmax(x_ptr, row_off, row_mask, start, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row-wise max |x| over columns [start, start + K) of a [BLOCK_M, d] row block."""
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        m = row_mask[:, None] & (kk < K)[None, :]
        x = tl.load(x_ptr + row_off[:, None] + (start + kk)[None, :], mask=m, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    return amax


@triton.jit
def _path_quantize(
    x_ptr, row_off, q_ptr, q_row_off, row_mask, start, K, scale,
    QMAX: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Quantize columns [start, start + K) with per-row ``scale`` and store int8 codes."""
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        m = row_mask[:, None] & (kk < K)[None, :]
        x = tl.load(x_ptr + row_off[:, None] + (start + kk)[None, :], mask=m, other=0.0)
        q = quantize_codes(x.to(tl.float32), scale[:, None], QMAX)
        tl.store(q_ptr + q_row_off[:, None] + (start + kk)[None, :], q.to(tl.int8), mask=m)


@triton.jit
def _hidden_quantize(acc, in_scale, w_scale_ptr, R, out_ptr, s_out_ptr, rows, row_mask,
                     R_P: tl.constexpr, QMAX: tl.constexpr):  # fmt: skip
    """``h = acc * in_scale * w_scale`` (fp32), then per-row quantization into (N, R) int8."""
    r = tl.arange(0, R_P)
    rmask = r < R
    ws = tl.load(w_scale_ptr + r, mask=rmask, other=0.0)
    h = acc.to(tl.float32) * in_scale[:, None] * ws[None, :]  # padded columns are exactly 0
    sh = token_scale(tl.max(tl.abs(h), axis=1), QMAX)
    hq = quantize_codes(h, sh[:, None], QMAX)
    m = row_mask[:, None] & rmask[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * R + r[None, :], hq.to(tl.int8), mask=m)
    tl.store(s_out_ptr + rows, sh, mask=row_mask)


@triton.jit
def act_quant_kernel(
    x_ptr, stride_x, clip_ptr, qx_ptr, sx_ptr,
    l2_ptr, l2s_ptr, stride_l2, hq_ptr, sh_ptr, R1,
    l4_ptr, l4s_ptr, stride_l4, uq_ptr, su_ptr, gq_ptr, sg_ptr, R2,
    N, KV, KT, KM,
    QMAX_V: tl.constexpr, QMAX_T: tl.constexpr, QMAX_M: tl.constexpr,
    HAS_CWS: tl.constexpr, CWS_W_BITS: tl.constexpr, QMAX_CWS: tl.constexpr, R1_P: tl.constexpr,
    HAS_MAC: tl.constexpr, MAC_W_BITS: tl.constexpr, QMAX_MAC: tl.constexpr, R2_P: tl.constexpr,
    MAC_INPUT: tl.constexpr, STORE_UQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """See the module docstring. Grid: ``(cdiv(N, BLOCK_M),)``."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    d = KV + KT + KM
    row_off = rows.to(tl.int64) * stride_x
    q_row_off = rows.to(tl.int64) * d

    # ---- pass 1: per-path scales -----------------------------------------------------------
    s_v = token_scale(
        _path_absmax(x_ptr, row_off, row_mask, 0, KV, BLOCK_M, BLOCK_K) * tl.load(clip_ptr + 0),
        QMAX_V,
    )
    s_t = token_scale(
        _path_absmax(x_ptr, row_off, row_mask, KV, KT, BLOCK_M, BLOCK_K) * tl.load(clip_ptr + 1),
        QMAX_T,
    )
    s_m = token_scale(
        _path_absmax(x_ptr, row_off, row_mask, KV + KT, KM, BLOCK_M, BLOCK_K)
        * tl.load(clip_ptr + 2),
        QMAX_M,
    )
    tl.store(sx_ptr + rows * 3 + 0, s_v, mask=row_mask)
    tl.store(sx_ptr + rows * 3 + 1, s_t, mask=row_mask)
    tl.store(sx_ptr + rows * 3 + 2, s_m, mask=row_mask)

    # ---- pass 2: quantize; main path also feeds the CWS down-projection and the MAC absmax ----
    _path_quantize(x_ptr, row_off, qx_ptr, q_row_off, row_mask, 0, KV, s_v, QMAX_V, BLOCK_K)
    _path_quantize(x_ptr, row_off, qx_ptr, q_row_off, row_mask, KV, KT, s_t, QMAX_T, BLOCK_K)

    start_m = KV + KT
    r1 = tl.arange(0, R1_P)
    h_acc = tl.zeros([BLOCK_M, R1_P], dtype=tl.int32)
    u_max = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, KM, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < KM
        m = row_mask[:, None] & kmask[None, :]
        x = tl.load(x_ptr + row_off[:, None] + (start_m + kk)[None, :], mask=m, other=0.0)
        x = x.to(tl.float32)
        q = quantize_codes(x, s_m[:, None], QMAX_M)
        tl.store(qx_ptr + q_row_off[:, None] + (start_m + kk)[None, :], q.to(tl.int8), mask=m)
        if HAS_CWS:
            # L2 tile as [BLOCK_K, R1_P]: element (k, r) = L2[r, k].
            l2 = load_packed_kmajor(
                l2_ptr, r1, r1 < R1, stride_l2, k0, KM, CWS_W_BITS, BLOCK_K, R1_P
            )
            h_acc = tl.dot(q.to(tl.int8), l2, h_acc)
        if HAS_MAC:
            dq = q * s_m[:, None]
            if MAC_INPUT == 0:
                u = x - dq
            else:
                u = dq
            u_max = tl.maximum(u_max, tl.max(tl.abs(u), axis=1))

    if HAS_CWS:
        _hidden_quantize(h_acc, s_m, l2s_ptr, R1, hq_ptr, sh_ptr, rows, row_mask, R1_P, QMAX_CWS)

    # ---- pass 3 (MAC): quantize u and feed the MAC down-projection ---------------------------
    if HAS_MAC:
        su = token_scale(u_max, QMAX_MAC)
        tl.store(su_ptr + rows, su, mask=row_mask)
        r2 = tl.arange(0, R2_P)
        g_acc = tl.zeros([BLOCK_M, R2_P], dtype=tl.int32)
        for k0 in range(0, KM, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < KM
            m = row_mask[:, None] & kmask[None, :]
            x = tl.load(x_ptr + row_off[:, None] + (start_m + kk)[None, :], mask=m, other=0.0)
            x = x.to(tl.float32)
            dq = quantize_codes(x, s_m[:, None], QMAX_M) * s_m[:, None]
            if MAC_INPUT == 0:
                u = x - dq
            else:
                u = dq
            uq = quantize_codes(u, su[:, None], QMAX_MAC).to(tl.int8)
            if STORE_UQ:
                uq_off = rows.to(tl.int64)[:, None] * KM + kk[None, :]
                tl.store(uq_ptr + uq_off, uq, mask=m)
            l4 = load_packed_kmajor(
                l4_ptr, r2, r2 < R2, stride_l4, k0, KM, MAC_W_BITS, BLOCK_K, R2_P
            )
            g_acc = tl.dot(uq, l4, g_acc)
        _hidden_quantize(g_acc, su, l4s_ptr, R2, gq_ptr, sg_ptr, rows, row_mask, R2_P, QMAX_MAC)


def qmax(bits: int) -> int:
    """``2^(bits-1) - 1``."""
    return (1 << (int(bits) - 1)) - 1


def rank_pad(r: int) -> int:
    """Padded rank: a power of two >= 32 (an int8 ``tl.dot`` needs K >= 32 on Hopper)."""
    return pow2_at_least(r, 32)


def act_quant_config(n_tokens: int) -> dict:
    """Block sizes and launch options of :func:`act_quant_kernel`.

    GPU: 16 tokens x 128 channels per step (the smallest M a ``tl.dot`` accepts; the pass is
    memory bound). Interpreter: large blocks, since its cost is per program and per step.
    """
    if interpreting():
        return {"BLOCK_M": pow2_at_least(min(n_tokens, 64), 16), "BLOCK_K": 256, "num_warps": 4}
    return {"BLOCK_M": 16, "BLOCK_K": 128, "num_warps": 4}


def act_quant_constexprs(
    a_bits, branch_bits, r1: int | None, r2: int | None, mac_input: int, store_uq: bool
) -> dict:
    """The constexpr arguments of :func:`act_quant_kernel` (shared with the compile check)."""
    return {
        "QMAX_V": qmax(a_bits[0]),
        "QMAX_T": qmax(a_bits[1]),
        "QMAX_M": qmax(a_bits[2]),
        "HAS_CWS": r1 is not None,
        "CWS_W_BITS": int(branch_bits[0]),
        "QMAX_CWS": qmax(branch_bits[1]),
        "R1_P": rank_pad(r1 or 1),
        "HAS_MAC": r2 is not None,
        "MAC_W_BITS": int(branch_bits[2]),
        "QMAX_MAC": qmax(branch_bits[3]),
        "R2_P": rank_pad(r2 or 1),
        "MAC_INPUT": int(mac_input),
        "STORE_UQ": bool(store_uq),
    }


def quantize_activations(
    x: torch.Tensor,
    act_clip: torch.Tensor,
    sizes,
    a_bits,
    l2: torch.Tensor | None = None,
    l2_scale: torch.Tensor | None = None,
    l4: torch.Tensor | None = None,
    l4_scale: torch.Tensor | None = None,
    branch_bits=(4, 4, 4, 4),
    mac_input: int = 0,
    store_uq: bool = False,
) -> dict[str, torch.Tensor | None]:
    """Launch :func:`act_quant_kernel`.

    Args:
        x: (N, d) fp32/bf16/fp16, path order ``[v | t | m]``.
        act_clip: fp32 (3,) clip ratios.
        sizes: ``(kv, kt, km)``.
        a_bits: per path activation bits.
        l2, l2_scale: CWS down factor (packed (r1, km)) and its scale, or None.
        l4, l4_scale: MAC down factor (packed (r2, km)) and its scale, or None.
        branch_bits: ``(cws_w_bits, cws_act_bits, mac_w_bits, mac_act_bits)``.
        mac_input: 0 = residual, 1 = dequantized main activation.
        store_uq: also return the MAC input codes ``uq`` (tests; costs N x km bytes).

    Returns:
        The dict of :func:`splitq_quantize_activations_reference` (``uq`` None unless asked).
    """
    kv, kt, km = (int(k) for k in sizes)
    n, d = x.shape
    assert d == kv + kt + km, f"x has {d} channels, sizes sum to {kv + kt + km}"
    if x.stride(1) != 1:
        x = x.contiguous()
    dev = x.device
    qx = torch.empty((n, d), dtype=torch.int8, device=dev)
    sx = torch.empty((n, 3), dtype=torch.float32, device=dev)
    has_cws, has_mac = l2 is not None, l4 is not None
    r1 = int(l2_scale.numel()) if has_cws else None
    r2 = int(l4_scale.numel()) if has_mac else None
    f32 = torch.empty(1, dtype=torch.float32, device=dev)  # placeholder for absent pointers
    hq = torch.empty((n, r1), dtype=torch.int8, device=dev) if has_cws else None
    sh = torch.empty(n, dtype=torch.float32, device=dev) if has_cws else None
    gq = torch.empty((n, r2), dtype=torch.int8, device=dev) if has_mac else None
    sg = torch.empty(n, dtype=torch.float32, device=dev) if has_mac else None
    su = torch.empty(n, dtype=torch.float32, device=dev) if has_mac else None
    uq = torch.empty((n, km), dtype=torch.int8, device=dev) if has_mac and store_uq else None
    cfg = act_quant_config(n)
    const = act_quant_constexprs(a_bits, branch_bits, r1, r2, mac_input, uq is not None)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]),)
    if n > 0:
        act_quant_kernel[grid](
            x, x.stride(0), act_clip.float().contiguous(), qx, sx,
            l2 if has_cws else qx, l2_scale.float() if has_cws else f32,
            l2.stride(0) if has_cws else 0, hq if has_cws else qx, sh if has_cws else f32,
            r1 or 0,
            l4 if has_mac else qx, l4_scale.float() if has_mac else f32,
            l4.stride(0) if has_mac else 0, uq if uq is not None else qx,
            su if has_mac else f32, gq if has_mac else qx, sg if has_mac else f32, r2 or 0,
            n, kv, kt, km,
            **const, **cfg,
            # x - q*s must round like torch (no FMA contraction) for the MAC residual codes.
            enable_fp_fusion=False,
        )  # fmt: skip
    return {"qx": qx, "sx": sx, "hq": hq, "sh": sh, "uq": uq, "su": su, "gq": gq, "sg": sg}
