"""Dense fake-quant reference of a SplitQ site, written independently of the runtime's
integer reference: dequantized weights, fake-quantized activations, fp32 matmuls."""

from __future__ import annotations

import torch

from splitq_modifier.quant import fake_quant
from splitq_modifier.runtime import (
    SplitQSiteLinear,
    apply_kron,
    unpack_mma_weight,
    unpack_path_weight,
)


def _deq(packed: torch.Tensor, scale: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    return unpack_path_weight(packed, bits, k).float() * scale[:, None]


def _deq_path(packed: torch.Tensor, scale: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    return unpack_mma_weight(packed, bits, k).float() * scale[:, None]


def dense_site_forward(
    owner: SplitQSiteLinear, x: torch.Tensor, text_mask: torch.Tensor | None
) -> torch.Tensor:
    """All outputs (..., D) of ``owner``'s site for ``x`` (..., d)."""
    sizes, big_d = owner.sizes, sum(owner.out_splits)
    xs = x.float()[..., owner.perm.long()] * owner.smooth
    parts = list(xs.split(sizes, dim=-1))
    mats = owner.factor_mats()
    xt = [apply_kron(p, m) if p.shape[-1] else p for p, m in zip(parts, mats)]
    bits = [None if b is None else b for b in owner.a_bits]
    xq = [fake_quant(a, b, owner.act_clip[p]) for p, (a, b) in enumerate(zip(xt, bits))]
    y = torch.zeros(*x.shape[:-1], big_d)
    for p in range(3):
        if sizes[p]:
            w = _deq_path(
                getattr(owner, f"weight_packed_{p}"),
                getattr(owner, f"weight_scale_{p}"),
                owner.w_bits[p],
                sizes[p],
            )
            y = y + xq[p] @ w.T
    for name in ("cws", "mac"):
        br = getattr(owner, name)
        if br is None:
            continue
        down = _deq(br.down_packed, br.down_scale, br.bits, sizes[2])
        up = _deq(br.up_packed, br.up_scale, br.bits, max(br.ranks))
        if name == "cws":
            u = xq[2]
        else:
            u = fake_quant(xt[2] - xq[2] if br.input == "residual" else xq[2], br.bits)
        r0, o0 = 0, 0
        for r, d_j in zip(br.ranks, owner.out_splits):
            h = fake_quant(u @ down[r0 : r0 + r].T, br.bits)
            dy = h @ up[o0 : o0 + d_j, :r].T
            if name == "mac" and text_mask is not None:
                dy = dy * text_mask.unsqueeze(-1).float()
            y[..., o0 : o0 + d_j] += dy
            r0, o0 = r0 + r, o0 + d_j
    if owner.site_bias is not None:
        y = y + owner.site_bias
    return y.to(x.dtype)
