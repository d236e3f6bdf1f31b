"""Triton kernels of the SplitQ linear (installed as ``splitq_modifier.kernels``).

* :func:`quantize_activations` - per-token quantization of the three paths, fused with the CWS
  and MAC down-projections and the quantization of their rank-r hidden states;
* :func:`splitq_gemm` - GEMM over dense-packed 2/3/4/8-bit weights (unpacked to int8 in-kernel,
  int8 ``tl.dot``, one int32 accumulator per path), with the CWS and text-masked MAC
  up-projections, bias and output cast in the epilogue;
* :func:`splitq_linear_triton` - both, with the flat arguments of ``torch.ops.splitq.linear``.

On CPU the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``, set before this
package is imported).
"""

from __future__ import annotations

import torch

from .gemm import gemm_config, splitq_gemm, splitq_gemm_kernel
from .quant import act_quant_config, act_quant_kernel, quantize_activations

__all__ = [
    "act_quant_config",
    "act_quant_kernel",
    "gemm_config",
    "quantize_activations",
    "splitq_gemm",
    "splitq_gemm_kernel",
    "splitq_linear_triton",
]


def splitq_linear_triton(
    x: torch.Tensor,
    w_v: torch.Tensor,
    w_t: torch.Tensor,
    w_m: torch.Tensor,
    ws_v: torch.Tensor,
    ws_t: torch.Tensor,
    ws_m: torch.Tensor,
    act_clip: torch.Tensor,
    l2: torch.Tensor | None,
    l2_scale: torch.Tensor | None,
    l1: torch.Tensor | None,
    l1_scale: torch.Tensor | None,
    l4: torch.Tensor | None,
    l4_scale: torch.Tensor | None,
    l3: torch.Tensor | None,
    l3_scale: torch.Tensor | None,
    text_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    sizes: list[int],
    a_bits: list[int],
    w_bits: list[int],
    branch_bits: list[int],
    mac_input: int,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One SplitQ linear with the Triton kernels (same arguments as the torch reference
    ``splitq_modifier.runtime.ops.splitq_linear_reference``)."""
    acts = quantize_activations(
        x, act_clip, sizes, a_bits, l2, l2_scale, l4, l4_scale, branch_bits, mac_input
    )
    return splitq_gemm(
        acts["qx"], acts["sx"], (w_v, w_t, w_m), (ws_v, ws_t, ws_m), sizes, w_bits,
        hq=acts["hq"], sh=acts["sh"], l1=l1, l1_scale=l1_scale,
        gq=acts["gq"], sg=acts["sg"], l3=l3, l3_scale=l3_scale,
        text_mask=text_mask, bias=bias, branch_bits=branch_bits,
        out_dtype=out_dtype if out_dtype is not None else x.dtype,
    )  # fmt: skip
