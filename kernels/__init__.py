"""Triton kernels of the SplitQ activation site (installed as ``splitq_modifier.kernels``).

``torch.ops.splitq.site_linear`` runs one site (one input shared by ``M`` linears) as two
launches:

* kernel A, :func:`site_quantize_triton` (``site_quant.py``): gather + smoothing + the
  Kronecker factors of every path (fp16 operands on the main path at <= 4 bits, fp32
  elsewhere), per-token absmax and quantization of the three paths with exact code sums, the
  CWS and MAC down-projections and the per-linear-segment quantization of their hidden states
  (one launch at prefill; at decode a second, split-K launch for the down-projections);
* kernel B, :func:`site_gemm_triton` (``site_gemm.py``): one GEMM over the concatenated
  dense-packed 2/3/4/8-bit weights of the ``M`` linears (int8 ``tl.dot``, one int32
  accumulator per path), with per-token x per-channel scales, the CWS and text-masked MAC
  up-projections per linear segment, bias and output cast in the epilogue;
* :func:`site_linear_triton` - both, for one site's
  :class:`~splitq_modifier.runtime.SiteParams`.

On CPU the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``, set before this
package is imported).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .site_gemm import site_gemm_config, site_gemm_kernel, site_gemm_triton
from .site_quant import (
    TRANSFORM_PRECISION,
    plan_paths,
    site_branch_kernel,
    site_quant_config,
    site_quant_kernel,
    site_quantize_triton,
)

if TYPE_CHECKING:
    from splitq_modifier.runtime.params import SiteParams

__all__ = [
    "TRANSFORM_PRECISION",
    "plan_paths",
    "site_branch_kernel",
    "site_gemm_config",
    "site_gemm_kernel",
    "site_gemm_triton",
    "site_linear_triton",
    "site_quant_config",
    "site_quant_kernel",
    "site_quantize_triton",
]


def site_linear_triton(
    x: torch.Tensor,
    p: SiteParams,
    text_mask: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One SplitQ site with the Triton kernels: same arguments and result as
    ``splitq_modifier.runtime.reference.site_linear_reference`` (two launches, kernel A then
    kernel B; weight-only sites are handed to the reference)."""
    if not p.quantized:
        from splitq_modifier.runtime.reference import site_linear_reference

        return site_linear_reference(x, p, text_mask, out_dtype)
    acts = site_quantize_triton(x, p)
    return site_gemm_triton(acts, p, text_mask, out_dtype if out_dtype is not None else x.dtype)
