"""The SplitQ linear at runtime: torch reference, the ``splitq::linear`` op, and helpers.

Contract (one SplitQ linear, DESIGN.md sections 1.3, 1.4 and 4)
----------------------------------------------------------------
The site-level online transform (gather the channels into path order, multiply by the per-path
transforms) happens in torch *before* the op. The op receives ``x`` (N, d) in fp32/bf16/fp16,
already transformed, laid out as three contiguous paths ``[vision-outlier | text-outlier | main]``
of sizes ``(kv, kt, km)`` (``kv`` or ``kt`` may be 0). Everything is symmetric integer
quantization, ``q(v, b) = clamp(round_half_even(v / s), -2^(b-1), 2^(b-1) - 1)``:

* activations, per token and path ``p``:
  ``s_p[n] = max(absmax(x_p[n]) * act_clip[p], 1e-8) / qmax(a_bits[p])`` in fp32;
* weights, per path: ints ``(d_out, k_p)`` packed densely along the input dim with
  compressed-tensors' ``pack_to_int32(..., packed_dim=1)`` plus a per-output-channel fp32 scale;
* main output ``y[n, o] = sum_p s_p[n] * ws_p[o] * sum_k qx_p[n, k] * qw_p[o, k]``;
* CWS branch (rank r1): ``h = (qx_m @ L2^T) * s_m * l2_scale``, ``hq = q(h, cws_act_bits)``
  per token (no clip), ``y += (hq @ L1^T) * sh * l1_scale``;
* MAC branch (rank r2): ``u = x_m - qx_m * s_m`` (``mac_input == 0``, the residual) or
  ``u = qx_m * s_m`` (``mac_input == 1``), ``uq = q(u, mac_act_bits)`` per token,
  ``g = (uq @ L4^T) * su * l4_scale``, ``gq = q(g, mac_act_bits)``,
  ``y += text_mask * (gq @ L3^T) * sg * l3_scale`` (``text_mask`` None = every token is text);
* ``+ bias``, output in ``out_dtype`` (the dtype of ``x`` unless given).

The op ``torch.ops.splitq.linear`` takes the flat arguments of :func:`splitq_linear_reference`.
Its CPU (and any non-CUDA) implementation is the reference; its CUDA implementation runs the
Triton kernels of ``splitq_modifier.kernels`` (set ``SPLITQ_DISABLE_TRITON=1`` to force the
reference on CUDA too).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from compressed_tensors.compressors.pack_quantized.helpers import (
    pack_to_int32,
    unpack_from_int32,
)
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from torch import Tensor

__all__ = [
    "EPS",
    "SplitQBranch",
    "SplitQLinearParams",
    "build_splitq_params",
    "pack_path_weight",
    "packed_words",
    "qmax_of",
    "quantize_per_token",
    "quantize_weight_per_channel",
    "random_splitq_params",
    "splitq_linear",
    "splitq_linear_op",
    "splitq_linear_reference",
    "splitq_quantize_activations_reference",
    "unpack_path_weight",
]

#: Floor of every absmax before it becomes a scale (activations, weights, branch activations).
EPS = 1e-8


# --------------------------------------------------------------------------------------------
# Small quantization helpers
# --------------------------------------------------------------------------------------------
def qmax_of(bits: int) -> int:
    """Largest code of a symmetric signed ``bits``-bit integer (``2^(bits-1) - 1``)."""
    if not 2 <= int(bits) <= 8:
        raise ValueError(f"bit width must be in [2, 8], got {bits}")
    return (1 << (int(bits) - 1)) - 1


def packed_words(k: int, bits: int) -> int:
    """Number of int32 words holding ``k`` densely packed ``bits``-bit values."""
    return math.ceil(k * bits / 32)


def quantize_per_token(v: Tensor, bits: int, clip: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric per-row (per-token) quantization of a 2-D fp32 tensor.

    ``s[n] = max(absmax(v[n]) * clip, 1e-8) / qmax`` and ``q = clamp(round_half_even(v / s))``.

    Args:
        v: (N, k) float tensor; it is upcast to fp32 first.
        bits: bit width (2..8).
        clip: optional fp32 scalar tensor, the clip ratio applied to the absmax.

    Returns:
        ``(q, s)``: int8 codes (N, k) and fp32 scales (N,).
    """
    v = v.float()
    qmax = qmax_of(bits)
    if v.shape[1] > 0:
        amax = v.abs().amax(dim=1)
    else:
        amax = v.new_zeros(v.shape[0])
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
    """Symmetric per-output-channel weight quantization.

    ``scale[o] = max(absmax(w[o]) * clip[o], 1e-8) / qmax``; the codes are computed with
    compressed-tensors' ``quantize`` (round half to even, clamp to ``[-2^(b-1), 2^(b-1) - 1]``).

    Args:
        w: (d_out, k) float weight.
        bits: bit width (2..8).
        clip: optional clip ratio(s) in (0, 1]: a float, a scalar tensor or a (d_out,) tensor.

    Returns:
        ``(w_int8, scale)``: int8 codes (d_out, k) and fp32 scales (d_out,).
    """
    w = w.detach().float()
    qmax = qmax_of(bits)
    if w.shape[1] > 0:
        amax = w.abs().amax(dim=1)
    else:
        amax = w.new_zeros(w.shape[0])
    if clip is not None:
        amax = amax * torch.as_tensor(clip, dtype=torch.float32, device=w.device)
    scale = amax.clamp_min(EPS) / torch.tensor(float(qmax), dtype=torch.float32, device=w.device)
    args = QuantizationArgs(num_bits=int(bits), symmetric=True, strategy="channel", type="int")
    q = ct_quantize(w, scale[:, None], None, args, dtype=torch.int8)
    return q, scale


def pack_path_weight(w_int8: Tensor, bits: int) -> Tensor:
    """Pack int8 codes (d_out, k) densely along the input dim into int32 (d_out, ceil(k*b/32)).

    This is compressed-tensors' ``pack_to_int32(w_int8, bits, packed_dim=1)``: value ``k`` of a
    row, offset by ``2^(b-1)`` to be unsigned, occupies bits ``[k*b, k*b + b)`` of the row's
    little-endian bit stream (a 3-bit value may straddle two words).
    """
    if w_int8.dtype != torch.int8:
        raise TypeError(f"expected int8 codes, got {w_int8.dtype}")
    return pack_to_int32(w_int8.contiguous(), int(bits), packed_dim=1).contiguous()


def unpack_path_weight(packed: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of :func:`pack_path_weight`: int32 (d_out, words) -> int8 codes (d_out, k)."""
    return unpack_from_int32(packed, int(bits), torch.Size([packed.shape[0], int(k)]), 1)


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------
@dataclass
class SplitQBranch:
    """A quantized low-rank branch ``y += Q(Q(u) down^T) up^T`` (CWS: L2/L1, MAC: L4/L3).

    Attributes:
        down: packed int32 (rank, km), the down-projection codes (L2 or L4).
        down_scale: fp32 (rank,), per-row scale of ``down``.
        up: packed int32 (d_out, ceil(rank*w_bits/32)), the up-projection codes (L1 or L3).
        up_scale: fp32 (d_out,), per-row scale of ``up``.
        w_bits: bit width of both factors.
        act_bits: bit width of the branch activations (the branch input and the rank-r hidden).
    """

    down: Tensor
    down_scale: Tensor
    up: Tensor
    up_scale: Tensor
    w_bits: int = 4
    act_bits: int = 4

    @property
    def rank(self) -> int:
        """The branch rank."""
        return int(self.down_scale.numel())

    def to(self, device: torch.device | str) -> SplitQBranch:
        """A copy with every tensor on ``device`` (dtypes unchanged)."""
        return replace(
            self,
            down=self.down.to(device),
            down_scale=self.down_scale.to(device),
            up=self.up.to(device),
            up_scale=self.up_scale.to(device),
        )


@dataclass
class SplitQLinearParams:
    """Everything one SplitQ linear needs at runtime (besides its input, mask and bias).

    Attributes:
        sizes: ``(kv, kt, km)``, the path widths; ``kv + kt + km`` is the input width d.
        w_packed: per path ``(v, t, m)``, packed int32 codes (d_out, ceil(k_p * w_bits[p] / 32)).
        w_scale: per path, fp32 per-output-channel scales (d_out,).
        w_bits: per path weight bit width (2, 3, 4 or 8).
        a_bits: per path activation bit width (2..8).
        act_clip: fp32 (3,) activation clip ratios in (0, 1]; None at construction = ones.
        cws: the CWS branch (L2 down, L1 up) or None.
        mac: the MAC branch (L4 down, L3 up) or None.
        mac_input: 0 = MAC reads the activation residual ``x_m - Q(x_m)``, 1 = it reads ``Q(x_m)``.
    """

    sizes: tuple[int, int, int]
    w_packed: tuple[Tensor, Tensor, Tensor]
    w_scale: tuple[Tensor, Tensor, Tensor]
    w_bits: tuple[int, int, int] = (4, 4, 4)
    a_bits: tuple[int, int, int] = (4, 4, 4)
    act_clip: Tensor | None = None
    cws: SplitQBranch | None = None
    mac: SplitQBranch | None = None
    mac_input: int = 0

    def __post_init__(self) -> None:
        if self.act_clip is None:
            self.act_clip = torch.ones(3, dtype=torch.float32, device=self.w_scale[2].device)

    @property
    def d_in(self) -> int:
        """Input width ``kv + kt + km``."""
        return int(sum(self.sizes))

    @property
    def d_out(self) -> int:
        """Output width."""
        return int(self.w_scale[2].numel())

    def to(self, device: torch.device | str) -> SplitQLinearParams:
        """A copy with every tensor on ``device`` (dtypes unchanged)."""
        return replace(
            self,
            w_packed=tuple(t.to(device) for t in self.w_packed),
            w_scale=tuple(t.to(device) for t in self.w_scale),
            act_clip=self.act_clip.to(device),
            cws=None if self.cws is None else self.cws.to(device),
            mac=None if self.mac is None else self.mac.to(device),
        )

    def weight_bytes(self) -> int:
        """Bytes of every stored weight-side tensor (packed codes, scales, branches, clips)."""
        ts: list[Tensor] = [*self.w_packed, *self.w_scale]
        for br in (self.cws, self.mac):
            if br is not None:
                ts += [br.down, br.down_scale, br.up, br.up_scale]
        ts.append(self.act_clip)
        return int(sum(t.numel() * t.element_size() for t in ts))

    def validate(self) -> None:
        """Check shapes, dtypes and bit widths; raise ``ValueError`` on the first mismatch."""
        if len(self.sizes) != 3 or any(int(k) < 0 for k in self.sizes):
            raise ValueError(f"sizes must be three non-negative ints, got {self.sizes}")
        d_out = self.d_out
        for p, (k, b, wp, ws) in enumerate(
            zip(self.sizes, self.w_bits, self.w_packed, self.w_scale, strict=True)
        ):
            qmax_of(b)
            if wp.dtype != torch.int32 or tuple(wp.shape) != (d_out, packed_words(k, b)):
                raise ValueError(
                    f"path {p}: packed weight must be int32 {(d_out, packed_words(k, b))}, "
                    f"got {wp.dtype} {tuple(wp.shape)}"
                )
            if ws.dtype != torch.float32 or ws.numel() != d_out:
                raise ValueError(f"path {p}: weight scale must be fp32 ({d_out},)")
        for b in self.a_bits:
            qmax_of(b)
        if self.act_clip.dtype != torch.float32 or self.act_clip.numel() != 3:
            raise ValueError("act_clip must be an fp32 tensor of 3 ratios")
        if self.mac_input not in (0, 1):
            raise ValueError(f"mac_input must be 0 or 1, got {self.mac_input}")
        km = int(self.sizes[2])
        for name, br in (("cws", self.cws), ("mac", self.mac)):
            if br is None:
                continue
            r = br.rank
            qmax_of(br.w_bits)
            qmax_of(br.act_bits)
            if tuple(br.down.shape) != (r, packed_words(km, br.w_bits)):
                raise ValueError(f"{name}: down must be packed ({r}, km={km})")
            if tuple(br.up.shape) != (d_out, packed_words(r, br.w_bits)) or (
                br.up_scale.numel() != d_out
            ):
                raise ValueError(f"{name}: up must be packed ({d_out}, rank={r})")

    def op_args(self) -> tuple:
        """The flat weight-side arguments of ``torch.ops.splitq.linear`` (see the reference)."""
        cws, mac = self.cws, self.mac
        return (
            *self.w_packed,
            *self.w_scale,
            self.act_clip,
            None if cws is None else cws.down,
            None if cws is None else cws.down_scale,
            None if cws is None else cws.up,
            None if cws is None else cws.up_scale,
            None if mac is None else mac.down,
            None if mac is None else mac.down_scale,
            None if mac is None else mac.up,
            None if mac is None else mac.up_scale,
        )

    def int_args(self) -> tuple[list[int], list[int], list[int], list[int], int]:
        """The flat integer arguments: sizes, a_bits, w_bits, branch_bits, mac_input."""
        cws, mac = self.cws, self.mac
        branch_bits = [
            4 if cws is None else int(cws.w_bits),
            4 if cws is None else int(cws.act_bits),
            4 if mac is None else int(mac.w_bits),
            4 if mac is None else int(mac.act_bits),
        ]
        return (
            [int(k) for k in self.sizes],
            [int(b) for b in self.a_bits],
            [int(b) for b in self.w_bits],
            branch_bits,
            int(self.mac_input),
        )


def _quantize_branch(
    down: Tensor, up: Tensor, w_bits: int, act_bits: int, clip: Tensor | float | None = None
) -> SplitQBranch:
    d_int, d_scale = quantize_weight_per_channel(down, w_bits, clip)
    u_int, u_scale = quantize_weight_per_channel(up, w_bits, clip)
    return SplitQBranch(
        down=pack_path_weight(d_int, w_bits),
        down_scale=d_scale,
        up=pack_path_weight(u_int, w_bits),
        up_scale=u_scale,
        w_bits=int(w_bits),
        act_bits=int(act_bits),
    )


def build_splitq_params(
    w_paths: Sequence[Tensor],
    w_bits: Sequence[int] = (4, 4, 4),
    a_bits: Sequence[int] = (4, 4, 4),
    act_clip: Tensor | Sequence[float] | None = None,
    weight_clip: Sequence[Tensor | float | None] | None = None,
    cws: tuple[Tensor, Tensor] | None = None,
    mac: tuple[Tensor, Tensor] | None = None,
    cws_bits: tuple[int, int] = (4, 4),
    mac_bits: tuple[int, int] = (4, 4),
    mac_input: int = 0,
) -> SplitQLinearParams:
    """Quantize and pack dense float weights into :class:`SplitQLinearParams`.

    Args:
        w_paths: the three transformed path weights ``(W_v, W_t, W_m)``, each (d_out, k_p)
            (k_p may be 0), already in path order and multiplied by ``P_p^-T``.
        w_bits: per path weight bits.
        a_bits: per path activation bits.
        act_clip: activation clip ratios (3,), None = no clipping.
        weight_clip: per path weight clip ratio(s) (float, scalar or (d_out,) tensor) or None.
        cws: dense ``(L2 (r1, km), L1 (d_out, r1))`` or None.
        mac: dense ``(L4 (r2, km), L3 (d_out, r2))`` or None.
        cws_bits: ``(weight bits, activation bits)`` of the CWS branch.
        mac_bits: ``(weight bits, activation bits)`` of the MAC branch.
        mac_input: 0 = residual input, 1 = dequantized main activation.

    Returns:
        The packed parameters (on the device of ``w_paths``), validated.
    """
    if len(w_paths) != 3:
        raise ValueError("w_paths must hold the three path weights (v, t, m)")
    wclip = list(weight_clip) if weight_clip is not None else [None, None, None]
    packed, scales = [], []
    for w, b, c in zip(w_paths, w_bits, wclip, strict=True):
        q, s = quantize_weight_per_channel(w, b, c)
        packed.append(pack_path_weight(q, b))
        scales.append(s)
    device = w_paths[2].device
    clip = None
    if act_clip is not None:
        clip = torch.as_tensor(act_clip, dtype=torch.float32, device=device).reshape(3).clone()
    params = SplitQLinearParams(
        sizes=tuple(int(w.shape[1]) for w in w_paths),
        w_packed=tuple(packed),
        w_scale=tuple(scales),
        w_bits=tuple(int(b) for b in w_bits),
        a_bits=tuple(int(b) for b in a_bits),
        act_clip=clip,
        cws=None if cws is None else _quantize_branch(cws[0], cws[1], *cws_bits),
        mac=None if mac is None else _quantize_branch(mac[0], mac[1], *mac_bits),
        mac_input=int(mac_input),
    )
    params.validate()
    return params


def random_splitq_params(
    d_out: int,
    sizes: Sequence[int],
    w_bits: Sequence[int] = (4, 4, 4),
    a_bits: Sequence[int] = (4, 4, 4),
    cws_rank: int = 0,
    mac_rank: int = 0,
    cws_bits: tuple[int, int] = (4, 4),
    mac_bits: tuple[int, int] = (4, 4),
    mac_input: int = 0,
    act_clip: Sequence[float] | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> SplitQLinearParams:
    """Random SplitQ parameters (Gaussian dense weights, quantized and packed) for tests/benchmarks.

    Branch factors are scaled so that each branch contributes a few percent of the output.
    A rank of 0 leaves the branch out.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    d = int(sum(sizes))
    km = int(sizes[2])

    def randn(*shape: int, std: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=gen, device=device) * std

    w_paths = [randn(d_out, int(k), std=d**-0.5) for k in sizes]
    cws = mac = None
    if cws_rank > 0:
        cws = (randn(cws_rank, km, std=km**-0.5), randn(d_out, cws_rank, std=0.1 * d**-0.5))
    if mac_rank > 0:
        mac = (randn(mac_rank, km, std=km**-0.5), randn(d_out, mac_rank, std=0.1 * d**-0.5))
    return build_splitq_params(
        w_paths, w_bits, a_bits, act_clip, None, cws, mac, cws_bits, mac_bits, mac_input
    )


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def _imatmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact ``a @ b^T`` of integer codes, returned as fp32 (as an int32 accumulator would be).

    float64 holds every partial sum exactly (|sum| < 2^53); the final conversion rounds to the
    nearest fp32, like the kernels' int32 -> fp32 conversion.
    """
    return (a.double() @ b.double().T).float()


def splitq_quantize_activations_reference(
    x: Tensor,
    act_clip: Tensor,
    l2: Tensor | None,
    l2_scale: Tensor | None,
    l4: Tensor | None,
    l4_scale: Tensor | None,
    sizes: Sequence[int],
    a_bits: Sequence[int],
    branch_bits: Sequence[int],
    mac_input: int,
) -> dict[str, Tensor | None]:
    """Integer activation side of the contract (what the Triton quantize kernel produces).

    Returns a dict with ``qx`` int8 (N, d) in path order, ``sx`` fp32 (N, 3) per-path scales,
    the CWS hidden codes ``hq`` int8 (N, r1) and scales ``sh`` (N,), the MAC input codes ``uq``
    int8 (N, km) with scales ``su`` (N,), and the MAC hidden codes ``gq`` (N, r2) with ``sg``
    (N,). Absent branches give None.
    """
    kv, kt, km = (int(k) for k in sizes)
    xf = x.float()
    bounds = (0, kv, kv + kt, kv + kt + km)
    qs, ss = [], []
    for p in range(3):
        q, s = quantize_per_token(xf[:, bounds[p] : bounds[p + 1]], a_bits[p], act_clip[p])
        qs.append(q)
        ss.append(s)
    out: dict[str, Tensor | None] = {
        "qx": torch.cat(qs, dim=1),
        "sx": torch.stack(ss, dim=1),
        "hq": None,
        "sh": None,
        "uq": None,
        "su": None,
        "gq": None,
        "sg": None,
    }
    q_m, s_m = qs[2], ss[2]
    if l2 is not None:
        assert l2_scale is not None
        w_b, a_b = int(branch_bits[0]), int(branch_bits[1])
        l2_int = unpack_path_weight(l2, w_b, km)
        h = _imatmul(q_m, l2_int) * s_m[:, None] * l2_scale.float()[None, :]
        out["hq"], out["sh"] = quantize_per_token(h, a_b)
    if l4 is not None:
        assert l4_scale is not None
        w_b, a_b = int(branch_bits[2]), int(branch_bits[3])
        dq = q_m.float() * s_m[:, None]
        u = xf[:, bounds[2] :] - dq if int(mac_input) == 0 else dq
        uq, su = quantize_per_token(u, a_b)
        l4_int = unpack_path_weight(l4, w_b, km)
        g = _imatmul(uq, l4_int) * su[:, None] * l4_scale.float()[None, :]
        out["uq"], out["su"] = uq, su
        out["gq"], out["sg"] = quantize_per_token(g, a_b)
    return out


def splitq_linear_reference(
    x: Tensor,
    w_v: Tensor,
    w_t: Tensor,
    w_m: Tensor,
    ws_v: Tensor,
    ws_t: Tensor,
    ws_m: Tensor,
    act_clip: Tensor,
    l2: Tensor | None,
    l2_scale: Tensor | None,
    l1: Tensor | None,
    l1_scale: Tensor | None,
    l4: Tensor | None,
    l4_scale: Tensor | None,
    l3: Tensor | None,
    l3_scale: Tensor | None,
    text_mask: Tensor | None,
    bias: Tensor | None,
    sizes: Sequence[int],
    a_bits: Sequence[int],
    w_bits: Sequence[int],
    branch_bits: Sequence[int],
    mac_input: int,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Pure torch reference of one SplitQ linear (exact integer matmuls, fp32 epilogue).

    Args:
        x: (N, d) fp32/bf16/fp16 input in path order ``[v | t | m]``, already transformed.
        w_v, w_t, w_m: packed int32 path weights (d_out, ceil(k_p * w_bits[p] / 32)).
        ws_v, ws_t, ws_m: fp32 per-output-channel path weight scales (d_out,).
        act_clip: fp32 (3,) activation clip ratios.
        l2, l2_scale, l1, l1_scale: CWS factors (packed (r1, km), (r1,), (d_out, r1), (d_out,)).
        l4, l4_scale, l3, l3_scale: MAC factors (packed (r2, km), (r2,), (d_out, r2), (d_out,)).
        text_mask: (N,) bool, True on text tokens (MAC applies there); None = all text.
        bias: (d_out,) or None.
        sizes: ``[kv, kt, km]``.
        a_bits: per path activation bits.
        w_bits: per path weight bits.
        branch_bits: ``[cws_w_bits, cws_act_bits, mac_w_bits, mac_act_bits]``.
        mac_input: 0 = residual ``x_m - Q(x_m)``, 1 = dequantized ``Q(x_m)``.
        out_dtype: output dtype, default ``x.dtype``.

    Returns:
        (N, d_out) output.
    """
    kv, kt, km = (int(k) for k in sizes)
    acts = splitq_quantize_activations_reference(
        x, act_clip, l2, l2_scale, l4, l4_scale, sizes, a_bits, branch_bits, mac_input
    )
    qx, sx = acts["qx"], acts["sx"]
    bounds = (0, kv, kv + kt, kv + kt + km)
    y = torch.zeros(x.shape[0], ws_m.numel(), dtype=torch.float32, device=x.device)
    for p, (wp, wsp) in enumerate(((w_v, ws_v), (w_t, ws_t), (w_m, ws_m))):
        k = bounds[p + 1] - bounds[p]
        w_int = unpack_path_weight(wp, w_bits[p], k)
        acc = _imatmul(qx[:, bounds[p] : bounds[p + 1]], w_int)
        y = y + acc * sx[:, p, None] * wsp.float()[None, :]
    if l1 is not None:
        assert l1_scale is not None and acts["hq"] is not None
        l1_int = unpack_path_weight(l1, branch_bits[0], acts["hq"].shape[1])
        y = y + _imatmul(acts["hq"], l1_int) * acts["sh"][:, None] * l1_scale.float()[None, :]
    if l3 is not None:
        assert l3_scale is not None and acts["gq"] is not None
        l3_int = unpack_path_weight(l3, branch_bits[2], acts["gq"].shape[1])
        dy = _imatmul(acts["gq"], l3_int) * acts["sg"][:, None] * l3_scale.float()[None, :]
        if text_mask is not None:
            dy = torch.where(text_mask.reshape(-1, 1).bool(), dy, torch.zeros_like(dy))
        y = y + dy
    if bias is not None:
        y = y + bias.float()[None, :]
    return y.to(out_dtype if out_dtype is not None else x.dtype)


# --------------------------------------------------------------------------------------------
# The torch op
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("splitq::linear", mutates_args=())
def splitq_linear_op(
    x: Tensor,
    w_v: Tensor,
    w_t: Tensor,
    w_m: Tensor,
    ws_v: Tensor,
    ws_t: Tensor,
    ws_m: Tensor,
    act_clip: Tensor,
    l2: Tensor | None,
    l2_scale: Tensor | None,
    l1: Tensor | None,
    l1_scale: Tensor | None,
    l4: Tensor | None,
    l4_scale: Tensor | None,
    l3: Tensor | None,
    l3_scale: Tensor | None,
    text_mask: Tensor | None,
    bias: Tensor | None,
    sizes: list[int],
    a_bits: list[int],
    w_bits: list[int],
    branch_bits: list[int],
    mac_input: int,
    out_dtype: torch.dtype | None,
) -> Tensor:
    """``torch.ops.splitq.linear``: default (CPU and non-CUDA) implementation = the reference."""
    return splitq_linear_reference(
        x, w_v, w_t, w_m, ws_v, ws_t, ws_m, act_clip, l2, l2_scale, l1, l1_scale, l4,
        l4_scale, l3, l3_scale, text_mask, bias, sizes, a_bits, w_bits, branch_bits,
        mac_input, out_dtype,
    )  # fmt: skip


@splitq_linear_op.register_kernel("cuda")
def _splitq_linear_cuda(
    x, w_v, w_t, w_m, ws_v, ws_t, ws_m, act_clip, l2, l2_scale, l1, l1_scale, l4, l4_scale,
    l3, l3_scale, text_mask, bias, sizes, a_bits, w_bits, branch_bits, mac_input, out_dtype,
):  # fmt: skip
    args = (
        x, w_v, w_t, w_m, ws_v, ws_t, ws_m, act_clip, l2, l2_scale, l1, l1_scale, l4,
        l4_scale, l3, l3_scale, text_mask, bias, sizes, a_bits, w_bits, branch_bits,
        mac_input, out_dtype,
    )  # fmt: skip
    if os.environ.get("SPLITQ_DISABLE_TRITON", "0") == "1":
        return splitq_linear_reference(*args)
    from splitq_modifier.kernels import splitq_linear_triton  # lazy: triton only on CUDA

    return splitq_linear_triton(*args)


@splitq_linear_op.register_fake
def _splitq_linear_fake(
    x, w_v, w_t, w_m, ws_v, ws_t, ws_m, act_clip, l2, l2_scale, l1, l1_scale, l4, l4_scale,
    l3, l3_scale, text_mask, bias, sizes, a_bits, w_bits, branch_bits, mac_input, out_dtype,
):  # fmt: skip
    torch._check(x.dim() == 2, lambda: "splitq::linear expects a 2-D input (N, d)")
    return x.new_empty((x.shape[0], ws_m.shape[0]), dtype=out_dtype or x.dtype)


def splitq_linear(
    x: Tensor,
    params: SplitQLinearParams,
    text_mask: Tensor | None = None,
    bias: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Apply one SplitQ linear through ``torch.ops.splitq.linear``.

    Args:
        x: (..., d) input, already transformed and in path order ``[v | t | m]``.
        params: the packed layer parameters (on the device of ``x``).
        text_mask: (...) bool over the leading dims of ``x`` (True = text token), or None
            (every token is text).
        bias: optional (d_out,) bias.
        out_dtype: output dtype, default ``x.dtype``.

    Returns:
        (..., d_out) output.
    """
    lead = x.shape[:-1]
    if x.shape[-1] != params.d_in:
        raise ValueError(f"x has {x.shape[-1]} channels, params expect {params.d_in}")
    x2 = x.reshape(-1, x.shape[-1])
    mask = None if text_mask is None else text_mask.reshape(-1).to(torch.bool)
    sizes, a_bits, w_bits, branch_bits, mac_input = params.int_args()
    y = torch.ops.splitq.linear(
        x2, *params.op_args(), mask, bias, sizes, a_bits, w_bits, branch_bits,
        mac_input, out_dtype,
    )  # fmt: skip
    return y.reshape(*lead, y.shape[-1])
