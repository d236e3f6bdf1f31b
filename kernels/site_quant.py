"""Kernel A of a SplitQ activation site: transform, quantize, branch down-projections.

Launches (:func:`site_quantize_triton`; geometry from :func:`site_quant_grid`):

* **K1** :func:`site_quant_kernel`: ``G`` programs, each a contiguous range of tokens (at
  prefill one range per SM, so the busiest SM does ``cdiv(N, SMs)`` tokens; at decode one
  token per program) in blocks of up to 16 rows; programs loop over real rows only. For each
  token and path (order vision | text | main) it computes the path's transformed values
  (gather ``x[:, perm]``, smoothing, Kronecker factors) as a register tile, takes the
  per-token absmax, quantizes every element once and stores the codes ``qx`` (N, d), the
  scale ``sx`` (N, 3) and the exact code sum ``qsum`` (N, 3). On the main path it also forms
  the MAC input ``u`` (the quantization residual, ``mac_input`` 0, or the dequantized value,
  1) and stores its codes ``uq`` (N, km), scale ``su`` and code sum. Path modes
  (:func:`plan_path`):

  - 0, no factor: the path itself, in chunks of ``CB`` channels;
  - 1, one factor ``n``: a vector-matrix product (fp32);
  - 2, two factors ``NA x NB``: the whole token as one ``[NPA, NPB]`` tile,
    ``Y = M_a^T (X M_b)`` (two ``tl.dot``); the result's element ``(i, o)`` is channel
    ``i * NB + o``, the address of the input element it replaces;
  - 3, three factors ``n0 x n1 x n2``: the last two factors run as in mode 2 on steps of
    ``SA`` slices and write ``Z`` (n0, n1 n2) fp32 to the program's scratch slot (``K``
    floats: ``G`` slots in all, on chip or in L2); the first factor then runs on
    ``[NP0, CB]`` column chunks of ``Z``.

  Where the final tile holds the whole token (modes 1 and 2, and 0/3 with one chunk) the
  codes come from the registers that computed it. Otherwise the final tile is computed again
  per pass (absmax; codes and the MAC input's absmax; MAC codes; mode 3 keeps ``u`` in the
  slot for the last pass): no fp32 copy of the transformed input leaves the chip or L2.
  At prefill the outlier paths run on token tiles (:func:`_path_rows`: the block's tokens are
  the rows, no element replicated across threads).

  Branch down-projections: with ``BRANCH == 1`` (prefill) the program then runs them for its
  block (:func:`_branch_group`: int8 ``tl.dot`` over rank pieces, powers of two from 128 down
  to 32 that add up to the rank padded to 32, one K loop per four pieces, reading back the
  codes it just stored) into the int32 workspace ``acc`` (N, R1P + R2P + 1) and quantizes the
  hidden states per linear segment (:func:`_branch_epilogue`) into ``hq``/``sh``,
  ``gq``/``sg``. With ``BRANCH == 2`` (decode) it zeroes its rows of ``acc`` and the tile
  counters for K2.
* **K2** :func:`site_branch_kernel` (decode only): ``S`` K-splits x 16-token tiles; each
  program adds its int32 partial down-projections to ``acc`` with relaxed integer atomics
  (exact and order-independent) and the last program of a tile (an ``acq_rel`` counter that
  K1 zeroed) runs :func:`_branch_epilogue`.

Precision. The main path at <= 4 activation bits with >= 2 factors is *fast*: ``tl.dot`` with
fp16 operands and fp32 accumulation, the input of each dot chain scaled by a per-token (mode
2) or per-slice-step (mode 3, first stage; then per token for the last factor) power of two
that puts its absmax in [8, 16) (:func:`_pow2_scale`; exact, folded back into the
quantization scale, so fp16 cannot overflow unless the factors grow values 4096-fold),
codes as ``round(y * (1 / s))``. Every other path is *exact*: fp32 products ("ieee" for the
outlier paths, "tf32x3" for an exact main path) and codes ``round(div_rn(y, s))``, the
reference's decisions up to fp32 summation order (the MAC residual's product is a ``mul.rn``,
never contracted). Scales use the reference's formula (``div_rn``); rounding is half-to-even
through ``+ 1.5 * 2^23``, whose low byte is also the int8 code. ``qsum`` is exact (integer
sums below 2^24 in fp32). Under Triton's interpreter fp16 operands are rounded as on a GPU
(explicit casts) and the dot accumulates in fp32.

Layouts: ``x`` (N, d), unit stride along d, original channel order; ``perm`` int32 (d,);
``smooth`` fp32 (d,) and ``qx`` (N, d) in path order; ``factors`` fp32 flat (path 0's
factors, then 1's, then 2's, each row-major); ``L2``/``L4`` dense-packed int32 (R, words(km)),
contiguous (the row stride is a constexpr); 4-bit factors are read as bytes: byte ``j`` of a
row holds codes ``2j`` (low nibble) and ``2j + 1`` (high nibble), offset by +8, which the
epilogue removes with the activation code sums.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from .common import (
    interpreting,
    load_packed_kmajor,
    pow2_at_least,
    token_scale,
)

if TYPE_CHECKING:  # no import at run time: kernels/ must not import the package (it is also
    # importable as a top-level ``kernels`` from the repository root, where transformers
    # probes for the Hugging Face ``kernels`` package)
    from splitq_modifier.runtime.params import SiteParams

#: ``tl.dot`` input precision of an exact main path (8-bit activations) on a GPU: three TF32
#: tensor-core products, fp32-level error (fp32 CUDA-core dots would take as long as the GEMM).
#: Under the interpreter every fp32 dot is a numpy fp32 matmul.
TRANSFORM_PRECISION = "tf32x3"
#: ``tl.dot`` input precision of the outlier paths (small fp32 tiles): CUDA-core FMAs. (tf32x3
#: saves ~4 % of K1's instructions at 7B widths but spills registers: compiled for sm_90.)
OUTLIER_PRECISION = "ieee"
#: Branch rank step: ranks are padded to a multiple of this (one int8 MMA N step).
RANK_STEP = 32
#: Rows of a branch down-projection tile (the smallest M of an int8 ``tl.dot``).
BRANCH_ROWS = 16
#: Rows per step of K2's epilogue (decode tiles hold 1-16 real tokens: 4 balances one token's
#: cost against sixteen's, compiled for sm_90).
K2_EPILOGUE_ROWS = 4
#: Largest register tile of a transform stage (fp32 elements per program).
TILE_MAX = 8192
#: Largest whole-token tile of a mode-2 path (``NPA * NPB``).
PAIR_MAX = 16384
#: Chunk of a mode-0 path (no factor): longer paths take several passes over ``x``.
COPY_CHUNK = 2048
#: 1.5 * 2^23: ``x + _MAGIC`` rounds ``x`` to an integer, half to even (``|x| < 2^22``).
_MAGIC = tl.constexpr(12582912.0)


# --------------------------------------------------------------------------------------------
# Scalar and elementwise helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _pow2_scale(amax):
    """``(sc, inv_sc)``: exact powers of two with ``amax * sc`` in [8, 16) (``amax`` >= 0;
    the exponent is clamped to the normal range, so ``amax == 0`` gives 2^126)."""
    e = (amax.to(tl.int32, bitcast=True) >> 23) & 255
    b = tl.minimum(tl.maximum(257 - e, 1), 253)
    sc = (b << 23).to(tl.float32, bitcast=True)
    inv = ((254 - b) << 23).to(tl.float32, bitcast=True)
    return sc, inv


@triton.jit
def _scale_of(amax_sc, inv_sc, sc, clip, QMAX: tl.constexpr):
    """Per-token scale ``s = max(amax * clip, 1e-8) / QMAX`` (the reference's formula) from
    the absmax of a tile scaled by ``sc``; also ``s * sc`` and ``1 / (s * sc)``."""
    s = token_scale(amax_sc * inv_sc * clip, QMAX)
    s_eff = s * sc
    inv = tl.div_rn(tl.full([], 1.0, tl.float32), s_eff)
    return s, s_eff, inv


@triton.jit
def _codes(y, inv, s, QMAX: tl.constexpr, FAST: tl.constexpr, CLAMP: tl.constexpr = True):
    """``(q, code)``: ``clamp(round_half_even(y / s))`` as fp32 integers and as int8.

    ``FAST``: ``y * inv`` (``inv = 1 / s``, the main path at <= 4 bits); else IEEE ``div_rn``
    (the reference's decision). Clamping before rounding gives the same code (integer bounds,
    monotone rounding); ``CLAMP`` False where ``|y| <= QMAX * s`` holds by construction (the
    MAC input, whose scale is its own absmax). The rounding adds 1.5 * 2^23, whose bit
    pattern's low byte is the code in two's complement."""
    if FAST:
        v = y * inv
    else:
        v = tl.div_rn(y, s)
    if CLAMP:
        v = tl.minimum(tl.maximum(v, -QMAX - 1.0), QMAX * 1.0)
    t = v + _MAGIC
    return t - _MAGIC, t.to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def _mul_rn(a, b, ASM: tl.constexpr):
    """``a * b`` rounded on its own (PTX ``mul.rn``: never contracted into an FMA), for the
    exact MAC residual ``y - q * s`` of the reference; plain under the interpreter."""
    if ASM:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b],
                                         dtype=tl.float32, is_pure=True, pack=1)  # fmt: skip
    else:
        return a * b


@triton.jit
def _residual(y, q, s_eff, MAC_INPUT: tl.constexpr, FAST: tl.constexpr, ASM: tl.constexpr):
    """The MAC input: ``y - q * s`` (``MAC_INPUT`` 0) or ``q * s`` (1), with the product
    rounded on its own on exact paths (as the reference computes it)."""
    if FAST:
        dq = q * s_eff
    else:
        dq = _mul_rn(q, s_eff, ASM)
    if MAC_INPUT == 0:
        return y - dq
    else:
        return dq


@triton.jit
def _nibbles(b, ASM: tl.constexpr):
    """Low and high nibbles of uint8 ``b`` as int8 (0..15): four bytes per 32-bit PTX
    instruction on a GPU (``ASM``), plain Triton ops under the interpreter."""
    if ASM:
        lo = tl.inline_asm_elementwise(
            "and.b32 $0, $1, 0x0F0F0F0F;", "=r,r", [b], dtype=tl.uint8, is_pure=True, pack=4
        )
        hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t; shr.u32 t, $1, 4; and.b32 $0, t, 0x0F0F0F0F; }",
            "=r,r",
            [b],
            dtype=tl.uint8,
            is_pure=True,
            pack=4,
        )
    else:
        lo = b & 15
        hi = b >> 4
    return lo.to(tl.int8, bitcast=True), hi.to(tl.int8, bitcast=True)


# --------------------------------------------------------------------------------------------
# Transform tiles
# --------------------------------------------------------------------------------------------
#: ``tl.dot`` input precisions of the fp32 (exact) paths, by the code the path plans carry
#: (Triton 3.6 cannot pass a string taken from a constexpr tuple to a jit function).
PRECISIONS = ("ieee", "tf32x3", "tf32")


@triton.jit
def _dot32(a, b, PREC: tl.constexpr):
    """fp32 ``tl.dot`` at input precision ``PRECISIONS[PREC]``."""
    if PREC == 1:
        return tl.dot(a, b, input_precision="tf32x3")
    elif PREC == 2:
        return tl.dot(a, b, input_precision="tf32")
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _gather(x_row, perm_ptr, smooth_ptr, col, m):
    """``x[perm[col]] * smooth[col]`` in fp32 (0 where ``m`` is false)."""
    src = tl.load(perm_ptr + col, mask=m)  # masked lanes: no load of x either
    v = tl.load(x_row + src, mask=m, other=0.0).to(tl.float32)
    return v * tl.load(smooth_ptr + col, mask=m, other=0.0)


@triton.jit
def _fast_factors(
    f_ptr, MODE: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
    NP0: tl.constexpr, NP1: tl.constexpr, NP2: tl.constexpr, F0: tl.constexpr,
    F1: tl.constexpr, F2: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    """The fp16 factors of a fast path, loaded once per program: ``(M_0^T, M_1, M_2)``
    zero-padded (mode 2: ``M_a^T``, ``M_b``; zeros elsewhere)."""
    if FAST:
        i = tl.arange(0, NP0)
        im = i < N0
        fa = tl.load(f_ptr + F0 + i[None, :] * N0 + i[:, None], mask=im[:, None] & im[None, :],
                     other=0.0).to(tl.float16)  # fmt: skip
        j = tl.arange(0, NP1)
        jm = j < N1
        fb = tl.load(f_ptr + F1 + j[:, None] * N1 + j[None, :], mask=jm[:, None] & jm[None, :],
                     other=0.0).to(tl.float16)  # fmt: skip
        if MODE == 3:
            c = tl.arange(0, NP2)
            cm = c < N2
            fc = tl.load(f_ptr + F2 + c[:, None] * N2 + c[None, :],
                         mask=cm[:, None] & cm[None, :], other=0.0).to(tl.float16)  # fmt: skip
        else:
            fc = 0.0
    else:
        fa = 0.0
        fb = 0.0
        fc = 0.0
    return fa, fb, fc


@triton.jit
def _tile(
    x_row, perm_ptr, smooth_ptr, f_ptr, fa, fb, scr, scr16, c0, zsc, inv_zsc,
    START: tl.constexpr, K: tl.constexpr, MODE: tl.constexpr, N0: tl.constexpr,
    N1: tl.constexpr, N2: tl.constexpr, NP0: tl.constexpr, NP1: tl.constexpr,
    F0: tl.constexpr, F1: tl.constexpr, CB: tl.constexpr, FAST: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """One final tile of a path for one token: ``(y, col, mask, sc, 1 / sc)``: the
    transformed values times ``sc`` (a power of two; 1 on exact paths), their channel offsets
    in the path and the mask of real channels. Padded entries of ``y`` are exactly 0.

    Mode 0: channels ``[c0, c0 + CB)``. Mode 1: the whole path (``N0``, padded ``NP0``).
    Mode 2: the whole path (``N0 x N1``, padded ``NP0 x NP1``). Mode 3: the first factor
    (``N0``) on columns ``[c0, c0 + CB)`` of the scratch ``Z`` (``N0 x N1 N2``), ``zsc``
    being the token's scale of ``Z``. Fast paths take their fp16 factors ``fa`` (the first,
    transposed) and ``fb`` (mode 2's second) from :func:`_fast_factors`; exact paths load them.
    """
    if MODE == 0:
        col = c0 + tl.arange(0, CB)
        m = col < K
        y = _gather(x_row, perm_ptr + START, smooth_ptr + START, col, m)
        sc = 1.0
        inv_sc = 1.0
    elif MODE == 1:
        col = tl.arange(0, NP0)
        m = col < N0
        v = _gather(x_row, perm_ptr + START, smooth_ptr + START, col, m)
        mat = tl.load(f_ptr + F0 + col[:, None] * N0 + col[None, :],
                      mask=m[:, None] & m[None, :], other=0.0)  # fmt: skip
        y = tl.sum(v[:, None] * mat, axis=0)  # [NP0], output channel o
        sc = 1.0
        inv_sc = 1.0
    elif MODE == 2:
        j = tl.arange(0, NP0)
        c = tl.arange(0, NP1)
        jm = j < N0
        cm = c < N1
        col = j[:, None] * N1 + c[None, :]
        m = jm[:, None] & cm[None, :]
        v = _gather(x_row, perm_ptr + START, smooth_ptr + START, col, m)  # [NPA (j), NPB (c)]
        if FAST:
            sc, inv_sc = _pow2_scale(tl.max(tl.abs(v)))
            z = tl.dot((v * sc).to(tl.float16), fb)
            y = tl.dot(fa, z.to(tl.float16))
        else:
            mat_b = tl.load(f_ptr + F1 + c[:, None] * N1 + c[None, :],
                            mask=cm[:, None] & cm[None, :], other=0.0)  # fmt: skip
            # (i, j) = M_a[j, i]: the left operand of Y = M_a^T Z
            mat_at = tl.load(f_ptr + F0 + j[None, :] * N0 + j[:, None],
                             mask=jm[:, None] & jm[None, :], other=0.0)  # fmt: skip
            sc = 1.0
            inv_sc = 1.0
            z = _dot32(v, mat_b, PREC)
            y = _dot32(mat_at, z, PREC)
        # y[i, o] is channel i * N1 + o: the address of the input element (i, o).
    else:
        C: tl.constexpr = N1 * N2
        i = tl.arange(0, NP0)
        cc = c0 + tl.arange(0, CB)
        im = i < N0
        m = im[:, None] & (cc < C)[None, :]
        if FAST:
            # Z as stored: fp16, row a scaled by its step's power of two; rescaled to the
            # token's (exact: powers of two in fp16's range, or rows below 2^-24 of the max).
            z = tl.load(scr16 + i[:, None] * C + cc[None, :], mask=m, other=0.0)
            row = (tl.load(scr + K + i, mask=im, other=0.0) * zsc).to(tl.float16)
            y = tl.dot(fa, z * row[:, None])
        else:
            z = tl.load(scr + i[:, None] * C + cc[None, :], mask=m, other=0.0)  # [NP0, CB]
            mat_0t = tl.load(f_ptr + F0 + i[None, :] * N0 + i[:, None],
                             mask=im[:, None] & im[None, :], other=0.0)  # fmt: skip
            y = _dot32(mat_0t, z, PREC)
        col = i[:, None] * C + cc[None, :]
        sc = zsc
        inv_sc = inv_zsc
    return y, col, m, sc, inv_sc


@triton.jit
def _triple_stage1(
    x_row, perm_ptr, smooth_ptr, f_ptr, fb, fc, scr, scr16,
    START: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
    NP1: tl.constexpr, NP2: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr,
    SA: tl.constexpr, FAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Mode 3, first stage: ``Z[a] = M_1^T X[a] M_2`` for every slice ``a`` of the token
    (``X`` viewed as ``(N0, N1, N2)``), ``SA`` slices per step, written to the scratch slot
    as ``(N0, N1 N2)``: fp32 at ``scr`` on exact paths; on fast paths fp16 at ``scr16`` as the
    step computed it (its input scaled by a power of two), the inverse scale of each slice at
    ``scr[K + a]``. Returns the token's ``max |Z|``.

    A step loads ``[SA, NP1, NP2]``, multiplies by ``M_2`` on the last axis, transposes to
    ``[SA, NP2, NP1]`` and multiplies by ``M_1``."""
    K: tl.constexpr = N0 * N1 * N2
    C: tl.constexpr = N1 * N2
    sl = tl.arange(0, SA)
    j = tl.arange(0, NP1)
    c = tl.arange(0, NP2)
    jm = j < N1
    cm = c < N2
    if FAST:
        mat_2 = fc
        mat_1 = fb
    else:
        mat_2 = tl.load(f_ptr + F2 + c[:, None] * N2 + c[None, :],
                        mask=cm[:, None] & cm[None, :], other=0.0)  # fmt: skip
        mat_1 = tl.load(f_ptr + F1 + j[:, None] * N1 + j[None, :],
                        mask=jm[:, None] & jm[None, :], other=0.0)  # fmt: skip
    zmax = tl.zeros([], dtype=tl.float32)
    for a0 in range(0, N0, SA):
        a = a0 + sl
        am = a < N0
        col = (a * C)[:, None, None] + (j * N2)[None, :, None] + c[None, None, :]
        m = am[:, None, None] & jm[None, :, None] & cm[None, None, :]
        v = tl.reshape(
            _gather(x_row, perm_ptr + START, smooth_ptr + START, col, m), [SA * NP1, NP2]
        )
        if FAST:
            sc, inv_sc = _pow2_scale(tl.max(tl.abs(v)))
            z = tl.dot((v * sc).to(tl.float16), mat_2).to(tl.float16)
        else:
            z = _dot32(v, mat_2, PREC)
        z = tl.reshape(tl.permute(tl.reshape(z, [SA, NP1, NP2]), (0, 2, 1)), [SA * NP2, NP1])
        if FAST:
            y = tl.dot(z, mat_1)
        else:
            y = _dot32(z, mat_1, PREC)
        y = tl.reshape(y, [SA, NP2, NP1])  # (a, o2, i1): channel a*C + i1*N2 + o2
        col_o = (a * C)[:, None, None] + c[None, :, None] + (j * N2)[None, None, :]
        mo = am[:, None, None] & cm[None, :, None] & jm[None, None, :]
        if FAST:
            tl.store(scr16 + col_o, y.to(tl.float16), mask=mo)
            tl.store(scr + K + a, tl.zeros([SA], tl.float32) + inv_sc, mask=am)
            zmax = tl.maximum(zmax, tl.max(tl.abs(y)) * inv_sc)
        else:
            tl.store(scr + col_o, y, mask=mo)
            zmax = tl.maximum(zmax, tl.max(tl.abs(y)))
    return zmax


# --------------------------------------------------------------------------------------------
# One path of one token
# --------------------------------------------------------------------------------------------
@triton.jit
def _path(
    x_row, perm_ptr, smooth_ptr, f_ptr, fa, fb, fc, clip_ptr, q_row, u_row, scr, scr16,
    P: tl.constexpr, START: tl.constexpr, K: tl.constexpr, MODE: tl.constexpr,
    N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, NP0: tl.constexpr,
    NP1: tl.constexpr, NP2: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr,
    F2: tl.constexpr, CB: tl.constexpr, SA: tl.constexpr, NCH: tl.constexpr,
    FAST: tl.constexpr, PREC: tl.constexpr, QMAX: tl.constexpr,
    MAC: tl.constexpr, QMAX_U: tl.constexpr, MAC_INPUT: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """Transform and quantize path ``P`` of one token (module doc). Stores the codes at
    ``q_row + START`` (``qx[t, START:]``) and, with ``MAC``, the MAC input codes at ``u_row``
    (``uq[t, :]``). Returns ``(s, qsum, su, usum)`` (the scale and code sum of the path and
    of the MAC input; 0 without ``MAC``)."""
    clip = tl.load(clip_ptr + P)
    su = tl.zeros([], dtype=tl.float32)
    usum = tl.zeros([], dtype=tl.float32)
    if K == 0:
        s = token_scale(tl.zeros([], dtype=tl.float32) * clip, QMAX)
        qsum = tl.zeros([], dtype=tl.float32)
    else:
        zsc = 1.0
        inv_zsc = 1.0
        if MODE == 3:
            zmax = _triple_stage1(x_row, perm_ptr, smooth_ptr, f_ptr, fb, fc, scr, scr16, START,
                                  N0, N1, N2, NP1, NP2, F1, F2, SA, FAST, PREC)  # fmt: skip
            tl.debug_barrier()  # the slot is read by other threads below
            if FAST:
                zsc, inv_zsc = _pow2_scale(zmax)
        if NCH == 1:
            # The whole token is one register tile: every pass on the same registers.
            y, col, m, sc, inv_sc = _tile(
                x_row, perm_ptr, smooth_ptr, f_ptr, fa, fb, scr, scr16, 0, zsc, inv_zsc, START, K,
                MODE, N0, N1, N2, NP0, NP1, F0, F1, CB, FAST, PREC,
            )  # fmt: skip
            s, s_eff, inv = _scale_of(tl.max(tl.abs(y)), inv_sc, sc, clip, QMAX)
            q, code = _codes(y, inv, s, QMAX, FAST)
            tl.store(q_row + START + col, code, mask=m)
            qsum = tl.sum(q)
            if MAC:
                u = _residual(y, q, s_eff, MAC_INPUT, FAST, ASM)
                su, su_eff, inv_u = _scale_of(tl.max(tl.abs(u)), inv_sc, sc, 1.0, QMAX_U)
                uf, ucode = _codes(u, inv_u, su, QMAX_U, FAST, False)
                tl.store(u_row + col, ucode, mask=m)
                usum = tl.sum(uf)
        else:
            # Chunked: absmax, then codes (+ MAC absmax), then MAC codes. Each pass recomputes
            # the chunk from x (mode 0) or the scratch slot (mode 3; on chip / L2); mode 3's
            # second pass overwrites the slot's chunk with u (its Z columns are done with),
            # which the third pass reads back.
            amax = tl.zeros([], dtype=tl.float32)
            for c0 in range(0, NCH * CB, CB):
                y, col, m, sc, inv_sc = _tile(
                    x_row, perm_ptr, smooth_ptr, f_ptr, fa, fb, scr, scr16, c0, zsc, inv_zsc, START,
                    K, MODE, N0, N1, N2, NP0, NP1, F0, F1, CB, FAST, PREC,
                )  # fmt: skip
                amax = tl.maximum(amax, tl.max(tl.abs(y)))
            s, s_eff, inv = _scale_of(amax, inv_zsc, zsc, clip, QMAX)
            qsum = tl.zeros([], dtype=tl.float32)
            umax = tl.zeros([], dtype=tl.float32)
            for c0 in range(0, NCH * CB, CB):
                y, col, m, sc, inv_sc = _tile(
                    x_row, perm_ptr, smooth_ptr, f_ptr, fa, fb, scr, scr16, c0, zsc, inv_zsc, START,
                    K, MODE, N0, N1, N2, NP0, NP1, F0, F1, CB, FAST, PREC,
                )  # fmt: skip
                q, code = _codes(y, inv, s, QMAX, FAST)
                tl.store(q_row + START + col, code, mask=m)
                qsum += tl.sum(q)
                if MAC:
                    u = _residual(y, q, s_eff, MAC_INPUT, FAST, ASM)
                    umax = tl.maximum(umax, tl.max(tl.abs(u)))
                    if MODE == 3:
                        if not FAST:
                            tl.debug_barrier()  # every thread has read this chunk of Z
                        tl.store(scr + col, u, mask=m)
            if MAC:
                su, su_eff, inv_u = _scale_of(umax, inv_zsc, zsc, 1.0, QMAX_U)
                if MODE == 3:
                    tl.debug_barrier()
                for c0 in range(0, NCH * CB, CB):
                    if MODE == 3:
                        i = tl.arange(0, NP0)
                        cc = c0 + tl.arange(0, CB)
                        col = i[:, None] * (N1 * N2) + cc[None, :]
                        m = (i < N0)[:, None] & (cc < N1 * N2)[None, :]
                        u = tl.load(scr + col, mask=m, other=0.0)
                    else:
                        y, col, m, sc, inv_sc = _tile(
                            x_row, perm_ptr, smooth_ptr, f_ptr, fa, fb, scr, scr16, c0, zsc,
                            inv_zsc, START, K, MODE, N0, N1, N2, NP0, NP1, F0, F1, CB, FAST, PREC,
                        )  # fmt: skip
                        q, code = _codes(y, inv, s, QMAX, FAST)
                        u = _residual(y, q, s_eff, MAC_INPUT, FAST, ASM)
                    uf, ucode = _codes(u, inv_u, su, QMAX_U, FAST, False)
                    tl.store(u_row + col, ucode, mask=m)
                    usum += tl.sum(uf)
        if MODE == 3:
            tl.debug_barrier()  # the next token overwrites the slot
    return s, qsum, su, usum


@triton.jit
def _path_rows(
    x_ptr, stride_x, perm_ptr, smooth_ptr, f_ptr, clip_ptr, qx_ptr, sx_ptr, qsum_ptr,
    row0, row_end,
    P: tl.constexpr, START: tl.constexpr, K: tl.constexpr, MODE: tl.constexpr,
    N0: tl.constexpr, N1: tl.constexpr, NP0: tl.constexpr, NP1: tl.constexpr,
    F0: tl.constexpr, F1: tl.constexpr, TB: tl.constexpr, PREC: tl.constexpr,
    QMAX: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    """An exact (outlier) path for the rows ``[row0, row_end)`` of a block, ``TB`` tokens per
    tile (the tokens are the leading axis: no element is replicated across threads, and a
    single factor is a ``[TB, NP0] x [NP0, NP0]`` dot). Modes 0 (one chunk), 1 and 2. Stores
    the codes, ``sx[:, P]`` and ``qsum[:, P]``."""
    clip = tl.load(clip_ptr + P)
    for r0 in range(row0, row_end, TB):
        rows = r0 + tl.arange(0, TB)
        rm = rows < row_end
        r64 = rows.to(tl.int64)
        if MODE == 2:
            j = tl.arange(0, NP0)
            c = tl.arange(0, NP1)
            jm = j < N0
            cm = c < N1
            col = (j * N1)[None, :, None] + c[None, None, :]  # [1, NPA, NPB]
            m = rm[:, None, None] & jm[None, :, None] & cm[None, None, :]
            src = tl.load(perm_ptr + START + col, mask=m, other=0)
            v = tl.load(x_ptr + r64[:, None, None] * stride_x + src, mask=m, other=0.0)
            v = v.to(tl.float32) * tl.load(smooth_ptr + START + col, mask=m, other=0.0)
            mat_b = tl.load(f_ptr + F1 + c[:, None] * N1 + c[None, :],
                            mask=cm[:, None] & cm[None, :], other=0.0)  # fmt: skip
            mat_a = tl.load(f_ptr + F0 + j[:, None] * N0 + j[None, :],
                            mask=jm[:, None] & jm[None, :], other=0.0)  # fmt: skip
            z = _dot32(tl.reshape(v, [TB * NP0, NP1]), mat_b, PREC)
            z = tl.reshape(tl.permute(tl.reshape(z, [TB, NP0, NP1]), (0, 2, 1)),
                           [TB * NP1, NP0])  # fmt: skip
            y = tl.reshape(_dot32(z, mat_a, PREC), [TB, NP1 * NP0])
            # element (o, i) of a row is channel i * N1 + o
            oo = tl.arange(0, NP1 * NP0) // NP0
            ii = tl.arange(0, NP1 * NP0) % NP0
            colq = ii * N1 + oo
            mq = rm[:, None] & ((oo < N1) & (ii < N0))[None, :]
        else:
            c = tl.arange(0, NP0)
            cm = c < K
            m = rm[:, None] & cm[None, :]
            src = tl.load(perm_ptr + START + c, mask=cm, other=0)
            v = tl.load(x_ptr + r64[:, None] * stride_x + src[None, :], mask=m, other=0.0)
            v = v.to(tl.float32) * tl.load(smooth_ptr + START + c, mask=cm, other=0.0)[None, :]
            if MODE == 1:
                mat = tl.load(f_ptr + F0 + c[:, None] * N0 + c[None, :],
                              mask=cm[:, None] & cm[None, :], other=0.0)  # fmt: skip
                y = _dot32(v, mat, PREC)
            else:
                y = v
            colq = c
            mq = m
        s = token_scale(tl.max(tl.abs(y), axis=1) * clip, QMAX)  # [TB]
        q, code = _codes(y, 1.0, s[:, None], QMAX, False)
        tl.store(qx_ptr + r64[:, None] * D + START + colq[None, :], code, mask=mq)
        tl.store(sx_ptr + rows * 3 + P, s, mask=rm)
        tl.store(qsum_ptr + rows * 3 + P, tl.sum(q, axis=1).to(tl.int32), mask=rm)


# --------------------------------------------------------------------------------------------
# Branch down-projections
# --------------------------------------------------------------------------------------------
@triton.jit
def _piece_ptrs(f_ptr, k_lo, R0: tl.constexpr, W: tl.constexpr, R: tl.constexpr,
                F_STRIDE: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """Byte pointers ``[BK/2, W]`` of a 4-bit factor's rank piece at K step ``k_lo``, and the
    rank mask."""
    r = R0 + tl.arange(0, W)
    jb = k_lo // 2 + tl.arange(0, BK // 2)
    return f_ptr + r[None, :].to(tl.int64) * (4 * F_STRIDE) + jb[:, None], r < R


@triton.jit
def _piece_dot(acc, a, a_e, a_o, b_ptrs, rm, jb, f_ptr, k0, R0: tl.constexpr, W: tl.constexpr,
               K: tl.constexpr, R: tl.constexpr, BITS: tl.constexpr, F_STRIDE: tl.constexpr,
               BK: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    """One K step of one rank piece: ``acc += a @ L'[R0:R0+W, k0:k0+BK]^T`` (see
    :func:`_branch_partial`)."""
    if BITS == 4:
        NBYTES: tl.constexpr = (K + 1) // 2
        b = tl.load(b_ptrs, mask=rm[None, :] & (jb < NBYTES)[:, None], other=0)
        lo, hi = _nibbles(b, ASM)  # [BK/2, W]: codes 2j and 2j+1 of rank r, +8
        acc = tl.dot(a_e, lo, acc, out_dtype=tl.int32)
        acc = tl.dot(a_o, hi, acc, out_dtype=tl.int32)
    else:
        r = R0 + tl.arange(0, W)
        w = load_packed_kmajor(f_ptr, r, r < R, F_STRIDE, k0, K, BITS, BK, W)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _branch_group(
    a_ptr, a_stride, acc_row, rows, row_mask, k_lo, k_hi, f_ptr,
    COL0: tl.constexpr, R0: tl.constexpr, W0: tl.constexpr, R1_: tl.constexpr,
    W1: tl.constexpr, R2_: tl.constexpr, W2_: tl.constexpr, R3: tl.constexpr, W3: tl.constexpr,
    K: tl.constexpr, R: tl.constexpr, BITS: tl.constexpr, F_STRIDE: tl.constexpr,
    BK: tl.constexpr, ASM: tl.constexpr, ATOMIC: tl.constexpr,
):  # fmt: skip
    """Up to four rank pieces ``(R0, W0) ... (R3, W3)`` (width 0: absent) of one branch in one
    K loop over ``[k_lo, k_hi)``: the activation tile ``a`` (16 rows, ``BK`` codes) is loaded
    and split once per step for all of them. ``acc' = sum_k a[row, k] * L'[r, k]``, where
    ``L' = L + 8`` for 4-bit factors (each byte holds codes ``2j`` and ``2j + 1``: the even
    and odd activation columns meet the low and high nibbles in two dots;
    :func:`_branch_epilogue` removes ``8 * sum_k a``) and ``L' = L`` for other widths
    (:func:`common.load_packed_kmajor`). Padding codes (``k >= K``, ranks >= ``R``) meet zero
    activations or are masked. Results go to ``acc_row + COL0 + r`` (stored, or added with
    relaxed integer atomics when ``ATOMIC``)."""
    TM: tl.constexpr = 16
    a_row = a_ptr + rows.to(tl.int64)[:, None] * a_stride
    acc0 = tl.zeros([TM, W0], dtype=tl.int32)
    p0, m0 = _piece_ptrs(f_ptr, k_lo, R0, W0, R, F_STRIDE, BK)
    if W1 > 0:
        acc1 = tl.zeros([TM, W1], dtype=tl.int32)
        p1, m1 = _piece_ptrs(f_ptr, k_lo, R1_, W1, R, F_STRIDE, BK)
    if W2_ > 0:
        acc2 = tl.zeros([TM, W2_], dtype=tl.int32)
        p2, m2 = _piece_ptrs(f_ptr, k_lo, R2_, W2_, R, F_STRIDE, BK)
    if W3 > 0:
        acc3 = tl.zeros([TM, W3], dtype=tl.int32)
        p3, m3 = _piece_ptrs(f_ptr, k_lo, R3, W3, R, F_STRIDE, BK)
    jb = k_lo // 2 + tl.arange(0, BK // 2)
    for k0 in range(k_lo, k_hi, BK):
        k0 = tl.multiple_of(k0, BK)
        kk = k0 + tl.arange(0, BK)
        a = tl.load(a_row + kk[None, :], mask=row_mask[:, None] & (kk < K)[None, :], other=0)
        a_e, a_o = tl.split(tl.reshape(a, [TM, BK // 2, 2]))
        acc0 = _piece_dot(acc0, a, a_e, a_o, p0, m0, jb, f_ptr, k0, R0, W0, K, R, BITS,
                          F_STRIDE, BK, ASM)  # fmt: skip
        p0 += BK // 2
        if W1 > 0:
            acc1 = _piece_dot(acc1, a, a_e, a_o, p1, m1, jb, f_ptr, k0, R1_, W1, K, R, BITS,
                              F_STRIDE, BK, ASM)  # fmt: skip
            p1 += BK // 2
        if W2_ > 0:
            acc2 = _piece_dot(acc2, a, a_e, a_o, p2, m2, jb, f_ptr, k0, R2_, W2_, K, R, BITS,
                              F_STRIDE, BK, ASM)  # fmt: skip
            p2 += BK // 2
        if W3 > 0:
            acc3 = _piece_dot(acc3, a, a_e, a_o, p3, m3, jb, f_ptr, k0, R3, W3, K, R, BITS,
                              F_STRIDE, BK, ASM)  # fmt: skip
            p3 += BK // 2
        jb += BK // 2
    _piece_out(acc_row, acc0, rows, row_mask, COL0, R0, W0, R, ATOMIC)
    if W1 > 0:
        _piece_out(acc_row, acc1, rows, row_mask, COL0, R1_, W1, R, ATOMIC)
    if W2_ > 0:
        _piece_out(acc_row, acc2, rows, row_mask, COL0, R2_, W2_, R, ATOMIC)
    if W3 > 0:
        _piece_out(acc_row, acc3, rows, row_mask, COL0, R3, W3, R, ATOMIC)


@triton.jit
def _piece_out(acc_row, part, rows, row_mask, COL0: tl.constexpr, R0: tl.constexpr,
               W: tl.constexpr, R: tl.constexpr, ATOMIC: tl.constexpr):  # fmt: skip
    """Store (or atomically add) one piece's partial sums to its ``acc`` columns."""
    rc = R0 + tl.arange(0, W)
    m = row_mask[:, None] & (rc < R)[None, :]
    if ATOMIC:
        tl.atomic_add(acc_row + COL0 + rc[None, :], part, mask=m, sem="relaxed")
    else:
        tl.store(acc_row + COL0 + rc[None, :], part, mask=m)


@triton.jit
def _branch_epilogue(
    acc_ptr, acc_stride, col0, rows, row_mask, tok_scale, code_sum, ds_ptr, q_ptr, s_ptr,
    SEGS: tl.constexpr, QMAX: tl.constexpr, RP2: tl.constexpr, OFFSET: tl.constexpr,
    VOLATILE: tl.constexpr,
):  # fmt: skip
    """Hidden states of one branch for a tile of rows: ``h = (acc - OFFSET * code_sum) *
    tok_scale * down_scale`` (the reference's order; ``OFFSET`` the factors' code offset left
    in by :func:`_branch_partial`), quantized per token and linear segment into ``q_ptr``
    (N, R) int8 and ``s_ptr`` (N, M). ``VOLATILE``: read ``acc`` past L1 (other programs'
    atomics)."""
    R: tl.constexpr = SEGS[len(SEGS) - 1][1]
    r = tl.arange(0, RP2)
    rm = r < R
    m = row_mask[:, None] & rm[None, :]
    a = tl.load(acc_ptr + rows.to(tl.int64)[:, None] * acc_stride + col0 + r[None, :], mask=m,
                other=0, volatile=VOLATILE)  # fmt: skip
    if OFFSET != 0:
        a = a - OFFSET * code_sum[:, None]
    ws = tl.load(ds_ptr + r, mask=rm, other=0.0)
    h = a.to(tl.float32) * tok_scale[:, None] * ws[None, :]  # padded columns exactly 0
    # Per token and linear segment: s = max(absmax, 1e-8) / QMAX, codes round(h / s) (IEEE
    # division: the reference's decisions; no clamp needed, |h| <= QMAX s).
    ah = tl.abs(h)
    col_scale = tl.zeros_like(h) + 1.0
    for j in tl.static_range(len(SEGS)):
        in_seg = (r >= SEGS[j][0]) & (r < SEGS[j][1])
        sj = token_scale(tl.max(tl.where(in_seg[None, :], ah, 0.0), axis=1), QMAX)
        col_scale = tl.where(in_seg[None, :], sj[:, None], col_scale)
        tl.store(s_ptr + rows * len(SEGS) + j, sj, mask=row_mask)
    _q, code = _codes(h, 1.0, col_scale, QMAX, False, False)
    tl.store(q_ptr + rows.to(tl.int64)[:, None] * R + r[None, :], code, mask=m)


@triton.jit
def _branch_pieces(
    a_ptr, a_stride, acc_row, rows, row_mask, k_lo, k_hi, f_ptr,
    COL0: tl.constexpr, PIECES: tl.constexpr, K: tl.constexpr, R: tl.constexpr,
    BITS: tl.constexpr, F_STRIDE: tl.constexpr, BK: tl.constexpr, ASM: tl.constexpr,
    ATOMIC: tl.constexpr,
):  # fmt: skip
    """One branch's down-projection for a 16-row tile over ``[k_lo, k_hi)`` into ``acc`` at
    column ``COL0``: ``PIECES`` is a tuple of groups of four ``(r0, width)`` rank pieces
    (powers of two >= 32 adding up to the rank padded to 32; width 0 = absent), one K loop per
    group (:func:`_branch_group`)."""
    for g in tl.static_range(len(PIECES)):
        _branch_group(a_ptr, a_stride, acc_row, rows, row_mask, k_lo, k_hi, f_ptr, COL0,
                      PIECES[g][0], PIECES[g][1], PIECES[g][2], PIECES[g][3], PIECES[g][4],
                      PIECES[g][5], PIECES[g][6], PIECES[g][7], K, R, BITS, F_STRIDE, BK, ASM,
                      ATOMIC)  # fmt: skip


@triton.jit
def _branch_block(
    qx_ptr, uq_ptr, acc_ptr, rows, row_mask, k_lo, k_hi, l2_ptr, l4_ptr,
    D: tl.constexpr, START_M: tl.constexpr, KM: tl.constexpr, ACC_W: tl.constexpr,
    HAS_CWS: tl.constexpr, CWS_W_BITS: tl.constexpr, SEG1: tl.constexpr, R1P: tl.constexpr,
    PIECES1: tl.constexpr, W2: tl.constexpr, HAS_MAC: tl.constexpr, MAC_W_BITS: tl.constexpr,
    SEG2: tl.constexpr, PIECES2: tl.constexpr, W4: tl.constexpr, BK: tl.constexpr,
    ASM: tl.constexpr, ATOMIC: tl.constexpr,
):  # fmt: skip
    """Both branches' int32 down-projections of a 16-row tile over ``[k_lo, k_hi)`` into
    ``acc`` (CWS from the main codes in ``qx``, MAC from ``uq``; :func:`_branch_pieces`)."""
    acc_row = acc_ptr + rows.to(tl.int64)[:, None] * ACC_W
    if HAS_CWS:
        _branch_pieces(qx_ptr + START_M, D, acc_row, rows, row_mask, k_lo, k_hi, l2_ptr, 0,
                       PIECES1, KM, SEG1[len(SEG1) - 1][1], CWS_W_BITS, W2, BK, ASM,
                       ATOMIC)  # fmt: skip
    if HAS_MAC:
        _branch_pieces(uq_ptr, KM, acc_row, rows, row_mask, k_lo, k_hi, l4_ptr, R1P, PIECES2,
                       KM, SEG2[len(SEG2) - 1][1], MAC_W_BITS, W4, BK, ASM, ATOMIC)  # fmt: skip


@triton.jit
def _branch_finish(
    sx_ptr, qsum_ptr, su_ptr, acc_ptr, rows, row_mask,
    l2s_ptr, hq_ptr, sh_ptr, l4s_ptr, gq_ptr, sg_ptr,
    ACC_W: tl.constexpr, HAS_CWS: tl.constexpr, CWS_W_BITS: tl.constexpr,
    QMAX_CWS: tl.constexpr, SEG1: tl.constexpr, R1P: tl.constexpr, R1_POW2: tl.constexpr,
    HAS_MAC: tl.constexpr, MAC_W_BITS: tl.constexpr, QMAX_MAC: tl.constexpr,
    SEG2: tl.constexpr, R2P: tl.constexpr, R2_POW2: tl.constexpr, VOLATILE: tl.constexpr,
):  # fmt: skip
    """Epilogues of both branches for a tile of rows (16 in K1; one in K2, whose tiles hold
    1-16 real tokens at decode): CWS scaled by ``s_m``, its offset removed with ``qsum_m``; MAC
    by ``su``, with the MAC code sums K1 left in ``acc``'s column ``R1P + R2P``."""
    if HAS_CWS:
        s_m = tl.load(sx_ptr + rows * 3 + 2, mask=row_mask, other=0.0)
        qs = tl.load(qsum_ptr + rows * 3 + 2, mask=row_mask, other=0)
        _branch_epilogue(acc_ptr, ACC_W, 0, rows, row_mask, s_m, qs, l2s_ptr, hq_ptr, sh_ptr,
                         SEG1, QMAX_CWS, R1_POW2, 8 if CWS_W_BITS == 4 else 0,
                         VOLATILE)  # fmt: skip
    if HAS_MAC:
        su = tl.load(su_ptr + rows, mask=row_mask, other=0.0)
        us = tl.load(acc_ptr + rows.to(tl.int64) * ACC_W + R1P + R2P, mask=row_mask, other=0,
                     volatile=VOLATILE)  # fmt: skip
        _branch_epilogue(acc_ptr, ACC_W, R1P, rows, row_mask, su, us, l4s_ptr, gq_ptr, sg_ptr,
                         SEG2, QMAX_MAC, R2_POW2, 8 if MAC_W_BITS == 4 else 0,
                         VOLATILE)  # fmt: skip


# --------------------------------------------------------------------------------------------
# The kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def site_quant_kernel(
    x_ptr, stride_x, perm_ptr, smooth_ptr, f_ptr, clip_ptr,
    qx_ptr, sx_ptr, qsum_ptr, uq_ptr, su_ptr, scr_ptr, scr16_ptr, acc_ptr, cnt_ptr,
    l2_ptr, l2s_ptr, hq_ptr, sh_ptr,
    l4_ptr, l4s_ptr, gq_ptr, sg_ptr,
    N, T,
    PV: tl.constexpr, PT: tl.constexpr, PM: tl.constexpr,
    HAS_CWS: tl.constexpr, CWS_W_BITS: tl.constexpr, QMAX_CWS: tl.constexpr,
    SEG1: tl.constexpr, R1P: tl.constexpr, R1_POW2: tl.constexpr, W2: tl.constexpr,
    HAS_MAC: tl.constexpr, MAC_W_BITS: tl.constexpr, QMAX_MAC: tl.constexpr,
    SEG2: tl.constexpr, R2P: tl.constexpr, R2_POW2: tl.constexpr, W4: tl.constexpr,
    MAC_INPUT: tl.constexpr,
    PIECES1: tl.constexpr, PIECES2: tl.constexpr, SLOT: tl.constexpr, SLOT16: tl.constexpr,
    BRANCH: tl.constexpr,
    BK: tl.constexpr, ASM: tl.constexpr, ACC_P2: tl.constexpr,
):  # fmt: skip
    """K1 (module doc). Grid ``(G,)``: program ``pid`` takes the tokens
    ``[pid N / G, (pid + 1) N / G)`` (their counts differ by one at most) in blocks of
    ``T <= 16``. ``PV``/``PT``/``PM``: the plan of each
    path (:func:`plan_path`); ``SLOT``/``SLOT16``: fp32/fp16 scratch per program (mode 3);
    ``BRANCH``: 0 no branch, 1 down-projections here, 2 zero ``acc`` and ``cnt`` for K2
    (``ACC_P2``: a power of two >= the ``acc`` row). ``acc`` rows: CWS ranks padded to 32
    (``R1P``), MAC ranks (``R2P``), then the MAC code sum; ``PIECES1``/``PIECES2``: the rank
    pieces of :func:`_branch_pieces`."""
    D: tl.constexpr = PV[1] + PT[1] + PM[1]
    KM: tl.constexpr = PM[1]
    START_M: tl.constexpr = PM[0]
    ACC_W: tl.constexpr = R1P + R2P + HAS_MAC
    pid = tl.program_id(0)
    scr = scr_ptr + pid * SLOT
    scr16 = scr16_ptr + pid * SLOT16
    fa, fb, fc = _fast_factors(f_ptr, PM[2], PM[3], PM[4], PM[5], PM[6], PM[7], PM[8], PM[9],
                               PM[10], PM[11], PM[15])  # fmt: skip
    lo = (pid * N) // tl.num_programs(0)
    hi = ((pid + 1) * N) // tl.num_programs(0)
    for row0 in range(lo, hi, T):
        row_end = tl.minimum(row0 + T, hi)
        if PV[18] > 0:
            _path_rows(x_ptr, stride_x, perm_ptr, smooth_ptr, f_ptr, clip_ptr, qx_ptr, sx_ptr,
                       qsum_ptr, row0, row_end, 0, PV[0], PV[1], PV[2], PV[3], PV[4], PV[6],
                       PV[7], PV[9], PV[10], PV[18], PV[16], PV[17], D)  # fmt: skip
        if PT[18] > 0:
            _path_rows(x_ptr, stride_x, perm_ptr, smooth_ptr, f_ptr, clip_ptr, qx_ptr, sx_ptr,
                       qsum_ptr, row0, row_end, 1, PT[0], PT[1], PT[2], PT[3], PT[4], PT[6],
                       PT[7], PT[9], PT[10], PT[18], PT[16], PT[17], D)  # fmt: skip
        for t in range(row0, row_end):
            t64 = tl.zeros([], dtype=tl.int64) + t  # 64-bit row offsets
            x_row = x_ptr + t64 * stride_x
            q_row = qx_ptr + t64 * D
            u_row = uq_ptr + t64 * KM
            if PV[18] == 0:
                s_v, qs_v, _su, _us = _path(
                    x_row, perm_ptr, smooth_ptr, f_ptr, 0.0, 0.0, 0.0, clip_ptr, q_row, u_row,
                    scr, scr16, 0, PV[0], PV[1], PV[2], PV[3], PV[4], PV[5], PV[6], PV[7], PV[8],
                    PV[9], PV[10], PV[11], PV[12], PV[13], PV[14], PV[15], PV[16], PV[17],
                    False, 1, 0, ASM,
                )  # fmt: skip
                tl.store(sx_ptr + t * 3 + 0, s_v)
                tl.store(qsum_ptr + t * 3 + 0, qs_v.to(tl.int32))
            if PT[18] == 0:
                s_t, qs_t, _su, _us = _path(
                    x_row, perm_ptr, smooth_ptr, f_ptr, 0.0, 0.0, 0.0, clip_ptr, q_row, u_row,
                    scr, scr16, 1, PT[0], PT[1], PT[2], PT[3], PT[4], PT[5], PT[6], PT[7], PT[8],
                    PT[9], PT[10], PT[11], PT[12], PT[13], PT[14], PT[15], PT[16], PT[17],
                    False, 1, 0, ASM,
                )  # fmt: skip
                tl.store(sx_ptr + t * 3 + 1, s_t)
                tl.store(qsum_ptr + t * 3 + 1, qs_t.to(tl.int32))
            s_m, qs_m, su, usum = _path(
                x_row, perm_ptr, smooth_ptr, f_ptr, fa, fb, fc, clip_ptr, q_row, u_row, scr, scr16,
                2,
                PM[0], PM[1], PM[2], PM[3], PM[4], PM[5], PM[6], PM[7], PM[8], PM[9], PM[10],
                PM[11], PM[12], PM[13], PM[14], PM[15], PM[16], PM[17], HAS_MAC, QMAX_MAC,
                MAC_INPUT, ASM,
            )  # fmt: skip
            tl.store(sx_ptr + t * 3 + 2, s_m)
            tl.store(qsum_ptr + t * 3 + 2, qs_m.to(tl.int32))
            if HAS_MAC:
                tl.store(su_ptr + t, su)
                tl.store(acc_ptr + t64 * ACC_W + R1P + R2P, usum.to(tl.int32))
        if BRANCH == 1:
            rows = row0 + tl.arange(0, 16)
            row_mask = rows < row_end
            tl.debug_barrier()  # the block's codes, stored above by other threads
            _branch_block(qx_ptr, uq_ptr, acc_ptr, rows, row_mask, 0, KM, l2_ptr, l4_ptr, D,
                          START_M, KM, ACC_W, HAS_CWS, CWS_W_BITS, SEG1, R1P, PIECES1, W2,
                          HAS_MAC, MAC_W_BITS, SEG2, PIECES2, W4, BK, ASM, False)  # fmt: skip
            tl.debug_barrier()
            _branch_finish(sx_ptr, qsum_ptr, su_ptr, acc_ptr, rows, row_mask, l2s_ptr, hq_ptr,
                           sh_ptr, l4s_ptr, gq_ptr, sg_ptr, ACC_W, HAS_CWS, CWS_W_BITS,
                           QMAX_CWS, SEG1, R1P, R1_POW2, HAS_MAC, MAC_W_BITS, QMAX_MAC, SEG2,
                           R2P, R2_POW2, False)  # fmt: skip
        elif BRANCH == 2:
            # Zero this block's rows of the K2 accumulators, and the counter of a 16-row tile
            # that starts in the block.
            zc = tl.arange(0, ACC_P2)
            for t in range(row0, row_end):
                t64 = tl.zeros([], dtype=tl.int64) + t
                tl.store(acc_ptr + t64 * ACC_W + zc, tl.zeros([ACC_P2], tl.int32),
                         mask=zc < R1P + R2P)  # fmt: skip
            tile = (row0 + 15) // 16
            if tile * 16 < row_end:
                tl.store(cnt_ptr + tile, 0)


@triton.jit
def site_branch_kernel(
    qx_ptr, uq_ptr, sx_ptr, qsum_ptr, su_ptr, acc_ptr, cnt_ptr,
    l2_ptr, l2s_ptr, hq_ptr, sh_ptr,
    l4_ptr, l4s_ptr, gq_ptr, sg_ptr,
    N, k_split,
    D: tl.constexpr, START_M: tl.constexpr, KM: tl.constexpr,
    HAS_CWS: tl.constexpr, CWS_W_BITS: tl.constexpr, QMAX_CWS: tl.constexpr,
    SEG1: tl.constexpr, R1P: tl.constexpr, R1_POW2: tl.constexpr, W2: tl.constexpr,
    HAS_MAC: tl.constexpr, MAC_W_BITS: tl.constexpr, QMAX_MAC: tl.constexpr,
    SEG2: tl.constexpr, R2P: tl.constexpr, R2_POW2: tl.constexpr, W4: tl.constexpr,
    PIECES1: tl.constexpr, PIECES2: tl.constexpr, BK: tl.constexpr, ASM: tl.constexpr,
    EPI_ROWS: tl.constexpr,
):  # fmt: skip
    """K2 (module doc). Grid ``(S, cdiv(N, 16))``: program ``(s, i)`` adds the partial
    down-projections of rows ``[16 i, 16 i + 16)`` over ``[s k_split, (s + 1) k_split)`` to
    ``acc`` (zeroed by K1); the last of the ``S`` programs of a tile runs the epilogues on the
    tile's real rows, ``EPI_ROWS`` at a time."""
    ACC_W: tl.constexpr = R1P + R2P + HAS_MAC
    pid_k = tl.program_id(0)
    pid_t = tl.program_id(1)
    rows = pid_t * 16 + tl.arange(0, 16)
    row_mask = rows < N
    k_lo = pid_k * k_split
    k_hi = tl.minimum(k_lo + k_split, KM)
    _branch_block(qx_ptr, uq_ptr, acc_ptr, rows, row_mask, k_lo, k_hi, l2_ptr, l4_ptr, D,
                  START_M, KM, ACC_W, HAS_CWS, CWS_W_BITS, SEG1, R1P, PIECES1, W2, HAS_MAC,
                  MAC_W_BITS, SEG2, PIECES2, W4, BK, ASM, True)  # fmt: skip
    tl.debug_barrier()
    # Release this program's atomics, acquire the others': the last one sees every partial.
    done = tl.atomic_add(cnt_ptr + pid_t, 1, sem="acq_rel")
    if done == tl.num_programs(0) - 1:
        tl.debug_barrier()
        # Real rows only, EPI_ROWS at a time (a decode tile holds 1-16 tokens).
        row_hi = tl.minimum(pid_t * 16 + 16, N)
        for g0 in range(pid_t * 16, row_hi, EPI_ROWS):
            grp = g0 + tl.arange(0, EPI_ROWS)
            _branch_finish(sx_ptr, qsum_ptr, su_ptr, acc_ptr, grp, grp < row_hi, l2s_ptr,
                           hq_ptr, sh_ptr, l4s_ptr, gq_ptr, sg_ptr, ACC_W, HAS_CWS, CWS_W_BITS,
                           QMAX_CWS, SEG1, R1P, R1_POW2, HAS_MAC, MAC_W_BITS, QMAX_MAC, SEG2,
                           R2P, R2_POW2, True)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------
def qmax(bits: int) -> int:
    """``2^(bits-1) - 1``."""
    return (1 << (int(bits) - 1)) - 1


def rank_pad(r: int) -> int:
    """Padded rank of kernel B's branch up-projection tiles: a power of two >= 32."""
    return pow2_at_least(r, 32)


def rank_step_pad(r: int) -> int:
    """Rank padded to a multiple of :data:`RANK_STEP` (kernel A's down-projection width)."""
    return -(-int(r) // RANK_STEP) * RANK_STEP


def rank_pieces(r: int, widest: int = 128) -> tuple[tuple[int, ...], ...]:
    """Rank pieces of a rank ``r`` padded to :data:`RANK_STEP`: powers of two from ``widest``
    down to 32, largest first, in groups of four ``(r0, width)`` flattened to 8 entries (width 0
    = absent; one K loop per group in :func:`_branch_pieces`)."""
    pieces, r0, left = [], 0, rank_step_pad(r)
    while left:
        w = widest
        while w > left:
            w //= 2
        pieces.append((r0, w))
        r0, left = r0 + w, left - w
    groups = []
    for i in range(0, len(pieces), 4):
        grp = list(pieces[i : i + 4]) + [(0, 0)] * (4 - len(pieces[i : i + 4]))
        groups.append(tuple(v for pc in grp for v in pc))
    return tuple(groups)


def segments(ranks: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """``(lo, hi)`` ranges of consecutive segments of the given widths."""
    out, off = [], 0
    for r in ranks:
        out.append((off, off + int(r)))
        off += int(r)
    return tuple(out)


@dataclass(frozen=True)
class PathPlan:
    """How K1 computes one path (the ``PV``/``PT``/``PM`` constexpr, :meth:`astuple`).

    ``mode`` 0-3 (module doc), ``sides`` the factor sides (``n0, n1, n2``, 0 = absent),
    ``padded`` their register widths (powers of two >= 16), ``f_off`` the factors' offsets in
    the flat ``factors``; ``cb`` the chunk width of modes 0/3, ``sa`` the slices per step of
    mode 3's first stage, ``chunks`` the final tiles per token (1 = the whole token in one
    register tile; mode 0's padded width is ``padded[0]``); ``fast`` 1 for fp16 operands;
    ``prec`` the fp32 ``tl.dot`` precision otherwise (an index of :data:`PRECISIONS`);
    ``qmax`` the activation code bound; ``rows`` see :meth:`astuple`.
    """

    start: int
    k: int
    mode: int
    sides: tuple[int, int, int]
    padded: tuple[int, int, int]
    f_off: tuple[int, int, int]
    cb: int
    sa: int
    chunks: int
    fast: int
    prec: int
    qmax: int
    rows: int = 0

    def astuple(self) -> tuple:
        """``(START, K, MODE, N0, N1, N2, NP0, NP1, NP2, F0, F1, F2, CB, SA, NCH, FAST, PREC,
        QMAX, ROWS)``: :func:`_path`'s constexpr arguments, then ``ROWS``, the tokens per tile
        of :func:`_path_rows` (0: the path runs per token)."""
        return (self.start, self.k, self.mode, *self.sides, *self.padded, *self.f_off, self.cb,
                self.sa, self.chunks, self.fast, self.prec, self.qmax, self.rows)  # fmt: skip


def _pad(n: int) -> int:
    return pow2_at_least(n, 16)


def plan_path(
    start: int,
    k: int,
    dims: Sequence[int],
    f_off: int,
    a_bits: int,
    main: bool,
    precision: str | None = None,
    rows: bool = False,
) -> PathPlan:
    """The :class:`PathPlan` of a path of width ``k`` starting at channel ``start`` with
    Kronecker factor sides ``dims`` (their product is ``k``) whose first factor starts at
    ``f_off`` in the flat factors; ``main``: the main path (fp16 operands at <= 4 bits with
    two or more factors); ``rows``: run an outlier path on token tiles (:func:`_path_rows`)
    where its mode allows. Raises ``ValueError`` for shapes the kernel does not tile."""
    dims = [int(n) for n in dims if int(n)]
    if dims and math.prod(dims) != k:
        raise ValueError(f"factor sides {dims} do not multiply to {k}")
    mode = len(dims) if k else 0
    sides = (dims + [0, 0, 0])[:3]
    offs = [f_off + sum(n * n for n in dims[:i]) for i in range(len(dims))] + [0, 0, 0]
    padded = [_pad(n) if n else 0 for n in sides]
    fast = int(main and int(a_bits) <= 4 and mode >= 2)
    prec = PRECISIONS.index((precision or TRANSFORM_PRECISION) if main else OUTLIER_PRECISION)
    cb, sa, chunks, tb = 16, 1, 1, 0
    if mode == 0 and k:
        cb = min(_pad(k), COPY_CHUNK)
        chunks = -(-k // cb)
        padded[0] = cb
        if rows and not main and chunks == 1:
            tb = min(16, TILE_MAX // cb)
    elif mode == 1:
        if padded[0] > 128:
            raise ValueError(f"a single factor of side {sides[0]} > 128 is not supported")
        tb = 16 if rows and not main else 0
    elif mode == 2:
        if padded[0] * padded[1] > PAIR_MAX:
            raise ValueError(f"factor pair {sides[:2]} exceeds the {PAIR_MAX}-element tile")
        if rows and not main:
            tb = min(16, max(TILE_MAX // (padded[0] * padded[1]), 1))
    elif mode == 3:
        slice_ = padded[1] * padded[2]
        if slice_ > TILE_MAX:
            raise ValueError(f"factor pair {sides[1:]} exceeds the {TILE_MAX}-element tile")
        sa = min(TILE_MAX // slice_, triton.next_power_of_2(sides[0]))
        c = sides[1] * sides[2]
        budget = max(TILE_MAX // padded[0], 16)
        cands = [1 << i for i in range(4, budget.bit_length()) if (1 << i) <= budget]
        cands = [b for b in cands if b <= triton.next_power_of_2(c)] or [16]
        # the widest chunk that pads the columns by at most 1/8, else the least padding
        ok = [b for b in cands if -(-c // b) * b * 8 <= c * 9]
        cb = max(ok) if ok else min(cands, key=lambda b: (-(-c // b) * b, -b))
        chunks = -(-c // cb)
    return PathPlan(start, k, mode, tuple(sides), tuple(padded), tuple(offs[:3]), cb, sa,
                    chunks, fast, prec, qmax(a_bits), tb)  # fmt: skip


def plan_paths(
    sizes: Sequence[int],
    factor_dims: Sequence[int],
    a_bits: Sequence[int],
    precision: str | None = None,
    rows: bool = False,
) -> tuple[PathPlan, PathPlan, PathPlan]:
    """The three :class:`PathPlan` of a site (``factor_dims``: 9 entries, 3 per path)."""
    plans, start, f_off = [], 0, 0
    for p in range(3):
        dims = [int(n) for n in factor_dims[3 * p : 3 * p + 3] if int(n)]
        plans.append(plan_path(start, int(sizes[p]), dims, f_off, a_bits[p], p == 2, precision,
                               rows))  # fmt: skip
        start += int(sizes[p])
        f_off += sum(n * n for n in dims)
    return tuple(plans)


def site_quant_config(n_tokens: int, interpret: bool | None = None) -> dict:
    """Compile-time configuration of kernel A for ``n_tokens`` rows (``interpret``: the
    interpreter's; default: whether Triton runs interpreted).

    ``BRANCH`` 1 (prefill, ``n_tokens >= 8 * 132``: blocks of 8-16 tokens, the
    down-projections in K1, no atomics) or 2 (decode and small batches: one token per K1
    program, split-K down-projections in K2); ``ROWS``: outlier paths on token tiles
    (:func:`_path_rows`, prefill) rather than per token; ``BK``: the branch K step.
    Interpreter: one 16-token block per program, as at prefill (its cost is per program and
    step).
    """
    if interpreting() if interpret is None else interpret:
        return {"BRANCH": 1, "ROWS": True, "BK": 128, "num_warps": 4, "num_stages": 1, "T": 16}
    if n_tokens >= PREFILL_TOKENS:
        return {"BRANCH": 1, "ROWS": True, "BK": 128, "num_warps": 4, "num_stages": 1}
    return {"BRANCH": 2, "ROWS": False, "BK": 64, "num_warps": 4, "num_stages": 1}


#: Smallest token count of the prefill configuration (8 tokens per block on 132 SMs).
PREFILL_TOKENS = 8 * 132
#: Token counts whose :func:`site_quant_config` differ on a GPU (for the compile check).
SITE_QUANT_GPU_TOKENS = (16, 4096)


def site_quant_grid(n_tokens: int, cfg: dict, km: int, num_sms: int = 132) -> dict:
    """Launch geometry. K1: ``G`` programs, each a contiguous range of ``cdiv(N, G)`` or
    ``N // G`` tokens (``per_program``: the larger) in blocks of ``T = 16`` (the branch tile):
    at prefill ``G`` = the SM count (one range per SM: the busiest SM does ``cdiv(N, SMs)``
    tokens, the least possible), at decode one token per program (``G = N``, at most two
    programs per SM). The scratch has ``G`` slots. For ``BRANCH == 2`` the K2 grid
    ``(S, tiles)`` with ``k_split`` channels per program."""
    n = max(int(n_tokens), 1)
    t = cfg.get("T") or BRANCH_ROWS
    if cfg.get("T"):  # the interpreter: one block per program
        g = -(-n // t)
    elif cfg["BRANCH"] == 2:
        g = min(n, 2 * num_sms)
    else:
        g = min(n, num_sms)
    out = {"T": t, "G": g, "per_program": -(-n // g)}
    if cfg["BRANCH"] == 2:
        tiles = -(-n // BRANCH_ROWS)
        steps = max(-(-km // cfg["BK"]), 1)
        s = min(steps, max(1, (2 * num_sms) // tiles))
        k_split = -(-steps // s) * cfg["BK"]
        out.update(S=-(-max(km, 1) // k_split), k_split=k_split, tiles=tiles)
    return out


def site_quant_constexprs(
    sizes: Sequence[int],
    factor_dims: Sequence[int],
    cws_ranks: Sequence[int] | None,
    mac_ranks: Sequence[int] | None,
    a_bits: Sequence[int],
    branch_bits: Sequence[int],
    mac_input: int,
    cfg: dict,
    precision: str | None = None,
    asm: bool | None = None,
) -> dict:
    """Every constexpr argument of :func:`site_quant_kernel` (shared with the compile check).

    ``cws_ranks``/``mac_ranks`` None (or empty) = branch absent; ``branch_bits`` = (CWS factor
    bits, CWS hidden bits, MAC factor bits, MAC hidden bits); ``asm``: inline PTX for the
    nibble split (default: unless interpreting)."""
    has_cws, has_mac = bool(cws_ranks), bool(mac_ranks)
    pv, pt, pm = plan_paths(sizes, factor_dims, a_bits, precision, cfg["ROWS"])
    r1 = sum(cws_ranks) if has_cws else 0
    r2 = sum(mac_ranks) if has_mac else 0
    r1p, r2p = rank_step_pad(r1), rank_step_pad(r2)
    slot = max([pl.k + pl.sides[0] for pl in (pv, pt, pm) if pl.mode == 3] or [0])
    slot16 = pm.k if pm.mode == 3 and pm.fast else 0
    return {
        "PV": pv.astuple(),
        "PT": pt.astuple(),
        "PM": pm.astuple(),
        "HAS_CWS": has_cws,
        "CWS_W_BITS": int(branch_bits[0]),
        "QMAX_CWS": qmax(branch_bits[1]),
        "SEG1": segments(cws_ranks) if has_cws else ((0, 1),),
        "R1P": r1p,
        "R1_POW2": pow2_at_least(r1, 16),
        "HAS_MAC": has_mac,
        "MAC_W_BITS": int(branch_bits[2]),
        "QMAX_MAC": qmax(branch_bits[3]),
        "SEG2": segments(mac_ranks) if has_mac else ((0, 1),),
        "R2P": r2p,
        "R2_POW2": pow2_at_least(r2, 16),
        "MAC_INPUT": int(mac_input),
        "PIECES1": rank_pieces(r1) if has_cws else rank_pieces(1),
        "PIECES2": rank_pieces(r2) if has_mac else rank_pieces(1),
        "W2": -(-int(sizes[2]) * int(branch_bits[0]) // 32),
        "W4": -(-int(sizes[2]) * int(branch_bits[2]) // 32),
        "SLOT": slot,
        "SLOT16": slot16,
        "BRANCH": cfg["BRANCH"] if has_cws or has_mac else 0,
        "BK": cfg["BK"],
        "ASM": (not interpreting()) if asm is None else bool(asm),
        "ACC_P2": pow2_at_least(r1p + r2p + int(has_mac), 16),
    }


def site_branch_constexprs(const: dict) -> dict:
    """The constexpr arguments of :func:`site_branch_kernel` (K2) from K1's."""
    pm = const["PM"]
    keep = ("HAS_CWS", "CWS_W_BITS", "QMAX_CWS", "SEG1", "R1P", "R1_POW2", "W2", "HAS_MAC",
            "MAC_W_BITS", "QMAX_MAC", "SEG2", "R2P", "R2_POW2", "W4", "PIECES1", "PIECES2",
            "BK", "ASM")  # fmt: skip
    out = {k: const[k] for k in keep}
    out.update(D=const["PV"][1] + const["PT"][1] + pm[1], START_M=pm[0], KM=pm[1],
               EPI_ROWS=K2_EPILOGUE_ROWS)  # fmt: skip
    return out


def site_quant_options(const: dict, cfg: dict) -> dict:
    """Launch options of K1: 8 warps where a mode-2 tile exceeds 4096 elements (the
    registers of 4 warps spill there: compiled for sm_90), else the configuration's."""
    plans = (const["PV"], const["PT"], const["PM"])
    tiles = [c[6] * c[7] for c in plans if c[2] == 2]
    wide = max(tiles or [0]) > 4096
    return {"num_warps": 8 if wide else cfg["num_warps"], "num_stages": cfg["num_stages"]}


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


_SM_COUNT: dict[int, int] = {}


def _num_sms(dev: torch.device) -> int:
    """Streaming multiprocessors of ``dev`` (cached; 132 off a GPU)."""
    if dev.type != "cuda":
        return 132
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _factor_view(t: torch.Tensor | None, bits: int, fallback: torch.Tensor) -> torch.Tensor:
    """A branch factor as the kernel reads it (contiguous rows: the row stride is a
    constexpr): 4-bit rows as bytes, others as int32 words."""
    if t is None or t.numel() == 0:
        return fallback
    t = t.contiguous()
    return t.view(torch.uint8) if int(bits) == 4 else t


def site_quantize_triton(
    x: torch.Tensor,
    p: SiteParams,
    store_uq: bool = False,
    precision: str | None = None,
    config: dict | None = None,
) -> dict[str, torch.Tensor | None]:
    """Kernel A: K1 (and K2 at decode) for one site (module doc).

    Args:
        x: (N, d) fp32/bf16/fp16 input, original channel order.
        p: the site's parameters (activations must be quantized).
        store_uq: also return the MAC input codes ``uq`` (tests).
        precision: ``tl.dot`` precision of an exact (8-bit) main path (default
            :data:`TRANSFORM_PRECISION`).
        config: override :func:`site_quant_config` (tests).

    Returns:
        The dict of ``site_quantize_reference``: ``qx``, ``sx``, ``qsum``, ``hq``, ``sh``,
        ``uq`` (None unless ``store_uq``), ``su``, ``gq``, ``sg``; ``xt`` is None (the
        transformed input never leaves the chip). Allocations depend on shapes only (CUDA-graph
        capturable); no host sync.
    """
    sizes = p.sizes
    factor_dims = [n for path in p.dims for n in (*path, 0, 0, 0)[:3]]
    cws_ranks, mac_ranks, branch_bits = branch_args(p)
    kv, kt, km = (int(k) for k in sizes)
    n, d = x.shape
    if d != kv + kt + km:
        raise ValueError(f"x has {d} channels, sizes sum to {kv + kt + km}")
    if x.stride(1) != 1:
        x = x.contiguous()
    dev = x.device
    has_cws, has_mac = p.cws is not None, p.mac is not None
    m1, m2 = len(cws_ranks), len(mac_ranks)
    r1, r2 = int(sum(cws_ranks)), int(sum(mac_ranks))
    qx = torch.empty((n, d), dtype=torch.int8, device=dev)
    sx = torch.empty((n, 3), dtype=torch.float32, device=dev)
    qsum = torch.empty((n, 3), dtype=torch.int32, device=dev)
    hq = torch.empty((n, r1), dtype=torch.int8, device=dev) if has_cws else None
    sh = torch.empty((n, m1), dtype=torch.float32, device=dev) if has_cws else None
    gq = torch.empty((n, r2), dtype=torch.int8, device=dev) if has_mac else None
    sg = torch.empty((n, m2), dtype=torch.float32, device=dev) if has_mac else None
    su = torch.empty(n, dtype=torch.float32, device=dev) if has_mac else None
    uq = torch.empty((n, km), dtype=torch.int8, device=dev) if has_mac else None
    out = {"qx": qx, "sx": sx, "qsum": qsum, "hq": hq, "sh": sh, "uq": uq if store_uq else None,
           "su": su, "gq": gq, "sg": sg, "xt": None}  # fmt: skip
    if n == 0:
        return out
    cfg = dict(config) if config is not None else site_quant_config(n)
    const = site_quant_constexprs(
        sizes, factor_dims, cws_ranks if has_cws else None, mac_ranks if has_mac else None,
        p.a_bits, branch_bits, p.mac_input, cfg, precision,
    )  # fmt: skip
    geo = site_quant_grid(n, cfg, km, _num_sms(dev))
    acc_w = const["R1P"] + const["R2P"] + int(has_mac)
    acc = torch.empty((n, acc_w), dtype=torch.int32, device=dev) if acc_w else qsum
    tiles = geo.get("tiles", 1)
    cnt = torch.empty(tiles, dtype=torch.int32, device=dev) if const["BRANCH"] == 2 else qsum
    scr = torch.empty(geo["G"] * const["SLOT"], dtype=torch.float32, device=dev)
    scr = scr if const["SLOT"] else sx
    scr16 = torch.empty(max(geo["G"] * const["SLOT16"], 1), dtype=torch.float16, device=dev)
    l2 = _factor_view(p.cws.down if has_cws else None, branch_bits[0], qx)
    l4 = _factor_view(p.mac.down if has_mac else None, branch_bits[2], qx)
    l2s = _ptr(p.cws.down_scale if has_cws else None, sx)
    l4s = _ptr(p.mac.down_scale if has_mac else None, sx)
    factors = _ptr(_f32(p.factors), sx)
    site_quant_kernel[(geo["G"],)](
        x, x.stride(0), p.perm, _f32(p.smooth), factors, _f32(p.act_clip),
        qx, sx, qsum, _ptr(uq, qx), _ptr(su, sx), scr, scr16, acc, cnt,
        l2, l2s, _ptr(hq, qx), _ptr(sh, sx),
        l4, l4s, _ptr(gq, qx), _ptr(sg, sx),
        n, geo["T"],
        **const, **site_quant_options(const, cfg),
        # x - q*s must round like torch (no FMA contraction) on the exact paths.
        enable_fp_fusion=False,
    )  # fmt: skip
    if const["BRANCH"] == 2:
        bconst = site_branch_constexprs(const)
        site_branch_kernel[(geo["S"], tiles)](
            qx, _ptr(uq, qx), sx, qsum, _ptr(su, sx), acc, cnt,
            l2, l2s, _ptr(hq, qx), _ptr(sh, sx),
            l4, l4s, _ptr(gq, qx), _ptr(sg, sx),
            n, geo["k_split"],
            **bconst, num_warps=4, num_stages=1,
        )  # fmt: skip
    return out
