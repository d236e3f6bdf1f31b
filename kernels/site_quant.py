"""Kernel A of a SplitQ activation site: the fused transform-and-quantize pass.

One launch per site; one program handles ``BLOCK_M`` tokens over the whole input width:

1. **Transform** (:func:`_kron_stage`, :func:`_copy_stage`). For each path ``p`` (order
   vision | text | main) its Kronecker factors are applied one *stage* per factor, last factor
   first (the order of :func:`splitq_modifier.runtime.quant.apply_kron`). Stage ``i`` views the
   path's ``k = A * n_i * B`` channels of a token as ``(A, n_i, B)`` (``A``/``B`` the products
   of the factor sides before/after ``i``) and contracts the middle axis with ``M_i``:
   ``out[a, o, c] = sum_j in[a, j, c] M_i[j, o]``. A tile of ``RO`` "outer" rows (token x
   ``a``) by ``CB`` columns of ``c`` by ``NP`` (``n_i`` padded) is loaded *already transposed*
   by its addresses (channel ``a*n_i*B + j*B + c``), reshaped to ``[RO*CB, NP]`` and multiplied
   by ``M_i`` with one fp32 ``tl.dot``; the result goes back to the same addresses. The first
   stage of a path reads ``x[:, perm] * smooth`` straight from the input (the gather and the
   smoothing are fused into its load); the others read and write the fp32 work buffer ``xt``
   (N, d) in place (a tile's reads and writes are the same addresses, tiles are disjoint, and
   the ``tl.dot`` orders every read of a tile before any write; a barrier separates stages).
   Where both padded sides are <= 64, the last two factors of a path run as one stage in
   registers (:func:`_kron_pair_stage`: two ``tl.dot`` with a transpose between them), which
   saves one fp32 round trip through ``xt``: a 2-factor main path (54 x 64) is one stage, a
   3-factor one (24 x 27 x 28) two. A path with no factors is copied (gathered, smoothed) into
   ``xt``. The last stage of each path ends with factor 0, whose outer index is the token
   alone, so it also yields the per-token absmax of the transformed path.
2. **Quantize**: ``s_p = max(absmax_p * clip_p, 1e-8) / qmax_p`` (``sx``), codes ``qx`` (N, d)
   int8; on the main path the same sweep accumulates the CWS down-projection ``qx_m @ L2^T``
   (int8 ``tl.dot``, int32) and the absmax of the MAC input ``u``.
3. **MAC** (optional): a second sweep quantizes ``u`` per token and accumulates ``uq @ L4^T``.
4. The rank-``R`` hidden states are scaled to fp32 and quantized per token and per linear
   segment (:func:`common.segment_quantize`) into ``hq``/``gq`` with scales ``sh``/``sg``
   (N, M).

Precision: the transform runs in fp32 (inputs converted right after load); ``tl.dot``'s
``input_precision`` is :data:`TRANSFORM_PRECISION` on a GPU (see there why). Everything that
decides a quantization code is IEEE fp32 as in the torch reference (``div_rn``, no FMA
contraction: the kernel is compiled with ``enable_fp_fusion=False``).

Layouts: ``x`` (N, d), unit stride along d, original channel order; ``perm`` int32 (d,);
``smooth`` fp32 (d,) and ``xt``/``qx`` (N, d) in path order; ``factors`` fp32 flat (path 0's
factors, then 1's, then 2's, each row-major); ``L2``/``L4`` dense-packed int32 (R, words(km))
(see ``common.load_packed_kmajor``); ``hq`` (N, R1), ``gq`` (N, R2), ``uq`` (N, km) int8.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from .common import (
    interpreting,
    load_packed_kmajor,
    pow2_at_least,
    quantize_codes,
    segment_quantize,
    token_scale,
)

if TYPE_CHECKING:  # no import at run time: kernels/ must not import the package (it is also
    # importable as a top-level ``kernels`` from the repository root, where transformers
    # probes for the Hugging Face ``kernels`` package)
    from splitq_modifier.runtime.params import SiteParams

#: ``tl.dot`` input precision of the fp32 transform on a GPU. "tf32x3" (three TF32 tensor-core
#: products, error ~ fp32's) rather than "ieee" or "tf32":
#:
#: * "ieee" lowers fp32 dots to CUDA-core FMAs (~67 TFLOP/s on H100/H200): the main path's
#:   transform (``k_m * sum(padded sides)`` MACs per token, 2-4% of the site's MACs) would then
#:   take about as long as the int8 GEMM itself at prefill (int8 runs at 1979 TOP/s);
#: * "tf32" rounds both operands to 10 mantissa bits (relative error ~2^-11 per product):
#:   measured in emulation (``benchmarks/kernel.py``, table (d): Qwen2.5-VL-7B sites, 256
#:   tokens) it flips 6e-4 of the codes at 4-bit activations and 1.1-1.2e-2 at 8 bits, against
#:   0-4e-6 for fp32: the 8-bit case misses the >= 99.9 % agreement the tests ask for;
#: * "tf32x3" splits each operand into a TF32 head and tail and sums three tensor-core
#:   products: fp32-level agreement at tensor-core speed (3 TF32 passes).
#:
#: Under the interpreter the dot is a numpy fp32 matmul whatever this says.
TRANSFORM_PRECISION = "tf32x3"

# Stage table entry (a constexpr tuple; see plan_stages), indexed by position in the kernels:
#   0 path, 1 kind, 2 final, 3 start, 4 k, 5 A, 6 NI, 7 B, 8 RO, 9 CB, 10 NP, 11 f_off, 12 NO,
#   13 PAIR, 14 f_off_b
#   kind: 0 = copy (no factors), 1 = first stage of the path (gathers x), 2 = later stage.


@triton.jit
def _copy_stage(
    x_ptr, stride_x, perm_ptr, smooth_ptr, xt_ptr, rows, row_mask,
    D: tl.constexpr, START: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr,
    CB: tl.constexpr,
):  # fmt: skip
    """A path without factors: ``xt[:, START:START+K] = x[:, perm] * smooth``; row absmax."""
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    x_row = rows.to(tl.int64)[:, None] * stride_x
    xt_row = rows.to(tl.int64)[:, None] * D
    for c0 in range(0, K, CB):
        c = c0 + tl.arange(0, CB)
        cm = c < K
        m = row_mask[:, None] & cm[None, :]
        src = tl.load(perm_ptr + START + c, mask=cm, other=0)
        v = tl.load(x_ptr + x_row + src[None, :], mask=m, other=0.0).to(tl.float32)
        v = v * tl.load(smooth_ptr + START + c, mask=cm, other=0.0)[None, :]
        tl.store(xt_ptr + xt_row + START + c[None, :], v, mask=m)
        amax = tl.maximum(amax, tl.max(tl.abs(v), axis=1))
    return amax


@triton.jit
def _kron_stage(
    x_ptr, stride_x, perm_ptr, smooth_ptr, f_ptr, xt_ptr, row0, N,
    D: tl.constexpr, START: tl.constexpr, A: tl.constexpr, NI: tl.constexpr, B: tl.constexpr,
    RO: tl.constexpr, CB: tl.constexpr, NP: tl.constexpr, NO: tl.constexpr,
    GATHER: tl.constexpr, FINAL: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Apply one Kronecker factor (side ``NI``, at ``f_ptr``) of a path (module doc, step 1).

    The factor's output columns are produced ``NO`` at a time (``[NP, NO]`` blocks of the
    factor: at most 64 x 128 fp32 of shared memory per ``tl.dot`` operand on a GPU).
    Returns the per-token absmax of the result when ``FINAL`` (then ``A == 1``: the tile's
    outer index is the token, ``RO`` of them per step), else zeros.
    """
    if FINAL:
        tl.static_assert(A == 1)
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    j = tl.arange(0, NP)
    jm = j < NI
    i = tl.arange(0, NO)
    for o0 in range(0, BLOCK_M * A, RO):
        o = o0 + tl.arange(0, RO)
        tok = row0 + o // A
        om = (o < BLOCK_M * A) & (tok < N)
        row = tok.to(tl.int64)[:, None, None]
        a_off = ((o % A) * (NI * B))[:, None, None]
        for c0 in range(0, B, CB):
            c = c0 + tl.arange(0, CB)
            ocm = om[:, None, None] & (c < B)[None, :, None]
            # [RO, CB, NP]: element (r, c, j) is channel a*NI*B + j*B + c of the path.
            col = a_off + c[None, :, None] + (j * B)[None, None, :]
            m = ocm & jm[None, None, :]
            if GATHER:
                src = tl.load(perm_ptr + START + col, mask=m, other=0)
                v = tl.load(x_ptr + row * stride_x + src, mask=m, other=0.0)
                v = v.to(tl.float32) * tl.load(smooth_ptr + START + col, mask=m, other=0.0)
            else:
                v = tl.load(xt_ptr + row * D + START + col, mask=m, other=0.0)
            v = tl.reshape(v, [RO * CB, NP])
            # Every element of the tile is loaded before the first store below (the dot needs
            # them all), and the stores hit only this tile's addresses: in place is safe.
            for n0 in tl.static_range(0, NP, NO):
                n = n0 + i
                nm = n < NI
                # [NP, NO] block of the factor, zero-padded: padded inputs contribute nothing.
                mat = tl.load(f_ptr + j[:, None] * NI + n[None, :],
                              mask=jm[:, None] & nm[None, :], other=0.0)  # fmt: skip
                y = tl.reshape(tl.dot(v, mat, input_precision=PREC), [RO, CB, NO])
                col_o = a_off + c[None, :, None] + (n * B)[None, None, :]
                tl.store(xt_ptr + row * D + START + col_o, y, mask=ocm & nm[None, None, :])
                if FINAL:
                    tok_max = tl.max(tl.max(tl.abs(y), axis=2), axis=1)  # [RO], tokens o
                    if RO == BLOCK_M:
                        amax = tl.maximum(amax, tok_max)
                    else:  # scatter the RO tokens of this step into the block's BLOCK_M
                        hit = tl.arange(0, BLOCK_M)[:, None] == o[None, :]
                        amax = tl.maximum(amax, tl.max(tl.where(hit, tok_max[None, :], 0.0), 1))
    return amax


@triton.jit
def _kron_pair_stage(
    x_ptr, stride_x, perm_ptr, smooth_ptr, fa_ptr, fb_ptr, xt_ptr, row0, N,
    D: tl.constexpr, START: tl.constexpr, A: tl.constexpr, NA: tl.constexpr, NB: tl.constexpr,
    RO: tl.constexpr, NPA: tl.constexpr, NPB: tl.constexpr,
    GATHER: tl.constexpr, FINAL: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Apply two consecutive factors ``M_a`` (side ``NA``) and ``M_b`` (side ``NB``, the later
    one) in registers, with one load and one store: the path is viewed as ``(A, NA, NB)``.

    A tile of ``RO`` outer rows is loaded as ``[RO, NPA, NPB]``, multiplied by ``M_b`` on its
    last axis (``[RO*NPA, NPB] @ M_b``), transposed to ``[RO, NPB, NPA]`` and multiplied by
    ``M_a`` (``[RO*NPB, NPA] @ M_a``); the result, indexed ``(r, c, i)``, is stored straight to
    channel ``a*NA*NB + i*NB + c``. This halves the fp32 work-buffer traffic of the two stages.
    Returns the per-token absmax when ``FINAL`` (then ``A == 1``), else zeros.
    """
    if FINAL:
        tl.static_assert(A == 1)
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    j = tl.arange(0, NPA)
    c = tl.arange(0, NPB)
    jm = j < NA
    cm = c < NB
    for o0 in range(0, BLOCK_M * A, RO):
        o = o0 + tl.arange(0, RO)
        tok = row0 + o // A
        om = (o < BLOCK_M * A) & (tok < N)
        row = tok.to(tl.int64)[:, None, None]
        a_off = ((o % A) * (NA * NB))[:, None, None]
        # [RO, NPA, NPB]: element (r, j, c) is channel a*NA*NB + j*NB + c of the path.
        col = a_off + (j * NB)[None, :, None] + c[None, None, :]
        m = om[:, None, None] & jm[None, :, None] & cm[None, None, :]
        if GATHER:
            src = tl.load(perm_ptr + START + col, mask=m, other=0)
            v = tl.load(x_ptr + row * stride_x + src, mask=m, other=0.0)
            v = v.to(tl.float32) * tl.load(smooth_ptr + START + col, mask=m, other=0.0)
        else:
            v = tl.load(xt_ptr + row * D + START + col, mask=m, other=0.0)
        # The factors are (re)loaded per step (L1-resident) rather than kept live in registers.
        mat_b = tl.load(fb_ptr + c[:, None] * NB + c[None, :], mask=cm[:, None] & cm[None, :],
                        other=0.0)  # fmt: skip
        z = tl.dot(tl.reshape(v, [RO * NPA, NPB]), mat_b, input_precision=PREC)
        z = tl.permute(tl.reshape(z, [RO, NPA, NPB]), (0, 2, 1))  # [RO, NPB (c), NPA (j)]
        mat_a = tl.load(fa_ptr + j[:, None] * NA + j[None, :], mask=jm[:, None] & jm[None, :],
                        other=0.0)  # fmt: skip
        y = tl.dot(tl.reshape(z, [RO * NPB, NPA]), mat_a, input_precision=PREC)
        y = tl.reshape(y, [RO, NPB, NPA])  # (r, c, i)
        col_o = a_off + c[None, :, None] + (j * NB)[None, None, :]
        tl.store(xt_ptr + row * D + START + col_o, y,
                 mask=om[:, None, None] & cm[None, :, None] & jm[None, None, :])  # fmt: skip
        if FINAL:
            tok_max = tl.max(tl.max(tl.abs(y), axis=2), axis=1)  # [RO], tokens o
            if RO == BLOCK_M:
                amax = tl.maximum(amax, tok_max)
            else:
                hit = tl.arange(0, BLOCK_M)[:, None] == o[None, :]
                amax = tl.maximum(amax, tl.max(tl.where(hit, tok_max[None, :], 0.0), 1))
    return amax


@triton.jit
def _stage(
    x_ptr, stride_x, perm_ptr, smooth_ptr, f_ptr, xt_ptr, row0, rows, row_mask, N,
    D: tl.constexpr, ST: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Run one entry ``ST`` of the stage table (see :func:`plan_stages`)."""
    if ST[1] == 0:
        a = _copy_stage(x_ptr, stride_x, perm_ptr, smooth_ptr, xt_ptr, rows, row_mask,
                        D, ST[3], ST[4], BLOCK_M, ST[9])  # fmt: skip
    elif ST[13]:
        a = _kron_pair_stage(x_ptr, stride_x, perm_ptr, smooth_ptr, f_ptr + ST[11],
                             f_ptr + ST[14], xt_ptr, row0, N, D, ST[3], ST[5], ST[6], ST[7],
                             ST[8], ST[10], ST[9], ST[1] == 1, ST[2], BLOCK_M,
                             PREC)  # fmt: skip
    else:
        a = _kron_stage(x_ptr, stride_x, perm_ptr, smooth_ptr, f_ptr + ST[11], xt_ptr, row0, N,
                        D, ST[3], ST[5], ST[6], ST[7], ST[8], ST[9], ST[10], ST[12], ST[1] == 1,
                        ST[2], BLOCK_M, PREC)  # fmt: skip
    return a


@triton.jit
def _quant_path(
    xt_ptr, qx_ptr, rows, row_mask, scale,
    D: tl.constexpr, START: tl.constexpr, K: tl.constexpr, QMAX: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Quantize columns ``[START, START + K)`` of ``xt`` with per-row ``scale`` into ``qx``."""
    row_off = rows.to(tl.int64)[:, None] * D
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        m = row_mask[:, None] & (kk < K)[None, :]
        v = tl.load(xt_ptr + row_off + START + kk[None, :], mask=m, other=0.0)
        q = quantize_codes(v, scale[:, None], QMAX)
        tl.store(qx_ptr + row_off + START + kk[None, :], q.to(tl.int8), mask=m)


@triton.jit
def site_quant_kernel(
    x_ptr, stride_x, perm_ptr, smooth_ptr, f_ptr, clip_ptr,
    xt_ptr, qx_ptr, sx_ptr,
    l2_ptr, l2s_ptr, stride_l2, hq_ptr, sh_ptr,
    l4_ptr, l4s_ptr, stride_l4, uq_ptr, su_ptr, gq_ptr, sg_ptr,
    N,
    KV: tl.constexpr, KT: tl.constexpr, KM: tl.constexpr, STAGES: tl.constexpr,
    QMAX_V: tl.constexpr, QMAX_T: tl.constexpr, QMAX_M: tl.constexpr,
    HAS_CWS: tl.constexpr, CWS_W_BITS: tl.constexpr, QMAX_CWS: tl.constexpr,
    SEG1: tl.constexpr, R1_P: tl.constexpr,
    HAS_MAC: tl.constexpr, MAC_W_BITS: tl.constexpr, QMAX_MAC: tl.constexpr,
    SEG2: tl.constexpr, R2_P: tl.constexpr,
    MAC_INPUT: tl.constexpr, STORE_UQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """See the module docstring. Grid: ``(cdiv(N, BLOCK_M),)``.

    ``STAGES`` is the stage table of :func:`plan_stages`; ``SEG1``/``SEG2`` the ``(lo, hi)``
    rank ranges of the linears in ``L2``/``L4`` (``((0, 1),)`` when the branch is absent).
    """
    D: tl.constexpr = KV + KT + KM
    row0 = tl.program_id(0) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < N

    # ---- 1. transform every path into xt, per-token absmax of each path ----------------------
    amax_v = tl.zeros([BLOCK_M], dtype=tl.float32)
    amax_t = tl.zeros([BLOCK_M], dtype=tl.float32)
    amax_m = tl.zeros([BLOCK_M], dtype=tl.float32)
    for i in tl.static_range(len(STAGES)):
        a = _stage(x_ptr, stride_x, perm_ptr, smooth_ptr, f_ptr, xt_ptr, row0, rows, row_mask,
                   N, D, STAGES[i], BLOCK_M, PREC)  # fmt: skip
        if STAGES[i][2]:  # final stage of its path: a is the path's per-token absmax
            if STAGES[i][0] == 0:
                amax_v = a
            elif STAGES[i][0] == 1:
                amax_t = a
            else:
                amax_m = a
        # The next stage (or the quantize sweeps) reads what other threads just wrote.
        tl.debug_barrier()

    # ---- 2. scales, codes; main path also feeds the CWS down-projection and the MAC absmax ---
    s_v = token_scale(amax_v * tl.load(clip_ptr + 0), QMAX_V)
    s_t = token_scale(amax_t * tl.load(clip_ptr + 1), QMAX_T)
    s_m = token_scale(amax_m * tl.load(clip_ptr + 2), QMAX_M)
    tl.store(sx_ptr + rows * 3 + 0, s_v, mask=row_mask)
    tl.store(sx_ptr + rows * 3 + 1, s_t, mask=row_mask)
    tl.store(sx_ptr + rows * 3 + 2, s_m, mask=row_mask)
    if KV > 0:
        _quant_path(xt_ptr, qx_ptr, rows, row_mask, s_v, D, 0, KV, QMAX_V, BLOCK_K)
    if KT > 0:
        _quant_path(xt_ptr, qx_ptr, rows, row_mask, s_t, D, KV, KT, QMAX_T, BLOCK_K)

    START_M: tl.constexpr = KV + KT
    row_off = rows.to(tl.int64)[:, None] * D
    r1 = tl.arange(0, R1_P)
    R1: tl.constexpr = SEG1[len(SEG1) - 1][1]
    h_acc = tl.zeros([BLOCK_M, R1_P], dtype=tl.int32)
    u_max = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, KM, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        m = row_mask[:, None] & (kk < KM)[None, :]
        v = tl.load(xt_ptr + row_off + START_M + kk[None, :], mask=m, other=0.0)
        q = quantize_codes(v, s_m[:, None], QMAX_M)
        tl.store(qx_ptr + row_off + START_M + kk[None, :], q.to(tl.int8), mask=m)
        if HAS_CWS:
            # [BLOCK_K, R1_P]: element (k, r) = L2[r, k0 + k]; garbage at k >= KM meets q == 0.
            l2 = load_packed_kmajor(l2_ptr, r1, r1 < R1, stride_l2, k0, KM, CWS_W_BITS,
                                    BLOCK_K, R1_P)  # fmt: skip
            h_acc = tl.dot(q.to(tl.int8), l2, h_acc)
        if HAS_MAC:
            dq = q * s_m[:, None]
            if MAC_INPUT == 0:
                u = v - dq
            else:
                u = dq
            u_max = tl.maximum(u_max, tl.max(tl.abs(u), axis=1))

    if HAS_CWS:
        ws = tl.load(l2s_ptr + r1, mask=r1 < R1, other=0.0)
        h = h_acc.to(tl.float32) * s_m[:, None] * ws[None, :]  # padded columns are exactly 0
        hq = segment_quantize(h, r1, rows, row_mask, sh_ptr, SEG1, QMAX_CWS)
        hm = row_mask[:, None] & (r1 < R1)[None, :]
        tl.store(hq_ptr + rows.to(tl.int64)[:, None] * R1 + r1[None, :], hq.to(tl.int8), mask=hm)

    # ---- 3. MAC: quantize u per token, down-projection, per-segment hidden codes -------------
    if HAS_MAC:
        su = token_scale(u_max, QMAX_MAC)
        tl.store(su_ptr + rows, su, mask=row_mask)
        r2 = tl.arange(0, R2_P)
        R2: tl.constexpr = SEG2[len(SEG2) - 1][1]
        g_acc = tl.zeros([BLOCK_M, R2_P], dtype=tl.int32)
        for k0 in range(0, KM, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            m = row_mask[:, None] & (kk < KM)[None, :]
            v = tl.load(xt_ptr + row_off + START_M + kk[None, :], mask=m, other=0.0)
            dq = quantize_codes(v, s_m[:, None], QMAX_M) * s_m[:, None]
            if MAC_INPUT == 0:
                u = v - dq
            else:
                u = dq
            uq = quantize_codes(u, su[:, None], QMAX_MAC).to(tl.int8)
            if STORE_UQ:
                tl.store(uq_ptr + rows.to(tl.int64)[:, None] * KM + kk[None, :], uq, mask=m)
            l4 = load_packed_kmajor(l4_ptr, r2, r2 < R2, stride_l4, k0, KM, MAC_W_BITS,
                                    BLOCK_K, R2_P)  # fmt: skip
            g_acc = tl.dot(uq, l4, g_acc)
        ws = tl.load(l4s_ptr + r2, mask=r2 < R2, other=0.0)
        g = g_acc.to(tl.float32) * su[:, None] * ws[None, :]
        gq = segment_quantize(g, r2, rows, row_mask, sg_ptr, SEG2, QMAX_MAC)
        gm = row_mask[:, None] & (r2 < R2)[None, :]
        tl.store(gq_ptr + rows.to(tl.int64)[:, None] * R2 + r2[None, :], gq.to(tl.int8), mask=gm)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------
def qmax(bits: int) -> int:
    """``2^(bits-1) - 1``."""
    return (1 << (int(bits) - 1)) - 1


def rank_pad(r: int) -> int:
    """Padded rank: a power of two >= 32 (an int8 ``tl.dot`` needs K >= 32 on Hopper)."""
    return pow2_at_least(r, 32)


def segments(ranks: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """``(lo, hi)`` ranges of consecutive segments of the given widths."""
    out, off = [], 0
    for r in ranks:
        out.append((off, off + int(r)))
        off += int(r)
    return tuple(out)


def site_quant_config(n_tokens: int, interpret: bool | None = None) -> dict:
    """Block sizes of :func:`site_quant_kernel` for ``n_tokens`` rows (``interpret``: the
    interpreter's configuration; default: whether Triton runs interpreted).

    ``TILE``: fp32 elements of one transform tile; ``NO``: largest output block of a factor
    per ``tl.dot``. GPU: 16 tokens per program up to 64 tokens (the smallest M of the int8
    branch ``tl.dot``s; decode has one program per 16 tokens), 64 above (the down factors
    ``L2``/``L4`` are re-read once per program, so more tokens per program cut that traffic
    fourfold); 64/32-channel quantize steps (the unpacked ``[BLOCK_K, R]`` factor tiles of the
    branches dominate the registers); 4096-element transform tiles over 8 warps. The pass is
    memory bound; the values are untuned (no GPU was available). Interpreter: large blocks,
    since its cost is per program and per step.
    """
    if interpreting() if interpret is None else interpret:
        bm = pow2_at_least(min(max(n_tokens, 1), 64), 16)
        return {"BLOCK_M": bm, "BLOCK_K": 512, "TILE": 1 << 16, "NO": 256, "num_warps": 4}
    if n_tokens <= 64:
        return {"BLOCK_M": 16, "BLOCK_K": 64, "TILE": 4096, "NO": 64, "num_warps": 8,
                "num_stages": 2}  # fmt: skip
    return {"BLOCK_M": 64, "BLOCK_K": 32, "TILE": 4096, "NO": 64, "num_warps": 8,
            "num_stages": 2}  # fmt: skip


#: Token counts whose :func:`site_quant_config` differ on a GPU (for the compile check).
SITE_QUANT_GPU_TOKENS = (16, 4096)


def _best_cb(b: int, cap: int) -> int:
    """Power-of-two chunk of a ``b``-long axis, at most ``cap``: the largest one that pads the
    axis by at most 1/8, else the one that pads it least."""
    cap = max(int(cap), 1)
    cands = [1 << i for i in range(cap.bit_length()) if (1 << i) <= cap]
    cands = [c for c in cands if c <= triton.next_power_of_2(max(b, 1))] or [1]
    ok = [c for c in cands if math.ceil(b / c) * c * 8 <= b * 9]
    if ok:
        return max(ok)
    return min(cands, key=lambda c: (math.ceil(b / c) * c, -c))


def plan_stages(
    sizes: Sequence[int],
    factor_dims: Sequence[int],
    block_m: int,
    tile: int,
    no_max: int = 64,
    pair: bool = True,
) -> tuple[tuple[int, ...], ...]:
    """The stage table of :func:`site_quant_kernel` (one entry per factor, or per fused pair
    of factors, or one copy stage per path without factors; empty paths have none).

    Entry: ``(path, kind, final, start, k, A, NI, B, RO, CB, NP, f_off, NO, PAIR, f_off_b)``
    (module doc): kind 0 copy, 1 first stage of the path (gathers x), 2 later stage; ``NP`` =
    side padded to a power of two >= 16 (a ``tl.dot`` operand), ``NO = min(NP, no_max)``;
    ``RO * CB * NP <= tile`` (``tile * 64 / NP`` where ``NP > 64``) and ``RO * CB >= 16``; the
    final stage of a path is factor 0 (``A == 1``, ``RO`` divides ``block_m``). With ``pair``,
    the last two factors of a path run as one :func:`_kron_pair_stage` (``PAIR`` 1: ``NI``,
    ``B`` = the two sides, ``NP``, ``CB`` = their padded sides, ``f_off``/``f_off_b`` = their
    offsets) when both padded sides are <= 64.
    """
    stages, f_off, start = [], 0, 0
    for p in range(3):
        k = int(sizes[p])
        dims = [int(n) for n in factor_dims[3 * p : 3 * p + 3] if int(n)]
        if dims and math.prod(dims) != k:
            raise ValueError(f"path {p}: factor sides {dims} do not multiply to {k}")
        if k == 0:
            continue
        if not dims:
            cb = _best_cb(k, max(tile // block_m, 16))
            stages.append((p, 0, 1, start, k, 1, 1, k, block_m, cb, 1, 0, 1, 0, 0))
        else:
            offs = [f_off + sum(n * n for n in dims[:i]) for i in range(len(dims))]
            last = len(dims) - 1  # the factor the single stages start from
            nps = [pow2_at_least(n, 16) for n in dims]
            if pair and len(dims) >= 2 and max(nps[-2:]) <= 64:
                # The last two factors in one register pass (both padded sides <= 64).
                a = math.prod(dims[:-2])
                ro = min(triton.next_power_of_2(block_m * a), max(tile // (nps[-2] * nps[-1]), 1))
                stages.append((p, 1, int(len(dims) == 2), start, k, a, dims[-2], dims[-1], ro,
                               nps[-1], nps[-2], offs[-2], nps[-2], 1, offs[-1]))  # fmt: skip
                last = len(dims) - 3
            for i in range(last, -1, -1):
                a, ni, b = math.prod(dims[:i]), dims[i], math.prod(dims[i + 1 :])
                np_ = nps[i]
                kind = 1 if i == len(dims) - 1 else 2
                # Sides above 64 get half the budget: the fp32 operand splits of a tf32x3 dot
                # over a 128-wide factor exhaust the registers at full tiles (compile_check).
                budget = tile if np_ <= 64 else max(tile * 64 // np_, 16 * np_)
                cb = _best_cb(b, max(budget // (16 * np_), 1))
                ro = min(triton.next_power_of_2(block_m * a), max(budget // (cb * np_), 16))
                no = min(np_, no_max)
                stages.append(
                    (p, kind, int(i == 0), start, k, a, ni, b, ro, cb, np_, offs[i], no, 0, 0)
                )
        f_off += sum(n * n for n in dims)
        start += k
    return tuple(stages)


def site_quant_constexprs(
    sizes: Sequence[int],
    factor_dims: Sequence[int],
    cws_ranks: Sequence[int] | None,
    mac_ranks: Sequence[int] | None,
    a_bits: Sequence[int],
    branch_bits: Sequence[int],
    mac_input: int,
    store_uq: bool,
    cfg: dict,
    precision: str | None = None,
) -> dict:
    """Every constexpr argument of :func:`site_quant_kernel` (shared with the compile check).

    ``cws_ranks``/``mac_ranks`` None (or empty) = branch absent.
    """
    has_cws, has_mac = bool(cws_ranks), bool(mac_ranks)
    kv, kt, km = (int(k) for k in sizes)
    return {
        "KV": kv,
        "KT": kt,
        "KM": km,
        "STAGES": plan_stages(sizes, factor_dims, cfg["BLOCK_M"], cfg["TILE"], cfg["NO"]),
        "QMAX_V": qmax(a_bits[0]),
        "QMAX_T": qmax(a_bits[1]),
        "QMAX_M": qmax(a_bits[2]),
        "HAS_CWS": has_cws,
        "CWS_W_BITS": int(branch_bits[0]),
        "QMAX_CWS": qmax(branch_bits[1]),
        "SEG1": segments(cws_ranks) if has_cws else ((0, 1),),
        "R1_P": rank_pad(sum(cws_ranks) if has_cws else 1),
        "HAS_MAC": has_mac,
        "MAC_W_BITS": int(branch_bits[2]),
        "QMAX_MAC": qmax(branch_bits[3]),
        "SEG2": segments(mac_ranks) if has_mac else ((0, 1),),
        "R2_P": rank_pad(sum(mac_ranks) if has_mac else 1),
        "MAC_INPUT": int(mac_input),
        "STORE_UQ": bool(store_uq),
        "BLOCK_M": cfg["BLOCK_M"],
        "BLOCK_K": cfg["BLOCK_K"],
        "PREC": precision or TRANSFORM_PRECISION,
    }


def _f32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as fp32 (no op dispatched when it already is: less host time per launch)."""
    return t if t.dtype == torch.float32 else t.float()


def _ptr(t: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """``t``, or a placeholder pointer where ``t`` is absent or empty (never dereferenced)."""
    return fallback if t is None or t.numel() == 0 else t


def branch_args(p: SiteParams) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(cws_ranks, mac_ranks, branch_bits)`` of a site as the constexpr builders take them
    (an absent branch has no ranks; its bits are unused placeholders)."""
    cws, mac = p.cws, p.mac
    bits = (
        4 if cws is None else int(cws.w_bits),
        4 if cws is None else int(cws.act_bits),
        4 if mac is None else int(mac.w_bits),
        4 if mac is None else int(mac.act_bits),
    )
    cws_ranks = () if cws is None else tuple(cws.ranks)
    mac_ranks = () if mac is None else tuple(mac.ranks)
    return cws_ranks, mac_ranks, bits


def site_quantize_triton(
    x: torch.Tensor,
    p: SiteParams,
    store_uq: bool = False,
    precision: str | None = None,
) -> dict[str, torch.Tensor | None]:
    """Launch :func:`site_quant_kernel`: stages 1 and 2 of the site contract in one launch.

    Args:
        x: (N, d) fp32/bf16/fp16 input, original channel order.
        p: the site's parameters (activations must be quantized).
        store_uq: also return the MAC input codes ``uq`` (tests; costs N x km bytes).
        precision: ``tl.dot`` input precision of the transform (default
            :data:`TRANSFORM_PRECISION`).

    Returns:
        The dict of ``site_quantize_reference``: ``qx``, ``sx``, ``hq``, ``sh``, ``uq`` (None
        unless ``store_uq``), ``su``, ``gq``, ``sg`` and ``xt`` (the fp32 transformed input).
        Allocations depend on shapes only (CUDA-graph capturable); no host sync.
    """
    sizes = p.sizes
    factor_dims = [n for path in p.dims for n in (*path, 0, 0, 0)[:3]]
    cws_ranks, mac_ranks, branch_bits = branch_args(p)
    l2 = l2_scale = l4 = l4_scale = None
    if p.cws is not None:
        l2, l2_scale = p.cws.down, p.cws.down_scale
    if p.mac is not None:
        l4, l4_scale = p.mac.down, p.mac.down_scale
    perm, smooth, factors, act_clip = p.perm, p.smooth, p.factors, p.act_clip
    a_bits, mac_input = p.a_bits, p.mac_input
    kv, kt, km = (int(k) for k in sizes)
    n, d = x.shape
    if d != kv + kt + km:
        raise ValueError(f"x has {d} channels, sizes sum to {kv + kt + km}")
    if x.stride(1) != 1:
        x = x.contiguous()
    dev = x.device
    has_cws, has_mac = l2 is not None, l4 is not None
    m1, m2 = len(cws_ranks), len(mac_ranks)
    r1, r2 = int(sum(cws_ranks)), int(sum(mac_ranks))
    xt = torch.empty((n, d), dtype=torch.float32, device=dev)
    qx = torch.empty((n, d), dtype=torch.int8, device=dev)
    sx = torch.empty((n, 3), dtype=torch.float32, device=dev)
    hq = torch.empty((n, r1), dtype=torch.int8, device=dev) if has_cws else None
    sh = torch.empty((n, m1), dtype=torch.float32, device=dev) if has_cws else None
    gq = torch.empty((n, r2), dtype=torch.int8, device=dev) if has_mac else None
    sg = torch.empty((n, m2), dtype=torch.float32, device=dev) if has_mac else None
    su = torch.empty(n, dtype=torch.float32, device=dev) if has_mac else None
    uq = torch.empty((n, km), dtype=torch.int8, device=dev) if has_mac and store_uq else None
    out = {"qx": qx, "sx": sx, "hq": hq, "sh": sh, "uq": uq, "su": su, "gq": gq, "sg": sg}
    out["xt"] = xt
    if n == 0:
        return out
    cfg = site_quant_config(n)
    const = site_quant_constexprs(
        sizes, factor_dims, cws_ranks if has_cws else None, mac_ranks if has_mac else None,
        a_bits, branch_bits, mac_input, uq is not None, cfg, precision,
    )  # fmt: skip
    launch = {k: v for k, v in cfg.items() if k.startswith("num_")}
    grid = (triton.cdiv(n, cfg["BLOCK_M"]),)
    site_quant_kernel[grid](
        x, x.stride(0), perm, _f32(smooth), _ptr(_f32(factors), sx), _f32(act_clip),
        xt, qx, sx,
        _ptr(l2, qx), _ptr(l2_scale, sx), l2.stride(0) if has_cws else 0,
        _ptr(hq, qx), _ptr(sh, sx),
        _ptr(l4, qx), _ptr(l4_scale, sx), l4.stride(0) if has_mac else 0,
        _ptr(uq, qx), _ptr(su, sx), _ptr(gq, qx), _ptr(sg, sx),
        n,
        **const, **launch,
        # x - q*s must round like torch (no FMA contraction) for the MAC residual codes.
        enable_fp_fusion=False,
    )  # fmt: skip
    return out
