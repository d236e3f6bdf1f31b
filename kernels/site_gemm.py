"""Kernel B of a SplitQ activation site: one GEMM over the concatenated packed weights of the
site's linears, with the low-rank up-projections and the bias in the epilogue.

Hopper has no int4 tensor-core MMA, so each weight tile is unpacked to int8 in registers and fed
to an int8 ``tl.dot`` with int32 accumulation. The product is computed
transposed, ``y^T = W qx^T``: the unpacked weight tile is the left operand (on Hopper, WGMMA
reads only its A operand from registers, so the unpacked tile needs no trip through shared
memory) and the tokens are the N side, which can be as small as 16 (decode).

**Weights** are stored in the MMA block packing of format version 3
(``splitq_modifier.runtime.quant.pack_mma_weight``): 64-code blocks whose bytes hold 2, 4 or 8
*pieces* of the block side by side (4 bits: byte ``j`` = codes ``j`` and ``j + 32``), codes of
2-4 bits offset by ``+2^(b-1)``. One K step of ``BLOCK_K`` codes loads the step's bytes as a
``[BLOCK_O, BLOCK_K / P]`` uint8 tile per piece source (``P`` pieces per byte), splits each
32-bit register of it into its pieces with one mask-and-shift (inline PTX, four bytes per
instruction: :func:`_pieces4`, :func:`_pieces2`, :func:`_pieces3`) and concatenates the pieces
along K: operand column ``s * BLOCK_K / P + i`` is piece ``s`` of tile byte ``i``. The same
permutation of K is applied to the activation columns by their addresses
(:func:`_act_k`), which leaves the dot unchanged. Every piece is a multiple of 16 columns wide,
so the thread holding a byte in the loaded tile holds all its pieces in the MMA operand: no
byte moves between threads or registers. The offset is subtracted in the epilogue with the
per-token code sums ``qsum`` (``acc - 2^(b-1) * sum_k qx[t, k]``, exact in int32). Under
Triton's interpreter (no inline assembly) the pieces come from plain Triton ops with the
same result (``USE_ASM`` False).

One program computes a ``[BLOCK_O, BLOCK_T]`` tile of ``y^T`` (output channels x tokens):

* for each path p (main first, then vision, text; skipped at compile time when empty):
  ``acc_p = W_p[o, :] . qx[t, path p]`` (int32), then ``out += acc_p * sx[t, p] * ws_p[o]``;
* CWS, for each linear ``j`` whose output rows meet the tile:
  ``out[o in j] += (L1[o, :r_j] . hq[t, seg j]) * sh[t, j] * l1_scale[o]``, the rank in steps
  of 32 (the int8 MMA's K step);
* MAC, the same with ``L3``/``gq``/``sg``, on text tokens only (``text_mask``);
* ``+ bias``, cast to the output dtype, stored to ``y`` (N, D).

With equal codes the output equals the reference up to fp32 rounding order (the main path is
added first here, last in the reference) and FMA contraction: no quantization code depends on
either.

Token-count configurations (:func:`site_gemm_config`): at 1-16 tokens a GEMV-style tile
(64 output rows, the smallest warpgroup MMA, 16 tokens, 256-deep K steps) keeps the grid
wide enough to stream the weights from many SMs without a split-K reduction; at 2048+ tokens
128 x 128 tiles. Programs run in a grouped order (``GROUP_O`` output tiles x every token tile,
output tiles fastest), so that a wave's programs share weight tiles through L2 instead of
fetching the weights from HBM once per wave.

Layouts: ``qx`` (N, d) int8, paths at columns ``[0, kv)``, ``[kv, kv+kt)``, ``[kv+kt, d)``;
``sx`` (N, 3) fp32; ``qsum`` (N, 3) int32; path weights (D, words_p) int32 read as bytes;
``hq`` (N, R1), ``gq`` (N, R2) int8 with ``sh``/``sg`` (N, M) fp32; ``L1``/``L3`` dense-packed
(D, words(max rank)) (``common.load_packed_rows``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from .common import interpreting, load_packed_rows, pow2_at_least

if TYPE_CHECKING:  # no import at run time (see site_quant.py)
    from splitq_modifier.runtime.params import SiteParams

#: Codes per block of the weight layout (``splitq_modifier.runtime.quant.MMA_BLOCK``).
MMA_BLOCK = 64
#: The int8 MMA's K step: branch ranks are padded to a multiple of it.
MMA_K = 32
_BLK = tl.constexpr(MMA_BLOCK)
_MMA_K = tl.constexpr(MMA_K)


# --------------------------------------------------------------------------------------------
# Unpacking the MMA block layout
# --------------------------------------------------------------------------------------------
@triton.jit
def _cat(a, b, R: tl.constexpr, W: tl.constexpr):
    """``[R, W]`` and ``[R, W]`` -> ``[R, 2W]``, ``a`` then ``b`` along the columns."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), [R, 2 * W])


@triton.jit
def _pieces4(b, USE_ASM: tl.constexpr):
    """Low and high nibbles of uint8 ``b`` (4-bit codes ``j``, ``j + 32`` of a block)."""
    if USE_ASM:
        lo = tl.inline_asm_elementwise(
            "and.b32 $0, $1, 0x0F0F0F0F;", "=r,r", [b], dtype=tl.uint8, is_pure=True, pack=4
        )
        hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t; shr.u32 t, $1, 4; and.b32 $0, t, 0x0F0F0F0F; }",
            "=r,r", [b], dtype=tl.uint8, is_pure=True, pack=4,
        )  # fmt: skip
    else:
        lo = b & 15
        hi = b >> 4
    return lo, hi


@triton.jit
def _pieces2(b, USE_ASM: tl.constexpr):
    """The four 2-bit fields of uint8 ``b`` (codes ``j + 16 s`` of a block, s = 0-3)."""
    if USE_ASM:
        p0, p1, p2, p3 = tl.inline_asm_elementwise(
            """{ .reg .b32 t;
            and.b32 $0, $4, 0x03030303;
            shr.u32 t, $4, 2; and.b32 $1, t, 0x03030303;
            shr.u32 t, $4, 4; and.b32 $2, t, 0x03030303;
            shr.u32 t, $4, 6; and.b32 $3, t, 0x03030303; }""",
            "=r,=r,=r,=r,r", [b], dtype=(tl.uint8, tl.uint8, tl.uint8, tl.uint8),
            is_pure=True, pack=4,
        )  # fmt: skip
    else:
        p0 = b & 3
        p1 = (b >> 2) & 3
        p2 = (b >> 4) & 3
        p3 = b >> 6
    return p0, p1, p2, p3


@triton.jit
def _bit3(a, h, S: tl.constexpr, H: tl.constexpr):
    """Plain-op 3-bit piece: bits ``S, S+1`` of ``a`` and bit ``H`` of ``h`` (uint8)."""
    return ((a >> S) & 3) | (((h >> H) & 1) << 2)


@triton.jit
def _pieces3(a, b, h, USE_ASM: tl.constexpr):
    """The eight 3-bit pieces of a 3-bit block's bytes ``a`` (low bits of pieces 0-3),
    ``b`` (4-7) and ``h`` (bit 2 of pieces 0-7), each uint8 of one shape."""
    if USE_ASM:
        p0, p1, p2, p3, p4, p5, p6, p7 = tl.inline_asm_elementwise(
            """{ .reg .b32 t, u;
            shl.b32 u, $10, 2; and.b32 u, u, 0x04040404;
            and.b32 t, $8, 0x03030303; or.b32 $0, t, u;
            shl.b32 u, $10, 1; and.b32 u, u, 0x04040404;
            shr.u32 t, $8, 2; and.b32 t, t, 0x03030303; or.b32 $1, t, u;
            and.b32 u, $10, 0x04040404;
            shr.u32 t, $8, 4; and.b32 t, t, 0x03030303; or.b32 $2, t, u;
            shr.u32 u, $10, 1; and.b32 u, u, 0x04040404;
            shr.u32 t, $8, 6; and.b32 t, t, 0x03030303; or.b32 $3, t, u;
            shr.u32 u, $10, 2; and.b32 u, u, 0x04040404;
            and.b32 t, $9, 0x03030303; or.b32 $4, t, u;
            shr.u32 u, $10, 3; and.b32 u, u, 0x04040404;
            shr.u32 t, $9, 2; and.b32 t, t, 0x03030303; or.b32 $5, t, u;
            shr.u32 u, $10, 4; and.b32 u, u, 0x04040404;
            shr.u32 t, $9, 4; and.b32 t, t, 0x03030303; or.b32 $6, t, u;
            shr.u32 u, $10, 5; and.b32 u, u, 0x04040404;
            shr.u32 t, $9, 6; and.b32 t, t, 0x03030303; or.b32 $7, t, u; }""",
            "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r", [a, b, h],
            dtype=(tl.uint8, tl.uint8, tl.uint8, tl.uint8, tl.uint8, tl.uint8, tl.uint8,
                   tl.uint8),
            is_pure=True, pack=4,
        )  # fmt: skip
    else:
        p0 = _bit3(a, h, 0, 0)
        p1 = _bit3(a, h, 2, 1)
        p2 = _bit3(a, h, 4, 2)
        p3 = _bit3(a, h, 6, 3)
        p4 = _bit3(b, h, 0, 4)
        p5 = _bit3(b, h, 2, 5)
        p6 = _bit3(b, h, 4, 6)
        p7 = _bit3(b, h, 6, 7)
    return p0, p1, p2, p3, p4, p5, p6, p7


@triton.jit
def _load_bytes(ptr, MASKED: tl.constexpr, mask):
    if MASKED:
        return tl.load(ptr, mask=mask, other=0)
    return tl.load(ptr)


@triton.jit
def _weight_tile(
    w_ptr, row_off, k0,
    K: tl.constexpr, BITS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    MASKED: tl.constexpr, USE_ASM: tl.constexpr,
):  # fmt: skip
    """The ``[BLOCK_O, BLOCK_K]`` int8 weight operand of the K step at code ``k0`` (a multiple
    of ``BLOCK_K``), codes still offset, K permuted as :func:`_act_k` says.

    ``row_off``: ``[BLOCK_O]`` byte offsets of the rows; ``MASKED``: the step reaches past the
    row's stored blocks (the last, partial step), whose bytes then read as 0 (they meet zero
    activations).
    """
    NB: tl.constexpr = (K + _BLK - 1) // _BLK
    if BITS == 4:
        W: tl.constexpr = BLOCK_K // 2
        byte = k0 // 2 + tl.arange(0, W)
        b = _load_bytes(w_ptr + row_off[:, None] + byte[None, :], MASKED,
                        (byte < NB * 32)[None, :])  # fmt: skip
        lo, hi = _pieces4(b, USE_ASM)
        a = _cat(lo, hi, BLOCK_O, W)
    elif BITS == 2:
        W: tl.constexpr = BLOCK_K // 4
        byte = k0 // 4 + tl.arange(0, W)
        b = _load_bytes(w_ptr + row_off[:, None] + byte[None, :], MASKED,
                        (byte < NB * 16)[None, :])  # fmt: skip
        p0, p1, p2, p3 = _pieces2(b, USE_ASM)
        a = _cat(_cat(p0, p1, BLOCK_O, W), _cat(p2, p3, BLOCK_O, W), BLOCK_O, 2 * W)
    elif BITS == 3:
        W: tl.constexpr = BLOCK_K // 8
        i = tl.arange(0, W)
        blk = k0 // _BLK + i // 8
        byte = blk * 24 + i % 8
        ptrs = w_ptr + row_off[:, None] + byte[None, :]
        m = (blk < NB)[None, :]
        ba = _load_bytes(ptrs, MASKED, m)
        bb = _load_bytes(ptrs + 8, MASKED, m)
        bh = _load_bytes(ptrs + 16, MASKED, m)
        p0, p1, p2, p3, p4, p5, p6, p7 = _pieces3(ba, bb, bh, USE_ASM)
        q0 = _cat(_cat(p0, p1, BLOCK_O, W), _cat(p2, p3, BLOCK_O, W), BLOCK_O, 2 * W)
        q1 = _cat(_cat(p4, p5, BLOCK_O, W), _cat(p6, p7, BLOCK_O, W), BLOCK_O, 2 * W)
        a = _cat(q0, q1, BLOCK_O, 4 * W)
    else:  # 5-8 bits: one signed byte per code, natural order
        byte = k0 + tl.arange(0, BLOCK_K)
        a = _load_bytes(w_ptr + row_off[:, None] + byte[None, :], MASKED,
                        (byte < NB * _BLK)[None, :])  # fmt: skip
    return a.to(tl.int8, bitcast=True)


@triton.jit
def _act_k(BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Code index (from the step's first code) of each weight-operand column of
    :func:`_weight_tile`: column ``s * (BLOCK_K / P) + i`` is piece ``s`` of tile byte ``i``,
    i.e. code ``(i // G) * 64 + s * G + i % G`` with ``P`` pieces of ``G = 64 / P`` codes."""
    if BITS == 4:
        P: tl.constexpr = 2
    elif BITS == 2:
        P: tl.constexpr = 4
    elif BITS == 3:
        P: tl.constexpr = 8
    else:
        P: tl.constexpr = 1
    G: tl.constexpr = _BLK // P
    W: tl.constexpr = BLOCK_K // P
    c = tl.arange(0, BLOCK_K)
    s = c // W
    i = c % W
    k = (i // G) * _BLK + s * G + i % G
    # G-long runs of consecutive codes starting at multiples of G: told to the axis analysis,
    # which cannot derive it (without, the activations load byte by byte).
    return tl.max_contiguous(tl.multiple_of(k, G), G)


@triton.jit
def _path_acc(
    qx_ptr, t_row, w_ptr, row_off,
    START: tl.constexpr, K: tl.constexpr, BITS: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_ASM: tl.constexpr,
):  # fmt: skip
    """int32 ``U[o, :K] @ qx[t, START:START+K]^T`` for one path, ``[BLOCK_O, BLOCK_T]`` (``U``
    the stored, still offset codes). ``t_row``: ``[BLOCK_T]`` element offsets of the token
    rows of ``qx`` (clamped to real rows); ``row_off``: byte offsets of the weight rows."""
    acc = tl.zeros([BLOCK_O, BLOCK_T], dtype=tl.int32)
    kk = _act_k(BITS, BLOCK_K)
    K_FULL: tl.constexpr = (K // BLOCK_K) * BLOCK_K
    for k0 in range(0, K_FULL, BLOCK_K):
        a = _weight_tile(w_ptr, row_off, k0, K, BITS, BLOCK_O, BLOCK_K, False, USE_ASM)
        b = tl.load(qx_ptr + t_row[None, :] + (START + k0) + kk[:, None])  # [BLOCK_K, BLOCK_T]
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    if K_FULL < K:  # the partial last step
        a = _weight_tile(w_ptr, row_off, K_FULL, K, BITS, BLOCK_O, BLOCK_K, True, USE_ASM)
        k = K_FULL + kk
        b = tl.load(qx_ptr + t_row[None, :] + START + k[:, None], mask=(k < K)[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _path_out(
    out, acc, sx_ptr, qsum_ptr, ws_ptr, t_ld, o_ld,
    P: tl.constexpr, BITS: tl.constexpr, FIRST: tl.constexpr,
):  # fmt: skip
    """``out + (acc - offset * qsum[t, P]) * sx[t, P] * ws[o]`` (``out`` unused if FIRST)."""
    if BITS <= 4:
        acc = acc - (1 << (BITS - 1)) * tl.load(qsum_ptr + t_ld * 3 + P)[None, :]
    s = tl.load(sx_ptr + t_ld * 3 + P)
    ws = tl.load(ws_ptr + o_ld)
    y = acc.to(tl.float32) * s[None, :] * ws[:, None]
    if FIRST:
        return y
    return out + y


@triton.jit
def _branch_up(
    out, c_ptr, s_ptr, up_ptr, stride_up, ups_ptr, mask_ptr, o, o_ld, t, tm, t_ld, o_lo,
    OUT_SEGS: tl.constexpr, SEGS: tl.constexpr, BITS: tl.constexpr, R_MAX: tl.constexpr,
    MASKED: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Add one branch's up-projection, linear by linear, the rank in 32-wide steps."""
    M: tl.constexpr = len(SEGS)
    R: tl.constexpr = SEGS[M - 1][1]
    r = tl.arange(0, _MMA_K)
    om = o == o_ld  # rows of the site (o_ld clamps the others)
    ups = tl.load(ups_ptr + o_ld)
    if MASKED:
        is_text = tl.load(mask_ptr + t_ld) != 0
    for j in tl.static_range(M):
        lo_o = OUT_SEGS[j][0]
        hi_o = OUT_SEGS[j][1]
        lo_r = SEGS[j][0]
        if (o_lo < hi_o) & (o_lo + BLOCK_O > lo_o):
            acc = tl.zeros([BLOCK_O, BLOCK_T], dtype=tl.int32)
            for c in tl.static_range((R_MAX + _MMA_K - 1) // _MMA_K):
                if c * _MMA_K < SEGS[j][1] - SEGS[j][0]:  # compile time: 32-code rank steps
                    # [BLOCK_O, 32]: row o's codes c*32 .. c*32+31 (zero codes past its rank)
                    w = load_packed_rows(up_ptr, o_ld, om, stride_up, c * _MMA_K, R_MAX, BITS,
                                         _MMA_K, BLOCK_O)  # fmt: skip
                    rr = c * _MMA_K + r
                    h = tl.load(c_ptr + t_ld[None, :].to(tl.int64) * R + lo_r + rr[:, None],
                                mask=(rr < SEGS[j][1] - lo_r)[:, None], other=0)  # fmt: skip
                    acc = tl.dot(w, h, acc, out_dtype=tl.int32)
            s = tl.load(s_ptr + t_ld * M + j)
            dy = acc.to(tl.float32) * s[None, :] * ups[:, None]
            keep = ((o >= lo_o) & (o < hi_o))[:, None] & tm[None, :]
            if MASKED:
                keep = keep & is_text[None, :]
            out += tl.where(keep, dy, 0.0)
    return out


@triton.jit
def site_gemm_kernel(
    qx_ptr, sx_ptr, qsum_ptr, out_ptr,
    wv_ptr, wt_ptr, wm_ptr, wsv_ptr, wst_ptr, wsm_ptr,
    hq_ptr, sh_ptr, l1_ptr, stride_l1, l1s_ptr,
    gq_ptr, sg_ptr, l3_ptr, stride_l3, l3s_ptr, mask_ptr, bias_ptr,
    N,
    KV: tl.constexpr, KT: tl.constexpr, KM: tl.constexpr, OUT_SEGS: tl.constexpr,
    BITS_V: tl.constexpr, BITS_T: tl.constexpr, BITS_M: tl.constexpr,
    HAS_CWS: tl.constexpr, CWS_W_BITS: tl.constexpr, SEG1: tl.constexpr, R1_MAX: tl.constexpr,
    HAS_MAC: tl.constexpr, MAC_W_BITS: tl.constexpr, SEG2: tl.constexpr, R2_MAX: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_O: tl.constexpr,
    USE_ASM: tl.constexpr,
):  # fmt: skip
    """See the module docstring. Grid: ``(cdiv(D, BLOCK_O) * cdiv(N, BLOCK_T),)`` in grouped
    order.

    ``OUT_SEGS``: ``(lo, hi)`` output-row range of each linear; ``SEG1``/``SEG2``: its rank
    range in ``hq``/``gq`` (``((0, 1),)`` when the branch is absent). The weight pointers
    address bytes; each path's row stride is its packed row (whole 64-code blocks).
    """
    D: tl.constexpr = KV + KT + KM
    D_OUT: tl.constexpr = OUT_SEGS[len(OUT_SEGS) - 1][1]
    N_O: tl.constexpr = (D_OUT + BLOCK_O - 1) // BLOCK_O
    pid = tl.program_id(0)
    n_t = tl.cdiv(N, BLOCK_T)
    per_group = GROUP_O * n_t
    group = pid // per_group
    first_o = group * GROUP_O
    size = tl.minimum(N_O - first_o, GROUP_O)
    in_group = pid - group * per_group
    pid_o = first_o + in_group % size
    pid_t = in_group // size

    o_lo = pid_o * BLOCK_O
    o = o_lo + tl.arange(0, BLOCK_O)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    # Out-of-range rows and tokens read the last real one (no masks in the K loops); they are
    # not stored.
    o_ld = tl.minimum(o, D_OUT - 1)
    t_ld = tl.minimum(t, N - 1)
    tm = t < N
    t_row = t_ld.to(tl.int64) * D

    # Bytes per packed row of each path: whole 64-code blocks (runtime.quant.mma_block_bytes).
    RB_V: tl.constexpr = (KV + _BLK - 1) // _BLK * (8 * BITS_V if BITS_V <= 4 else 64)
    RB_T: tl.constexpr = (KT + _BLK - 1) // _BLK * (8 * BITS_T if BITS_T <= 4 else 64)
    RB_M: tl.constexpr = (KM + _BLK - 1) // _BLK * (8 * BITS_M if BITS_M <= 4 else 64)

    out = tl.zeros([BLOCK_O, BLOCK_T], dtype=tl.float32)
    if KM > 0:
        acc = _path_acc(qx_ptr, t_row, wm_ptr, o_ld.to(tl.int64) * RB_M, KV + KT, KM, BITS_M,
                        BLOCK_O, BLOCK_T, BLOCK_K, USE_ASM)  # fmt: skip
        out = _path_out(out, acc, sx_ptr, qsum_ptr, wsm_ptr, t_ld, o_ld, 2, BITS_M, True)
    if KV > 0:
        acc = _path_acc(qx_ptr, t_row, wv_ptr, o_ld.to(tl.int64) * RB_V, 0, KV, BITS_V,
                        BLOCK_O, BLOCK_T, BLOCK_K, USE_ASM)  # fmt: skip
        out = _path_out(out, acc, sx_ptr, qsum_ptr, wsv_ptr, t_ld, o_ld, 0, BITS_V, KM == 0)
    if KT > 0:
        acc = _path_acc(qx_ptr, t_row, wt_ptr, o_ld.to(tl.int64) * RB_T, KV, KT, BITS_T,
                        BLOCK_O, BLOCK_T, BLOCK_K, USE_ASM)  # fmt: skip
        out = _path_out(out, acc, sx_ptr, qsum_ptr, wst_ptr, t_ld, o_ld, 1, BITS_T,
                        (KM == 0) & (KV == 0))  # fmt: skip
    if HAS_CWS:
        out = _branch_up(out, hq_ptr, sh_ptr, l1_ptr, stride_l1, l1s_ptr, mask_ptr, o, o_ld, t,
                         tm, t_ld, o_lo, OUT_SEGS, SEG1, CWS_W_BITS, R1_MAX, False, BLOCK_O,
                         BLOCK_T)  # fmt: skip
    if HAS_MAC:
        out = _branch_up(out, gq_ptr, sg_ptr, l3_ptr, stride_l3, l3s_ptr, mask_ptr, o, o_ld, t,
                         tm, t_ld, o_lo, OUT_SEGS, SEG2, MAC_W_BITS, R2_MAX, HAS_MASK, BLOCK_O,
                         BLOCK_T)  # fmt: skip
    if HAS_BIAS:
        out += tl.load(bias_ptr + o_ld).to(tl.float32)[:, None]

    y_ptrs = out_ptr + t.to(tl.int64)[None, :] * D_OUT + o[:, None]
    tl.store(y_ptrs, out.to(out_ptr.dtype.element_ty), mask=(o < D_OUT)[:, None] & tm[None, :])


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------
# Fixed GPU configs by token count (no autotuning: it needs a GPU and hides the choice).
# (max tokens, BLOCK_O, BLOCK_T, BLOCK_K, num_warps, num_stages, GROUP_O). BLOCK_K is a
# multiple of 128 (whole 64-code blocks, 3-bit pieces 16 wide); BLOCK_O >= 64, so that Triton
# emits Hopper's warpgroup MMA (IGMMA, 64 rows per warpgroup) rather than mma.sync.
# Untuned (no GPU was available); from the sm_90 SASS (benchmarks/sass.py), Triton 3.9, at
# Qwen2.5-VL-7B attn_in, W4: main loop 0.54 / 0.88 / 0.81 / 0.88 integer instructions per
# code; the 128 x 128 tile takes 255 registers and spills ~190 values in its epilogue (not in
# the K loop), the others do not spill. Prefill uses it all the same: per MMA it issues half
# the unpack work of 128 x 64 (each unpacked weight tile serves 128 tokens).
SITE_GEMM_GPU_CONFIGS = (
    (16, 64, 16, 256, 4, 4, 1),  # decode: GEMV-style, one warpgroup, deep K steps
    (64, 64, 64, 128, 4, 4, 8),
    (512, 128, 64, 128, 8, 4, 16),
    (None, 128, 128, 128, 8, 3, 16),  # prefill
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
            "GROUP_O": 4,
            "num_warps": 4,
        }
    for max_n, bo, bt, bk, warps, stages, group in SITE_GEMM_GPU_CONFIGS:
        if max_n is None or n_tokens <= max_n:
            return {
                "BLOCK_O": bo,
                "BLOCK_T": bt,
                "BLOCK_K": bk,
                "GROUP_O": group,
                "num_warps": warps,
                "num_stages": stages,
            }
    raise AssertionError("unreachable")


def _segments(ranks: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """``(lo, hi)`` ranges of consecutive segments of the given widths."""
    out, off = [], 0
    for r in ranks:
        out.append((off, off + int(r)))
        off += int(r)
    return tuple(out)


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
    use_asm: bool | None = None,
) -> dict:
    """Every constexpr argument of :func:`site_gemm_kernel` (shared with the compile check).

    ``branch_bits``: (CWS factor bits, CWS act bits, MAC factor bits, MAC act bits);
    ``use_asm``: unpack with inline PTX (default: unless Triton runs interpreted)."""
    has_cws, has_mac = bool(cws_ranks), bool(mac_ranks)
    kv, kt, km = (int(k) for k in sizes)
    if cfg["BLOCK_K"] % 128:
        raise ValueError(f"BLOCK_K must be a multiple of 128, got {cfg['BLOCK_K']}")
    return {
        "KV": kv,
        "KT": kt,
        "KM": km,
        "OUT_SEGS": _segments(out_splits),
        "BITS_V": int(w_bits[0]),
        "BITS_T": int(w_bits[1]),
        "BITS_M": int(w_bits[2]),
        "HAS_CWS": has_cws,
        "CWS_W_BITS": int(branch_bits[0]),
        "SEG1": _segments(cws_ranks) if has_cws else ((0, 1),),
        "R1_MAX": max(cws_ranks) if has_cws else 1,
        "HAS_MAC": has_mac,
        "MAC_W_BITS": int(branch_bits[2]),
        "SEG2": _segments(mac_ranks) if has_mac else ((0, 1),),
        "R2_MAX": max(mac_ranks) if has_mac else 1,
        "HAS_MASK": bool(has_mask),
        "HAS_BIAS": bool(has_bias),
        "BLOCK_O": cfg["BLOCK_O"],
        "BLOCK_T": cfg["BLOCK_T"],
        "BLOCK_K": cfg["BLOCK_K"],
        "GROUP_O": cfg["GROUP_O"],
        "USE_ASM": (not interpreting()) if use_asm is None else bool(use_asm),
    }


def _ptr(t: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """``t``, or a placeholder pointer where ``t`` is absent or empty (never dereferenced)."""
    return fallback if t is None or t.numel() == 0 else t


def _bytes(w: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Packed int32 path weights as their bytes (row-major, little-endian)."""
    if w.numel() == 0:
        return fallback
    return w.contiguous().view(torch.uint8)


def code_sums(qx: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Per-token code sums of each path, (N, 3) int32 (``acts["qsum"]``; for kernel A's that do
    not return them)."""
    parts = qx.split([int(k) for k in sizes], dim=1)
    return torch.stack([q.sum(dim=1, dtype=torch.int32) for q in parts], dim=1)


def branch_bits_of(p: SiteParams) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(cws_ranks, mac_ranks, branch_bits)`` of a site as :func:`site_gemm_constexprs` takes
    them (an absent branch has no ranks; its bits are unused placeholders)."""
    cws, mac = p.cws, p.mac
    bits = (
        4 if cws is None else int(cws.w_bits),
        4 if cws is None else int(cws.act_bits),
        4 if mac is None else int(mac.w_bits),
        4 if mac is None else int(mac.act_bits),
    )
    cws_ranks = () if cws is None else tuple(cws.ranks)
    return cws_ranks, (() if mac is None else tuple(mac.ranks)), bits


def site_gemm_triton(
    acts: dict[str, torch.Tensor | None],
    p: SiteParams,
    text_mask: torch.Tensor | None,
    out_dtype: torch.dtype | None,
) -> torch.Tensor:
    """Launch :func:`site_gemm_kernel`; same arguments as ``site_gemm_reference``.

    ``acts`` holds ``qx``, ``sx``, ``qsum`` and, with the branches, ``hq``/``sh`` and
    ``gq``/``sg`` (from :func:`site_quantize_triton` or the reference; a missing ``qsum`` is
    computed here with torch). ``out_dtype`` None = fp32, as in the reference. Activations
    must be quantized; ``p``'s path weights in the MMA block packing (format version 3).
    """
    sizes, out_splits = p.sizes, p.out_splits
    cws_ranks, mac_ranks, branch_bits = branch_bits_of(p)
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
    qsum = acts.get("qsum")
    if qsum is None:
        qsum = code_sums(qx, sizes)
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
    fallback = qx.view(torch.uint8)
    wv, wt, wm = (_bytes(w, fallback) for w in p.w_packed)
    grid = (triton.cdiv(d_out, cfg["BLOCK_O"]) * triton.cdiv(n, cfg["BLOCK_T"]),)
    site_gemm_kernel[grid](
        qx, sx, qsum, out,
        wv, wt, wm, _ptr(ws_v, sx), _ptr(ws_t, sx), _ptr(ws_m, sx),
        _ptr(acts["hq"] if has_cws else None, qx), _ptr(acts["sh"] if has_cws else None, sx),
        _ptr(l1, qsum), l1.stride(0) if has_cws else 0, _ptr(l1_scale, sx),
        _ptr(acts["gq"] if has_mac else None, qx), _ptr(acts["sg"] if has_mac else None, sx),
        _ptr(l3, qsum), l3.stride(0) if has_mac else 0, _ptr(l3_scale, sx),
        _ptr(mask_u8, fallback), _ptr(bias, sx),
        n,
        **const, **launch,
        # FMA contraction allowed: it only touches the fp32 epilogue (not a quantization code).
        enable_fp_fusion=True,
    )  # fmt: skip
    return out
