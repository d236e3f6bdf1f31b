"""Torch reference of one SplitQ activation site: the contract the Triton kernels implement.

Three stages, each a function of the input and the site's :class:`SiteParams` ``p``:

1. :func:`site_transform_reference`: ``x`` (N, d), any float dtype, original channel order
   -> gather ``x[:, perm]``, multiply by ``smooth`` (path order), per path multiply by its
   Kronecker factors (``x_p @ (M_1 kron M_2 [kron M_3])``, :func:`apply_kron`) -> ``xt``
   (N, d) fp32 in path order ``[vision | text | main]``.
2. :func:`site_quantize_reference`: per token and path,
   ``s_p = max(absmax(xt_p) * act_clip[p], 1e-8) / qmax(a_bits[p])``, codes ``qx`` (N, d) int8
   and scales ``sx`` (N, 3), and each path's per-token code sums ``qsum`` (N, 3) int32 (a GEMM
   over offset-coded weights ``u = q + 2^(b-1)`` subtracts ``2^(b-1) * qsum`` in its epilogue).
   Branch down-projections, for the ``M`` linears at once (their
   ranks concatenated in ``L2`` = ``p.cws.down`` (R1, km) and ``L4`` = ``p.mac.down``):

   * CWS: ``h = (qx_m @ L2^T) * s_m * l2_scale`` (N, R1), quantized per token *per linear
     segment* of ranks (no clip) -> ``hq`` (N, R1), ``sh`` (N, M);
   * MAC: ``u = xt_m - qx_m * s_m`` (``mac_input == 0``) or ``qx_m * s_m`` (1), quantized per
     token -> ``uq`` (N, km), ``su`` (N,); ``g = (uq @ L4^T) * su * l4_scale``, quantized per
     token per segment -> ``gq`` (N, R2), ``sg`` (N, M).
3. :func:`site_gemm_reference`: ``y[n, o] = sum_p sx[n, p] ws_p[o] sum_k qx_p[n, k] W_p[o, k]``
   over the concatenated packed weights (MMA block packing, ``quant.pack_mma_weight``); for
   the rows ``o`` of linear ``j``, CWS adds ``(hq_j @ L1[o, :r_j]^T) * sh[:, j] * l1_scale[o]``
   (``L1`` = ``p.cws.up``) and MAC adds the same from ``gq_j`` / ``L3`` = ``p.mac.up`` on
   text rows only (``text_mask`` None = all text); then ``+ bias``, output in ``out_dtype``.

Weight-only sites (``a_bits`` all 16) skip activation quantization: ``y = xt @ W_deq^T`` in
fp32, the branches read ``xt_m`` (their rank-r hidden states are still quantized).
Integer matmuls are exact (:func:`imatmul`); everything else is fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from splitq_modifier.runtime.params import SiteBranchParams, SiteParams
from splitq_modifier.runtime.quant import (
    apply_kron,
    imatmul,
    quantize_per_token,
    unpack_mma_weight,
    unpack_path_weight,
)

__all__ = [
    "site_gemm_reference",
    "site_linear_reference",
    "site_quantize_reference",
    "site_transform_reference",
]

Acts = dict[str, Tensor | None]


def _segments(ranks: Sequence[int]) -> list[tuple[int, int]]:
    out, off = [], 0
    for r in ranks:
        out.append((off, off + int(r)))
        off += int(r)
    return out


def site_transform_reference(x: Tensor, p: SiteParams) -> Tensor:
    """Stage 1: gather, smooth and transform each path; (N, d) fp32 in path order."""
    xs = x.float()[:, p.perm.long()] * p.smooth.float()
    parts = xs.split([int(k) for k in p.sizes], dim=1)
    mats = p.factor_mats()
    return torch.cat(
        [apply_kron(t, [m.float() for m in f]) if t.shape[1] else t for t, f in zip(parts, mats)],
        dim=1,
    )


def _segment_quantize(v: Tensor, ranks: Sequence[int], bits: int) -> tuple[Tensor, Tensor]:
    codes, scales = [], []
    for lo, hi in _segments(ranks):
        q, s = quantize_per_token(v[:, lo:hi], bits)
        codes.append(q)
        scales.append(s)
    return torch.cat(codes, dim=1), torch.stack(scales, dim=1)


def _down(br: SiteBranchParams, km: int) -> tuple[Tensor, Tensor]:
    return unpack_path_weight(br.down, br.w_bits, km), br.down_scale.float()


def site_quantize_reference(xt: Tensor, p: SiteParams) -> Acts:
    """Stage 2: activation codes and scales, branch hidden codes (see the module doc).

    Returns ``qx``, ``sx``, ``qsum``, ``hq``, ``sh``, ``uq``, ``su``, ``gq``, ``sg`` (absent
    branches: None) and ``xt`` (the transformed input, used by weight-only sites).
    """
    b = p.bounds
    km = b[3] - b[2]
    out: Acts = dict.fromkeys(("qx", "sx", "qsum", "hq", "sh", "uq", "su", "gq", "sg"))
    out["xt"] = xt
    xm = xt[:, b[2] : b[3]]
    if p.quantized:
        qs, ss = [], []
        for i in range(3):
            q, s = quantize_per_token(xt[:, b[i] : b[i + 1]], int(p.a_bits[i]), p.act_clip[i])
            qs.append(q)
            ss.append(s)
        out["qx"], out["sx"] = torch.cat(qs, dim=1), torch.stack(ss, dim=1)
        out["qsum"] = torch.stack([q.sum(dim=1, dtype=torch.int32) for q in qs], dim=1)
        q_m, s_m = qs[2], ss[2]
        dq_m = q_m.float() * s_m[:, None]
    else:
        dq_m = xm
    if p.cws is not None:
        l2, l2_scale = _down(p.cws, km)
        if p.quantized:
            h = imatmul(q_m, l2) * s_m[:, None] * l2_scale[None, :]
        else:
            h = xm @ (l2.float() * l2_scale[:, None]).T
        out["hq"], out["sh"] = _segment_quantize(h, p.cws.ranks, p.cws.act_bits)
    if p.mac is not None:
        u = xm - dq_m if int(p.mac_input) == 0 else dq_m
        uq, su = quantize_per_token(u, p.mac.act_bits)
        l4, l4_scale = _down(p.mac, km)
        g = imatmul(uq, l4) * su[:, None] * l4_scale[None, :]
        out["uq"], out["su"] = uq, su
        out["gq"], out["sg"] = _segment_quantize(g, p.mac.ranks, p.mac.act_bits)
    return out


def _up(
    y: Tensor,
    codes: Tensor,
    scales: Tensor,
    br: SiteBranchParams,
    out_splits: Sequence[int],
    rows: Tensor | None,
) -> Tensor:
    up = unpack_path_weight(br.up, br.w_bits, max(br.ranks))
    o0 = 0
    for j, ((lo, hi), d_j) in enumerate(zip(_segments(br.ranks), out_splits)):
        o1 = o0 + int(d_j)
        dy = imatmul(codes[:, lo:hi], up[o0:o1, : hi - lo]) * scales[:, j, None]
        dy = dy * br.up_scale[o0:o1].float()[None, :]
        if rows is not None:
            dy = torch.where(rows.reshape(-1, 1).bool(), dy, torch.zeros_like(dy))
        y[:, o0:o1] += dy
        o0 = o1
    return y


def site_gemm_reference(
    acts: Acts, p: SiteParams, text_mask: Tensor | None, out_dtype: torch.dtype | None
) -> Tensor:
    """Stage 3: the concatenated GEMM over the three paths, branch up-projections, bias.

    ``acts`` needs ``qx`` and ``sx`` (``xt`` for weight-only sites); ``out_dtype`` None =
    fp32."""
    b = p.bounds
    xt = acts["xt"] if not p.quantized else acts["qx"]
    y = torch.zeros(xt.shape[0], p.d_out, dtype=torch.float32, device=xt.device)
    for i in range(3):
        k = b[i + 1] - b[i]
        if k == 0:
            continue
        w = unpack_mma_weight(p.w_packed[i], int(p.w_bits[i]), k)
        ws = p.w_scale[i].float()
        if p.quantized:
            acc = imatmul(acts["qx"][:, b[i] : b[i + 1]], w)
            y = y + acc * acts["sx"][:, i, None] * ws[None, :]
        else:
            y = y + xt[:, b[i] : b[i + 1]] @ (w.float() * ws[:, None]).T
    if p.cws is not None:
        y = _up(y, acts["hq"], acts["sh"], p.cws, p.out_splits, None)
    if p.mac is not None:
        y = _up(y, acts["gq"], acts["sg"], p.mac, p.out_splits, text_mask)
    if p.bias is not None:
        y = y + p.bias.float()[None, :]
    return y if out_dtype is None else y.to(out_dtype)


def site_linear_reference(
    x: Tensor,
    p: SiteParams,
    text_mask: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """One site, all three stages: ``x`` (N, d) untransformed -> (N, D) outputs of its linears
    side by side (linear ``j`` in columns ``[sum(out_splits[:j]), sum(out_splits[:j+1]))``);
    ``out_dtype`` None = ``x.dtype``."""
    acts = site_quantize_reference(site_transform_reference(x, p), p)
    return site_gemm_reference(acts, p, text_mask, out_dtype if out_dtype is not None else x.dtype)
