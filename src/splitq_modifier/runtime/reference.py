"""Torch reference of one SplitQ activation site: the contract the Triton kernels implement.

A *site* is one input shared by ``M`` linears (q/k/v, gate/up, or a single o/down projection).
Its linears' weights are concatenated along the output dim (``D = sum(out_splits)`` rows),
as in vLLM's fused qkv / gate-up layers, so the site runs as one transform-and-quantize pass
plus one GEMM. Three stages:

1. :func:`site_transform_reference`: ``x`` (N, d), any float dtype, original channel order
   -> gather ``x[:, perm]``, multiply by ``smooth`` (path order), per path ``p`` multiply by
   its Kronecker factors (``x_p @ (M_1 kron M_2 [kron M_3])``, :func:`apply_kron`) -> ``xt``
   (N, d) fp32 in path order ``[vision | text | main]`` of widths ``sizes = (kv, kt, km)``.
   ``factors`` is one flat fp32 tensor: the factors of path 0, then 1, then 2, each row-major;
   ``factor_dims`` has 9 entries, ``factor_dims[3p + i]`` the side of factor ``i`` of path ``p``
   (0 = absent).
2. :func:`site_quantize_reference`: per token and path,
   ``s_p = max(absmax(xt_p) * act_clip[p], 1e-8) / qmax(a_bits[p])``, codes ``qx`` (N, d) int8
   and scales ``sx`` (N, 3). Branch down-projections, for the ``M`` linears at once (their
   ranks ``cws_ranks`` / ``mac_ranks`` concatenated in ``L2`` (R1, km) / ``L4`` (R2, km)):

   * CWS: ``h = (qx_m @ L2^T) * s_m * l2_scale`` (N, R1), quantized per token *per linear
     segment* of ranks (no clip) -> ``hq`` (N, R1), ``sh`` (N, M);
   * MAC: ``u = xt_m - qx_m * s_m`` (``mac_input == 0``) or ``qx_m * s_m`` (1), quantized per
     token -> ``uq`` (N, km), ``su`` (N,); ``g = (uq @ L4^T) * su * l4_scale``, quantized per
     token per segment -> ``gq`` (N, R2), ``sg`` (N, M).
3. :func:`site_gemm_reference`: ``y[n, o] = sum_p sx[n, p] ws_p[o] sum_k qx_p[n, k] W_p[o, k]``
   over the concatenated packed weights ``W_p`` (D, ceil(k_p * w_bits[p] / 32)); for the rows
   ``o`` of linear ``j``, CWS adds ``(hq_j @ L1[o, :r_j]^T) * sh[:, j] * l1_scale[o]`` and MAC
   adds the same from ``gq_j``/``L3`` on text rows only (``text_mask`` None = all text);
   ``L1``/``L3`` are (D, ceil(r_max * b / 32)), each row holding its linear's ``r_j`` codes
   (zero codes after them); then ``+ bias`` (D,), output in ``out_dtype``.

Weight-only sites (``a_bits`` all 16) skip activation quantization: ``y = xt @ W_deq^T`` in
fp32, the branches read ``xt_m`` (their rank-r hidden states are still quantized).
Integer matmuls are exact (:func:`imatmul`); everything else is fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from splitq_modifier.runtime.quant import (
    apply_kron,
    imatmul,
    quantize_per_token,
    unpack_path_weight,
)

__all__ = [
    "flatten_factor_dims",
    "site_gemm_reference",
    "site_linear_reference",
    "site_quantize_reference",
    "site_transform_reference",
    "split_factors",
]

#: Activation bits that mean "not quantized" (weight-only SplitQ).
UNQUANTIZED = 16


def flatten_factor_dims(dims: Sequence[Sequence[int]]) -> list[int]:
    """Per-path factor sides -> the op's 9-entry list (3 slots per path, 0 = absent)."""
    out = []
    for p in range(3):
        f = [int(n) for n in dims[p]]
        if len(f) > 3:
            raise ValueError(f"path {p} has {len(f)} Kronecker factors; at most 3 are supported")
        out += f + [0] * (3 - len(f))
    return out


def split_factors(factors: Tensor, factor_dims: Sequence[int]) -> list[list[Tensor]]:
    """Views of the flat ``factors`` tensor as per-path lists of square matrices."""
    out, off = [], 0
    for p in range(3):
        mats = []
        for n in factor_dims[3 * p : 3 * p + 3]:
            n = int(n)
            if n:
                mats.append(factors[off : off + n * n].view(n, n))
                off += n * n
        out.append(mats)
    if off != factors.numel():
        raise ValueError(f"factors holds {factors.numel()} values, factor_dims need {off}")
    return out


def _bounds(sizes: Sequence[int]) -> tuple[int, int, int, int]:
    kv, kt, km = (int(k) for k in sizes)
    return 0, kv, kv + kt, kv + kt + km


def _segments(ranks: Sequence[int]) -> list[tuple[int, int]]:
    out, off = [], 0
    for r in ranks:
        out.append((off, off + int(r)))
        off += int(r)
    return out


def site_transform_reference(
    x: Tensor,
    perm: Tensor,
    smooth: Tensor,
    factors: Tensor,
    sizes: Sequence[int],
    factor_dims: Sequence[int],
) -> Tensor:
    """Stage 1: gather, smooth and transform each path; (N, d) fp32 in path order."""
    xs = x.float()[:, perm.long()] * smooth.float()
    parts = xs.split([int(k) for k in sizes], dim=1)
    mats = split_factors(factors.float(), factor_dims)
    return torch.cat([apply_kron(p, m) if p.shape[1] else p for p, m in zip(parts, mats)], 1)


def _segment_quantize(v: Tensor, ranks: Sequence[int], bits: int) -> tuple[Tensor, Tensor]:
    codes, scales = [], []
    for lo, hi in _segments(ranks):
        q, s = quantize_per_token(v[:, lo:hi], bits)
        codes.append(q)
        scales.append(s)
    return torch.cat(codes, dim=1), torch.stack(scales, dim=1)


def site_quantize_reference(
    xt: Tensor,
    act_clip: Tensor,
    l2: Tensor | None,
    l2_scale: Tensor | None,
    l4: Tensor | None,
    l4_scale: Tensor | None,
    sizes: Sequence[int],
    cws_ranks: Sequence[int],
    mac_ranks: Sequence[int],
    a_bits: Sequence[int],
    branch_bits: Sequence[int],
    mac_input: int,
) -> dict[str, Tensor | None]:
    """Stage 2: activation codes and scales, branch hidden codes (see the module doc).

    Returns ``qx``, ``sx``, ``hq``, ``sh``, ``uq``, ``su``, ``gq``, ``sg`` (absent branches:
    None) and ``xt`` (the transformed input, used by weight-only sites).
    """
    b = _bounds(sizes)
    km = b[3] - b[2]
    quant = int(a_bits[2]) < UNQUANTIZED
    out: dict[str, Tensor | None] = dict.fromkeys(("qx", "sx", "hq", "sh", "uq", "su", "gq", "sg"))
    out["xt"] = xt
    xm = xt[:, b[2] : b[3]]
    if quant:
        qs, ss = [], []
        for p in range(3):
            q, s = quantize_per_token(xt[:, b[p] : b[p + 1]], int(a_bits[p]), act_clip[p])
            qs.append(q)
            ss.append(s)
        out["qx"], out["sx"] = torch.cat(qs, dim=1), torch.stack(ss, dim=1)
        q_m, s_m = qs[2], ss[2]
        dq_m = q_m.float() * s_m[:, None]
    else:
        dq_m = xm
    if l2 is not None:
        assert l2_scale is not None
        l2_int = unpack_path_weight(l2, int(branch_bits[0]), km)
        if quant:
            h = imatmul(q_m, l2_int) * s_m[:, None] * l2_scale.float()[None, :]
        else:
            h = xm @ (l2_int.float() * l2_scale.float()[:, None]).T
        out["hq"], out["sh"] = _segment_quantize(h, cws_ranks, int(branch_bits[1]))
    if l4 is not None:
        assert l4_scale is not None
        u = xm - dq_m if int(mac_input) == 0 else dq_m
        uq, su = quantize_per_token(u, int(branch_bits[3]))
        l4_int = unpack_path_weight(l4, int(branch_bits[2]), km)
        g = imatmul(uq, l4_int) * su[:, None] * l4_scale.float()[None, :]
        out["uq"], out["su"] = uq, su
        out["gq"], out["sg"] = _segment_quantize(g, mac_ranks, int(branch_bits[3]))
    return out


def _up(
    y: Tensor,
    codes: Tensor,
    scales: Tensor,
    up: Tensor,
    up_scale: Tensor,
    bits: int,
    out_splits: Sequence[int],
    ranks: Sequence[int],
    rows: Tensor | None,
) -> Tensor:
    up_int = unpack_path_weight(up, bits, max(int(r) for r in ranks))
    o0 = 0
    for j, ((lo, hi), d_j) in enumerate(zip(_segments(ranks), out_splits)):
        o1 = o0 + int(d_j)
        r = hi - lo
        dy = imatmul(codes[:, lo:hi], up_int[o0:o1, :r]) * scales[:, j, None]
        dy = dy * up_scale[o0:o1].float()[None, :]
        if rows is not None:
            dy = torch.where(rows.reshape(-1, 1).bool(), dy, torch.zeros_like(dy))
        y[:, o0:o1] += dy
        o0 = o1
    return y


def site_gemm_reference(
    acts: dict[str, Tensor | None],
    w_v: Tensor,
    w_t: Tensor,
    w_m: Tensor,
    ws_v: Tensor,
    ws_t: Tensor,
    ws_m: Tensor,
    l1: Tensor | None,
    l1_scale: Tensor | None,
    l3: Tensor | None,
    l3_scale: Tensor | None,
    text_mask: Tensor | None,
    bias: Tensor | None,
    sizes: Sequence[int],
    out_splits: Sequence[int],
    cws_ranks: Sequence[int],
    mac_ranks: Sequence[int],
    a_bits: Sequence[int],
    w_bits: Sequence[int],
    branch_bits: Sequence[int],
    out_dtype: torch.dtype | None,
) -> Tensor:
    """Stage 3: the concatenated GEMM over the three paths, branch up-projections, bias."""
    b = _bounds(sizes)
    xt = acts["xt"]
    n = xt.shape[0]
    quant = int(a_bits[2]) < UNQUANTIZED
    y = torch.zeros(n, ws_m.numel(), dtype=torch.float32, device=xt.device)
    for p, (wp, wsp) in enumerate(((w_v, ws_v), (w_t, ws_t), (w_m, ws_m))):
        k = b[p + 1] - b[p]
        if k == 0:
            continue
        w_int = unpack_path_weight(wp, int(w_bits[p]), k)
        if quant:
            acc = imatmul(acts["qx"][:, b[p] : b[p + 1]], w_int)
            y = y + acc * acts["sx"][:, p, None] * wsp.float()[None, :]
        else:
            y = y + xt[:, b[p] : b[p + 1]] @ (w_int.float() * wsp.float()[:, None]).T
    if l1 is not None:
        y = _up(y, acts["hq"], acts["sh"], l1, l1_scale, int(branch_bits[0]), out_splits,
                cws_ranks, None)  # fmt: skip
    if l3 is not None:
        y = _up(y, acts["gq"], acts["sg"], l3, l3_scale, int(branch_bits[2]), out_splits,
                mac_ranks, text_mask)  # fmt: skip
    if bias is not None:
        y = y + bias.float()[None, :]
    return y.to(out_dtype if out_dtype is not None else xt.dtype)


def site_linear_reference(
    x: Tensor,
    perm: Tensor,
    smooth: Tensor,
    factors: Tensor,
    act_clip: Tensor,
    w_v: Tensor,
    w_t: Tensor,
    w_m: Tensor,
    ws_v: Tensor,
    ws_t: Tensor,
    ws_m: Tensor,
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
    factor_dims: Sequence[int],
    out_splits: Sequence[int],
    cws_ranks: Sequence[int],
    mac_ranks: Sequence[int],
    a_bits: Sequence[int],
    w_bits: Sequence[int],
    branch_bits: Sequence[int],
    mac_input: int,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """One site, all three stages: ``x`` (N, d) untransformed -> (N, D) outputs of its linears
    side by side (linear ``j`` in columns ``[sum(out_splits[:j]), sum(out_splits[:j+1]))``)."""
    xt = site_transform_reference(x, perm, smooth, factors, sizes, factor_dims)
    acts = site_quantize_reference(
        xt, act_clip, l2, l2_scale, l4, l4_scale, sizes, cws_ranks, mac_ranks, a_bits,
        branch_bits, mac_input,
    )  # fmt: skip
    return site_gemm_reference(
        acts, w_v, w_t, w_m, ws_v, ws_t, ws_m, l1, l1_scale, l3, l3_scale, text_mask, bias,
        sizes, out_splits, cws_ranks, mac_ranks, a_bits, w_bits, branch_bits,
        out_dtype if out_dtype is not None else x.dtype,
    )  # fmt: skip
