"""Integer helpers shared by the runtime, the format and calibration's freezing step.

Everything is symmetric integer quantization,
``q(v, b) = clamp(round_half_even(v / s), -2^(b-1), 2^(b-1) - 1)``. Two packings into int32
words, both this package's own (the saved format's bit layout must not change with the
installed compressed-tensors: 0.17 and 0.19 pack 3-bit codes differently), so the runtime
imports no compressed-tensors at all:

* the *dense* packing (:func:`pack_path_weight`): codes back to back along the input dim, a
  row one little-endian bit stream (compressed-tensors 0.19's ``pack_to_int32``). The branch
  factors use it in every format version, the path weights up to format version 2;
* the *MMA block* packing (:func:`pack_mma_weight`, format version 3 path weights): 64-code
  blocks whose bytes split into 32-bit registers that feed an int8 tensor-core MMA after one
  mask-and-shift per register (see there). :func:`dense_to_mma` converts version-2 weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "EPS",
    "apply_kron",
    "MMA_BLOCK",
    "dense_to_mma",
    "imatmul",
    "mma_block_bytes",
    "mma_offset",
    "mma_weight_words",
    "pack_mma_weight",
    "pack_path_weight",
    "packed_words",
    "qmax_of",
    "quantize_per_token",
    "quantize_weight_per_channel",
    "unpack_mma_weight",
    "unpack_path_weight",
]

#: Floor of every absmax before it becomes a scale (activations, weights, branch activations).
EPS = 1e-8


def qmax_of(bits: int) -> int:
    """Largest code of a symmetric signed ``bits``-bit integer (``2^(bits-1) - 1``)."""
    if not 2 <= int(bits) <= 8:
        raise ValueError(f"bit width must be in [2, 8], got {bits}")
    return (1 << (int(bits) - 1)) - 1


def packed_words(k: int, bits: int) -> int:
    """Number of int32 words holding ``k`` densely packed ``bits``-bit values."""
    return math.ceil(k * bits / 32)


def quantize_per_token(v: Tensor, bits: int, clip: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric per-row (per-token) quantization of a 2-D tensor (upcast to fp32).

    ``s[n] = max(absmax(v[n]) * clip, 1e-8) / qmax`` and ``q = clamp(round_half_even(v / s))``.
    Returns int8 codes ``(N, k)`` and fp32 scales ``(N,)``.
    """
    v = v.float()
    qmax = qmax_of(bits)
    amax = v.abs().amax(dim=1) if v.shape[1] > 0 else v.new_zeros(v.shape[0])
    if clip is not None:
        amax = amax * clip.float()
    # Tensor / tensor: an IEEE division on every backend (a python-scalar divisor may become a
    # multiplication by its reciprocal on CUDA, which would not match the kernels bit for bit).
    s = amax.clamp_min(EPS) / torch.tensor(float(qmax), dtype=torch.float32, device=v.device)
    q = torch.clamp(torch.round(v / s[:, None]), -qmax - 1, qmax).to(torch.int8)
    return q, s


def quantize_weight_per_channel(
    w: Tensor, bits: int, clip: Tensor | float | None = None
) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel weight quantization (round half to even).

    ``scale[o] = max(absmax(w[o]) * clip[o], 1e-8) / qmax``; ``clip`` is a float, a scalar or a
    ``(d_out,)``/``(d_out, 1)`` tensor of ratios in (0, 1]. Returns int8 codes and fp32 scales.
    """
    w = w.detach().float()
    qmax = qmax_of(bits)
    amax = w.abs().amax(dim=1) if w.shape[1] > 0 else w.new_zeros(w.shape[0])
    if clip is not None:
        amax = amax * torch.as_tensor(clip, dtype=torch.float32, device=w.device).reshape(-1)
    scale = amax.clamp_min(EPS) / torch.tensor(float(qmax), dtype=torch.float32, device=w.device)
    q = torch.clamp(torch.round(w / scale[:, None]), -qmax - 1, qmax).to(torch.int8)
    return q, scale


def _bit_slots(k: int, bits: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Word index and bit offset of each of ``k`` codes in a dense little-endian bit stream."""
    start = torch.arange(k, device=device, dtype=torch.int64) * int(bits)
    return start >> 5, start & 31


def pack_path_weight(w_int8: Tensor, bits: int) -> Tensor:
    """Pack int8 codes (rows, k) densely along k into int32 (rows, ceil(k*b/32)).

    Code ``k`` of a row, offset by ``2^(b-1)`` to be unsigned, occupies bits
    ``[k*b, k*b + b)`` of the row's little-endian bit stream: word ``(k*b) >> 5`` from bit
    ``(k*b) & 31``, a 3-bit code running into the next word when it does not fit. (The same
    layout as compressed-tensors 0.19's ``pack_to_int32``; a test holds the two equal.)
    """
    if w_int8.dtype != torch.int8:
        raise TypeError(f"expected int8 codes, got {w_int8.dtype}")
    bits = int(bits)
    qmax_of(bits)
    rows, k = w_int8.shape
    words = packed_words(k, bits)
    u = w_int8.to(torch.int64) + (1 << (bits - 1))
    word, off = _bit_slots(k, bits, w_int8.device)
    # int64 words: the high half of a shifted code is the spill into the next word
    out = torch.zeros(rows, words + 1, dtype=torch.int64, device=w_int8.device)
    out.index_add_(1, word, u << off)
    spill = out[:, :-1] >> 32
    out = (out[:, :-1] & 0xFFFFFFFF) + torch.nn.functional.pad(spill[:, :-1], (1, 0))
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32).contiguous()


def unpack_path_weight(packed: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of :func:`pack_path_weight`: int32 (rows, words) -> int8 codes (rows, k)."""
    bits, k = int(bits), int(k)
    if packed.dtype != torch.int32:
        raise TypeError(f"expected int32 words, got {packed.dtype}")
    if packed.shape[1] < packed_words(k, bits):
        raise ValueError(f"{packed.shape[1]} words hold fewer than {k} {bits}-bit codes")
    w = packed.to(torch.int64) & 0xFFFFFFFF
    w = torch.nn.functional.pad(w, (0, 1))  # the word after the last, for spills
    word, off = _bit_slots(k, bits, packed.device)
    v = (w[:, word] | (w[:, word + 1] << 32)) >> off
    return ((v & ((1 << bits) - 1)) - (1 << (bits - 1))).to(torch.int8)


#: Codes per block of the MMA block packing (a multiple of the int8 MMA's K step, 32, and of
#: every piece split below; independent of the GPU tile configuration).
MMA_BLOCK = 64


def mma_block_bytes(bits: int) -> int:
    """Bytes of one 64-code block of :func:`pack_mma_weight`: ``8 * bits`` for 2-4 bits,
    64 (one int8 byte per code) for 5-8 bits."""
    qmax_of(bits)
    return 8 * int(bits) if int(bits) <= 4 else MMA_BLOCK


def mma_offset(bits: int) -> int:
    """The offset kept in the stored codes of :func:`pack_mma_weight`: ``2^(bits-1)`` for 2-4
    bits (stored unsigned), 0 for 5-8 bits (stored as signed int8)."""
    return 1 << (int(bits) - 1) if int(bits) <= 4 else 0


def mma_weight_words(k: int, bits: int) -> int:
    """int32 words per row of :func:`pack_mma_weight` for ``k`` codes (whole 64-code blocks)."""
    return math.ceil(int(k) / MMA_BLOCK) * mma_block_bytes(bits) // 4


def _mma_blocks(u: Tensor, bits: int) -> Tensor:
    """(rows, nb, 64) stored codes -> (rows, nb, block bytes) uint8 (see pack_mma_weight)."""
    rows, nb, _ = u.shape
    if bits == 4:
        out = u[..., :32] | (u[..., 32:] << 4)
    elif bits == 2:
        v = u.reshape(rows, nb, 4, 16)
        out = v[:, :, 0] | (v[:, :, 1] << 2) | (v[:, :, 2] << 4) | (v[:, :, 3] << 6)
    elif bits == 3:
        v = u.reshape(rows, nb, 8, 8)  # [piece s, byte j]: code 8 s + j
        lo, hi = v & 3, v >> 2
        a = lo[:, :, 0] | (lo[:, :, 1] << 2) | (lo[:, :, 2] << 4) | (lo[:, :, 3] << 6)
        b = lo[:, :, 4] | (lo[:, :, 5] << 2) | (lo[:, :, 6] << 4) | (lo[:, :, 7] << 6)
        h = sum(hi[:, :, s] << s for s in range(8))
        out = torch.cat([a, b, h], dim=2)
    else:
        out = u
    return out.to(torch.uint8)


def pack_mma_weight(w_int8: Tensor, bits: int) -> Tensor:
    """Pack int8 codes (rows, k) into the MMA block layout: int32 (rows, mma_weight_words).

    Each row is cut into blocks of 64 codes (``MMA_BLOCK``; the last block is filled with code
    0). Codes of 2-4 bits are stored offset, ``u = q + 2^(b-1)`` in ``[0, 2^b)``; 5-8-bit
    codes are stored as their signed int8 bytes. A block's bytes, ``u[c]`` its code ``c``:

    * 4 bits, 32 bytes: byte ``j`` (0-31) holds ``u[j]`` in its low nibble and ``u[j + 32]``
      in its high nibble;
    * 2 bits, 16 bytes: byte ``j`` (0-15) holds ``u[j + 16 s]`` at bits ``2s, 2s+1``, s = 0-3;
    * 3 bits, 24 bytes (a 2-bit plane in two halves and a 1-bit plane): byte ``j`` (0-7) holds
      the low two bits of ``u[j + 8 s]`` at bits ``2s`` (s = 0-3), byte ``8 + j`` those of
      ``u[32 + j + 8 s]``, and byte ``16 + j`` bit 2 of ``u[j + 8 s]`` at bit ``s`` (s = 0-7);
    * 5-8 bits, 64 bytes: byte ``j`` is ``q[j]``.

    The bytes of a row follow each other block by block and are read as little-endian int32
    words. Why: one 32-bit register of a block (4 bytes) gives 4 codes of each of its pieces
    with one shift and one mask (two for the 3-bit high bit), the pieces land in the same
    thread's registers of the int8 MMA fragment, and the offset is subtracted once per
    token in the GEMM's epilogue (``2^(b-1) * sum_k x[t, k]``). The layout depends on nothing
    but ``bits``: any GPU tile whose K step is a multiple of 64 (and of 128 at 3 bits)
    reads whole blocks.
    """
    if w_int8.dtype != torch.int8:
        raise TypeError(f"expected int8 codes, got {w_int8.dtype}")
    bits = int(bits)
    qmax_of(bits)
    rows, k = w_int8.shape
    if k == 0:
        return torch.zeros(rows, 0, dtype=torch.int32, device=w_int8.device)
    nb = math.ceil(k / MMA_BLOCK)
    pad = nb * MMA_BLOCK - k
    if bits > 4:
        q = torch.nn.functional.pad(w_int8, (0, pad)).view(torch.uint8)
        out = q.reshape(rows, nb * MMA_BLOCK)
    else:
        u = w_int8.to(torch.int16) + mma_offset(bits)
        u = torch.nn.functional.pad(u, (0, pad), value=mma_offset(bits))
        out = _mma_blocks(u.reshape(rows, nb, MMA_BLOCK), bits).reshape(rows, -1)
    return out.contiguous().view(torch.int32).contiguous()


def unpack_mma_weight(packed: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of :func:`pack_mma_weight`: int32 (rows, words) -> int8 codes (rows, k)."""
    bits, k = int(bits), int(k)
    if packed.dtype != torch.int32:
        raise TypeError(f"expected int32 words, got {packed.dtype}")
    if packed.shape[1] != mma_weight_words(k, bits):
        raise ValueError(
            f"{packed.shape[1]} words per row, the MMA block packing of {k} {bits}-bit codes "
            f"has {mma_weight_words(k, bits)}"
        )
    rows = packed.shape[0]
    if k == 0:
        return torch.zeros(rows, 0, dtype=torch.int8, device=packed.device)
    nb = math.ceil(k / MMA_BLOCK)
    by = packed.contiguous().view(torch.uint8).reshape(rows, nb, mma_block_bytes(bits))
    if bits > 4:
        return by.view(torch.int8).reshape(rows, -1)[:, :k].contiguous()
    by = by.to(torch.int16)
    if bits == 4:
        u = torch.cat([by & 15, by >> 4], dim=2)
    elif bits == 2:
        u = torch.cat([(by >> (2 * s)) & 3 for s in range(4)], dim=2)
    else:
        a, b, h = by[:, :, :8], by[:, :, 8:16], by[:, :, 16:]
        lo = [(a >> (2 * s)) & 3 for s in range(4)] + [(b >> (2 * s)) & 3 for s in range(4)]
        u = torch.cat([lo[s] | (((h >> s) & 1) << 2) for s in range(8)], dim=2)
    q = u.reshape(rows, nb * MMA_BLOCK)[:, :k] - mma_offset(bits)
    return q.to(torch.int8).contiguous()


def dense_to_mma(packed: Tensor, bits: int, k: int) -> Tensor:
    """Repack path weights from the dense packing (format version 2) to the MMA block
    packing (version 3)."""
    return pack_mma_weight(unpack_path_weight(packed, bits, k), bits)


def imatmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact ``a @ b^T`` of integer codes, returned as fp32 (as an int32 accumulator would be).

    float64 holds every partial sum exactly (|sum| < 2^53); the final conversion rounds to the
    nearest fp32, like the kernels' int32 -> fp32 conversion.
    """
    return (a.double() @ b.double().T).float()


def apply_kron(x: Tensor, mats: list[Tensor]) -> Tensor:
    """Compute ``x @ (M_1 kron M_2 kron ...)`` on the last dim of ``x`` without the product.

    ``x`` is viewed as ``(..., n_1, ..., n_f)`` (row-major, the channel index is
    ``i_1 n_2 ... n_f + ... + i_f``); each factor acts on its own axis: the last by a plain
    matmul, every other one as ``M_i^T Y`` on that axis. One matrix is a plain matmul.
    """
    if not mats:
        return x
    if len(mats) == 1:
        return x @ mats[0]
    dims = [int(m.shape[0]) for m in mats]
    lead, n = x.shape[:-1], x.shape[-1]
    y = x.reshape(-1, dims[-1]) @ mats[-1]
    post = dims[-1]
    for i in range(len(mats) - 2, -1, -1):
        y = torch.matmul(mats[i].transpose(0, 1), y.reshape(-1, dims[i], post))
        post *= dims[i]
    return y.reshape(*lead, n)
