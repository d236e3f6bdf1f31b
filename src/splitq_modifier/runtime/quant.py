"""Integer helpers shared by the runtime, the format and calibration's freezing step.

Everything is symmetric integer quantization,
``q(v, b) = clamp(round_half_even(v / s), -2^(b-1), 2^(b-1) - 1)``. Codes are packed densely
along the input dim into int32 words (:func:`pack_path_weight`). The packing is this
package's own: the saved format's bit layout must not change with the installed
compressed-tensors (0.17 and 0.19 pack 3-bit codes differently), so the runtime imports no
compressed-tensors at all.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "EPS",
    "apply_kron",
    "imatmul",
    "pack_path_weight",
    "packed_words",
    "qmax_of",
    "quantize_per_token",
    "quantize_weight_per_channel",
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
