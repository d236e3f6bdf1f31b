"""GPTQ rounding of SplitQ's transformed path weights (recipe field ``weight_rounding: gptq``).

Round-to-nearest rounds every weight independently. GPTQ rounds the columns of a weight one
by one and moves each column's rounding error onto the columns not yet rounded, weighted by
the inverse Hessian ``H = sum_n x_n x_n^T`` of the inputs the weight multiplies, so that the
*output* error ``||X W^T - X Q(W)^T||`` is what is minimised. After SplitQ's per-layer
training, each path ``p`` of a linear multiplies the quantized transformed activations
``Q(X_p P_p)``; its transformed weight (the CWS residual on the main path) is rounded with the
Hessian of exactly those activations, over the layer's cached calibration samples, on the
quantization grid the training learned (per-output-channel scale = learned clip x absmax /
qmax). The GPTQ update itself is llm-compressor's (``modifiers.gptq.gptq_quantize``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from splitq_modifier.distributed import all_reduce_sums, all_reduce_tensor
from splitq_modifier.quant import qmax

__all__ = ["HessianAccumulator", "collect_hessians", "gptq_round"]


class HessianAccumulator:
    """Running ``sum_n x_n x_n^T`` (fp32, on the activations' device) of one path's inputs."""

    def __init__(self) -> None:
        self.h: Tensor | None = None
        self.count = 0

    def add(self, x: Tensor) -> None:
        """Add the rows of ``x`` (..., k)."""
        if x.shape[-1] == 0:  # an empty path
            return
        x = x.detach().reshape(-1, x.shape[-1]).float()
        h = x.T @ x
        self.h = h if self.h is None else self.h + h
        self.count += x.shape[0]

    def normalized(self) -> Tensor | None:
        """``2 H / n``, GPTQ's normalisation (None when nothing was added)."""
        return None if self.h is None else self.h * (2.0 / max(self.count, 1))


def gptq_round(
    weight: Tensor,
    hessian: Tensor,
    bits: int,
    clip: Tensor,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """GPTQ-round ``weight`` (d_out, k) onto the symmetric per-channel grid of ``bits`` bits
    with scales ``clip * absmax / qmax``; returns (int8 codes, fp32 scales (d_out,)), the
    same form as round-to-nearest freezing gives."""
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    w = weight.detach().float()
    d_out, k = w.shape
    qm = qmax(bits)
    scale = (w.abs().amax(dim=1) * clip.reshape(-1).float()).clamp(min=1e-8) / qm
    if k == 0:
        return torch.zeros(d_out, 0, dtype=torch.int8, device=w.device), scale
    args = QuantizationArgs(num_bits=int(bits), type="int", symmetric=True, strategy="channel")
    zp = torch.zeros(1, d_out, 1, dtype=torch.int8, device=w.device)
    q, _, _ = quantize_weight(
        w.unsqueeze(0).clone(), hessian.float().unsqueeze(0).clone(), scale.view(1, d_out, 1),
        zp, None, args, blocksize=blocksize, percdamp=percdamp,
    )  # fmt: skip
    codes = torch.clamp(torch.round(q[0] / scale[:, None]), -qm - 1, qm).to(torch.int8)
    return codes, scale


@torch.no_grad()
def collect_hessians(
    layer: nn.Module,
    samples: Sequence,
    sites: Sequence[tuple[nn.Module, nn.Module]],
    set_mask: Callable[[Tensor | None], None],
) -> list[list[Tensor | None]]:
    """Per site, per path: the normalised Hessian ``2 H / n`` of the path's quantized
    transformed activations over the layer's samples (summed over data-parallel ranks).

    :param sites: ``(SplitSite, one of its SplitQLinears)`` per site: a pre-hook on the
        linear sees the site's input
    :param samples: the layer's cached :class:`~splitq_modifier.calibrate.LayerSample` s
    :param set_mask: sets the text mask of the sample being run
    """
    from splitq_modifier.split_linear import cached_weights

    accs = [[HessianAccumulator() for _ in range(3)] for _ in sites]
    handles = []
    for (site, linear), acc in zip(sites, accs):

        def hook(module, args, site=site, acc=acc):
            xq = site.quantize_act(site.split_act(args[0]))
            for p in range(3):
                acc[p].add(xq[p])

        handles.append(linear.register_forward_pre_hook(hook))
    device = next(layer.parameters(), torch.empty(0)).device
    try:
        with cached_weights():
            for s in samples:
                s = s.to(device)
                set_mask(s.text_mask)
                layer(*s.args, **s.kwargs)
    finally:
        for h in handles:
            h.remove()
    out = []
    for acc in accs:
        hs = []
        for a in acc:
            n = all_reduce_sums([float(a.count)])[0]
            hs.append(None if a.h is None else all_reduce_tensor(a.h) * (2.0 / max(n, 1.0)))
        out.append(hs)
    return out
