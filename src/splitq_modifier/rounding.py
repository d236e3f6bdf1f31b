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

import torch
from torch import Tensor

from splitq_modifier.quant import qmax

__all__ = ["HessianAccumulator", "gptq_round"]


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
