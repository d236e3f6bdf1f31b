"""Shared Triton helpers: rounding, symmetric quantization, unpacking of dense-packed codes,
per-segment quantization of the branch hidden states.

Interpreter notes (verified on Triton 3.9): under ``TRITON_INTERPRET=1`` bf16 arithmetic is wrong,
so every load is converted to fp32 at once; ``libdevice.rint`` fails, so rounding is written
with ``floor``/``where``. Divisions that decide a quantization code use ``tl.div_rn`` (IEEE
round-to-nearest) so that GPU results match the torch reference bit for bit.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pow2_at_least(n: int, lo: int) -> int:
    """Smallest power of two >= max(n, lo)."""
    return max(triton.next_power_of_2(max(int(n), 1)), lo)


@triton.jit
def round_half_even(v):
    """Round fp32 to the nearest integer, ties to even (what ``torch.round`` does)."""
    f = tl.floor(v)
    d = v - f  # exact in fp32; for |v| >= 2^23, v is already an integer and d == 0
    r = tl.where(d > 0.5, f + 1.0, f)
    f_is_odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d == 0.5) & f_is_odd, f + 1.0, r)


@triton.jit
def token_scale(amax, QMAX: tl.constexpr):
    """Per-token scale ``max(amax, 1e-8) / qmax`` (amax already multiplied by its clip)."""
    return tl.div_rn(tl.maximum(amax, 1e-8), tl.zeros_like(amax) + QMAX)


@triton.jit
def quantize_codes(v, scale, QMAX: tl.constexpr):
    """``clamp(round_half_even(v / scale), -QMAX - 1, QMAX)`` as fp32 integer values."""
    q = round_half_even(tl.div_rn(v, scale))
    return tl.minimum(tl.maximum(q, -QMAX - 1.0), QMAX * 1.0)


@triton.jit
def load_packed_kmajor(
    ptr, n_idx, n_mask, row_stride, k0, K,
    BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Load a K-major ``[BLOCK_K, BLOCK_N]`` int8 tile of a dense-packed int32 matrix.

    The packed matrix has one row per ``n`` (output channel or rank) and packs the codes of
    ``k`` densely (compressed-tensors ``pack_to_int32(..., packed_dim=1)``): code ``k`` of a row,
    offset by ``2^(BITS-1)``, occupies bits ``[k*BITS, k*BITS + BITS)`` of the row's
    little-endian bit stream. Element ``(k, n)`` of the tile is code ``k0 + k`` of row
    ``n_idx[n]``. Requires ``k0 % 32 == 0`` and ``BLOCK_K % 32 == 0`` (a 32-code group always
    fills whole words). Codes at ``k >= K`` are garbage (padding decodes to ``-2^(BITS-1)``): the
    caller multiplies them by zero activations.

    * BITS in {2, 4, 8}: each word holds ``E = 32 // BITS`` whole codes. Load the words as a
      ``[BLOCK_K // E, 1, BLOCK_N]`` tile, shift by ``[1, E, 1]`` bit offsets, reshape (word-major
      then code-in-word = k order).
    * BITS == 3: a group of 32 codes spans 3 words; codes 10 and 21 straddle two words. Load the
      3 words of each group and pick, for each of the 32 positions, its word and bit offset.
    * other widths: per-element gather (``unpack_codes``).
    """
    n_words = (K * BITS + 31) // 32
    if (32 % BITS) == 0:
        E: tl.constexpr = 32 // BITS
        w_idx = k0 // E + tl.arange(0, BLOCK_K // E)
        wmask = (w_idx < n_words)[:, None, None] & n_mask[None, None, :]
        words = tl.load(
            ptr + n_idx[None, None, :] * row_stride + w_idx[:, None, None], mask=wmask, other=0
        )  # [BLOCK_K // E, 1, BLOCK_N] int32
        shifts = (tl.arange(0, E) * BITS)[None, :, None]
        # Arithmetic shift is fine: the mask keeps bits [s, s + BITS) <= 31 only.
        codes = (words >> shifts) & ((1 << BITS) - 1)  # [BLOCK_K // E, E, BLOCK_N]
        # To int8 before the reshape: a reshape may go through a layout conversion, which
        # should move bytes, not int32 words.
        out = tl.reshape((codes - (1 << (BITS - 1))).to(tl.int8), [BLOCK_K, BLOCK_N])
    elif BITS == 3:
        g_word = (k0 // 32) * 3 + tl.arange(0, BLOCK_K // 32) * 3
        base = ptr + n_idx[None, None, :] * row_stride + g_word[:, None, None]
        m0 = (g_word < n_words)[:, None, None] & n_mask[None, None, :]
        m1 = ((g_word + 1) < n_words)[:, None, None] & n_mask[None, None, :]
        m2 = ((g_word + 2) < n_words)[:, None, None] & n_mask[None, None, :]
        w0 = tl.load(base, mask=m0, other=0).to(tl.uint32, bitcast=True)
        w1 = tl.load(base + 1, mask=m1, other=0).to(tl.uint32, bitcast=True)
        w2 = tl.load(base + 2, mask=m2, other=0).to(tl.uint32, bitcast=True)
        bit = (tl.arange(0, 32) * 3)[None, :, None]
        sel = bit >> 5
        off = (bit & 31).to(tl.uint32)
        lo = tl.where(sel == 0, w0, tl.where(sel == 1, w1, w2))
        hi = tl.where(sel == 0, w1, w2)
        spill = (off + 3) > 32
        v = (lo >> off) | tl.where(spill, hi << ((32 - off) & 31), 0)
        codes = ((v & 7).to(tl.int32, bitcast=True) - 4).to(tl.int8)
        out = tl.reshape(codes, [BLOCK_K, BLOCK_N])
    else:
        kk = k0 + tl.arange(0, BLOCK_K)
        out = unpack_codes(
            ptr, n_idx[None, :], kk[:, None], row_stride, n_mask[None, :] & (kk < K)[:, None], BITS
        )
    return out


@triton.jit
def unpack_codes(ptr, rows, cols, row_stride, mask, BITS: tl.constexpr):
    """Gather int8 codes from a dense-packed int32 matrix (compressed-tensors layout).

    Row ``r`` of the packed matrix is one little-endian bit stream: code ``c`` (offset by
    ``2^(BITS-1)`` to be unsigned) occupies bits ``[c*BITS, c*BITS + BITS)``, i.e. word
    ``(c*BITS) >> 5`` from bit ``(c*BITS) & 31``; for 3-bit codes it may run into the next word.
    ``rows`` and ``cols`` are broadcastable index tensors, so the same helper yields a
    ``[BLOCK_K, BLOCK_N]`` (K-major) tile for a ``tl.dot`` right operand.
    """
    bit = cols * BITS
    word = bit >> 5
    off = (bit & 31).to(tl.uint32)
    base = ptr + rows * row_stride + word
    w0 = tl.load(base, mask=mask, other=0).to(tl.uint32, bitcast=True)
    v = w0 >> off  # logical shift: zero filled
    if (32 % BITS) != 0:
        # Straddling code: its high bits are the low bits of the next word.
        spill = (off + BITS) > 32
        w1 = tl.load(base + 1, mask=mask & spill, other=0).to(tl.uint32, bitcast=True)
        v = v | (w1 << tl.where(spill, 32 - off, 0))
    v = (v & ((1 << BITS) - 1)).to(tl.int32, bitcast=True)
    return (v - (1 << (BITS - 1))).to(tl.int8)


@triton.jit
def load_packed_rows(
    ptr, r_idx, r_mask, row_stride, k0, K,
    BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Load a row-major ``[BLOCK_R, BLOCK_K]`` int8 tile of a dense-packed int32 matrix.

    Element ``(r, k)`` is code ``k0 + k`` of row ``r_idx[r]`` (same packing and requirements as
    :func:`load_packed_kmajor`, of which this is the transpose). The GEMM uses it for the
    unpacked weights as the *left* ``tl.dot`` operand: on Hopper, WGMMA reads only its A
    operand from registers, so a tile unpacked in registers goes there without a round trip
    through shared memory, and the tokens sit on the (small) N side.
    """
    n_words = (K * BITS + 31) // 32
    if (32 % BITS) == 0:
        E: tl.constexpr = 32 // BITS
        w_idx = k0 // E + tl.arange(0, BLOCK_K // E)
        wmask = r_mask[:, None, None] & (w_idx < n_words)[None, :, None]
        words = tl.load(
            ptr + r_idx[:, None, None] * row_stride + w_idx[None, :, None], mask=wmask, other=0
        )  # [BLOCK_R, BLOCK_K // E, 1] int32
        shifts = (tl.arange(0, E) * BITS)[None, None, :]
        codes = (words >> shifts) & ((1 << BITS) - 1)  # [BLOCK_R, BLOCK_K // E, E]
        out = tl.reshape((codes - (1 << (BITS - 1))).to(tl.int8), [BLOCK_R, BLOCK_K])
    elif BITS == 3:
        g_word = (k0 // 32) * 3 + tl.arange(0, BLOCK_K // 32) * 3
        base = ptr + r_idx[:, None, None] * row_stride + g_word[None, :, None]
        m0 = r_mask[:, None, None] & (g_word < n_words)[None, :, None]
        m1 = r_mask[:, None, None] & ((g_word + 1) < n_words)[None, :, None]
        m2 = r_mask[:, None, None] & ((g_word + 2) < n_words)[None, :, None]
        w0 = tl.load(base, mask=m0, other=0).to(tl.uint32, bitcast=True)
        w1 = tl.load(base + 1, mask=m1, other=0).to(tl.uint32, bitcast=True)
        w2 = tl.load(base + 2, mask=m2, other=0).to(tl.uint32, bitcast=True)
        bit = (tl.arange(0, 32) * 3)[None, None, :]
        sel = bit >> 5
        off = (bit & 31).to(tl.uint32)
        lo = tl.where(sel == 0, w0, tl.where(sel == 1, w1, w2))
        hi = tl.where(sel == 0, w1, w2)
        spill = (off + 3) > 32
        v = (lo >> off) | tl.where(spill, hi << ((32 - off) & 31), 0)
        codes = ((v & 7).to(tl.int32, bitcast=True) - 4).to(tl.int8)
        out = tl.reshape(codes, [BLOCK_R, BLOCK_K])
    else:
        kk = k0 + tl.arange(0, BLOCK_K)
        out = unpack_codes(
            ptr, r_idx[:, None], kk[None, :], row_stride, r_mask[:, None] & (kk < K)[None, :], BITS
        )
    return out


@triton.jit
def segment_quantize(h, cols, rows, row_mask, s_ptr, SEGS: tl.constexpr, QMAX: tl.constexpr):
    """Quantize ``h`` ([BLOCK_M, R_P] fp32) per row and per column segment; store the scales.

    ``SEGS`` is a constexpr tuple of ``(lo, hi)`` column ranges, one per linear of the site
    (their ranks concatenated); ``cols`` the ``[R_P]`` column indices. Each row of segment
    ``j`` gets the scale ``max(absmax, 1e-8) / QMAX``, stored at ``s_ptr[rows * len(SEGS) + j]``
    ((N, M) row-major). Columns outside every segment (padding) must hold 0; they come out as
    code 0. Returns the codes as fp32 integer values.
    """
    ah = tl.abs(h)
    col_scale = tl.zeros_like(h) + 1.0
    for j in tl.static_range(len(SEGS)):
        in_seg = (cols >= SEGS[j][0]) & (cols < SEGS[j][1])
        s = token_scale(tl.max(tl.where(in_seg[None, :], ah, 0.0), axis=1), QMAX)
        col_scale = tl.where(in_seg[None, :], s[:, None], col_scale)
        tl.store(s_ptr + rows * len(SEGS) + j, s, mask=row_mask)
    return quantize_codes(h, col_scale, QMAX)
