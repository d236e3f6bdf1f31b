"""Triton kernels of the SplitQ activation site (installed as ``splitq_modifier.kernels``).

``torch.ops.splitq.site_linear`` runs one site (one input shared by ``M`` linears) as two
launches:

* kernel A, :func:`site_quantize_triton` (``site_quant.py``): gather + smoothing + the
  Kronecker factors of every path (fp32 ``tl.dot``), per-token absmax and quantization of the
  three paths, the CWS and MAC down-projections and the per-linear-segment quantization of
  their hidden states;
* kernel B, :func:`site_gemm_triton` (``site_gemm.py``): one GEMM over the concatenated
  dense-packed 2/3/4/8-bit weights of the ``M`` linears (int8 ``tl.dot``, one int32
  accumulator per path), with per-token x per-channel scales, the CWS and text-masked MAC
  up-projections per linear segment, bias and output cast in the epilogue;
* :func:`site_linear_triton` - both, with the flat arguments of the op.

On CPU the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``, set before this
package is imported).
"""

from __future__ import annotations

import torch

from .site_gemm import site_gemm_config, site_gemm_kernel, site_gemm_triton
from .site_quant import (
    TRANSFORM_PRECISION,
    plan_stages,
    site_quant_config,
    site_quant_kernel,
    site_quantize_triton,
)

__all__ = [
    "TRANSFORM_PRECISION",
    "plan_stages",
    "site_gemm_config",
    "site_gemm_kernel",
    "site_gemm_triton",
    "site_linear_triton",
    "site_quant_config",
    "site_quant_kernel",
    "site_quantize_triton",
]

#: Activation bits meaning "not quantized" (weight-only sites go to the torch reference).
_UNQUANTIZED = 16


def site_linear_triton(
    x: torch.Tensor,
    perm: torch.Tensor,
    smooth: torch.Tensor,
    factors: torch.Tensor,
    act_clip: torch.Tensor,
    w_v: torch.Tensor,
    w_t: torch.Tensor,
    w_m: torch.Tensor,
    ws_v: torch.Tensor,
    ws_t: torch.Tensor,
    ws_m: torch.Tensor,
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
    factor_dims: list[int],
    out_splits: list[int],
    cws_ranks: list[int],
    mac_ranks: list[int],
    a_bits: list[int],
    w_bits: list[int],
    branch_bits: list[int],
    mac_input: int,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One SplitQ site with the Triton kernels: same arguments and result as
    ``splitq_modifier.runtime.reference.site_linear_reference`` (two launches, kernel A then
    kernel B; weight-only sites, ``a_bits`` 16, are handed to the reference)."""
    if int(a_bits[2]) >= _UNQUANTIZED:
        from splitq_modifier.runtime.reference import site_linear_reference

        return site_linear_reference(
            x, perm, smooth, factors, act_clip, w_v, w_t, w_m, ws_v, ws_t, ws_m, l2, l2_scale,
            l1, l1_scale, l4, l4_scale, l3, l3_scale, text_mask, bias, sizes, factor_dims,
            out_splits, cws_ranks, mac_ranks, a_bits, w_bits, branch_bits, mac_input, out_dtype,
        )  # fmt: skip
    acts = site_quantize_triton(
        x, perm, smooth, factors, act_clip, l2, l2_scale, l4, l4_scale, sizes, factor_dims,
        cws_ranks, mac_ranks, a_bits, branch_bits, mac_input,
    )  # fmt: skip
    return site_gemm_triton(
        acts, w_v, w_t, w_m, ws_v, ws_t, ws_m, l1, l1_scale, l3, l3_scale, text_mask, bias,
        sizes, out_splits, cws_ranks, mac_ranks, a_bits, w_bits, branch_bits,
        out_dtype if out_dtype is not None else x.dtype,
    )  # fmt: skip
