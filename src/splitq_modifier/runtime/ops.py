"""``torch.ops.splitq.site_linear``: one SplitQ activation site as one torch op.

:func:`site_linear` is the call the runtime modules and the vLLM layers make: the
*untransformed* activation ``x`` (..., d), the site's :class:`SiteParams`, an optional text
mask over the leading dims of ``x``; it returns the outputs of the site's linears side by
side (..., D). The params cross the op boundary as ``(list[Tensor], list[int])``
(:meth:`SiteParams.to_op`), so the op's schema is five arguments. Implementations:

- CPU (and any non-CUDA device): the torch reference (:mod:`.reference`), exact integer
  arithmetic;
- CUDA: the Triton kernels of ``splitq_modifier.kernels`` (kernel A: gather + smoothing +
  Kronecker transform + per-token quantization + branch down-projections; kernel B: one GEMM
  over the concatenated weights with the branch up-projections in its epilogue);
  ``SPLITQ_DISABLE_TRITON=1`` forces the reference;
- ``SPLITQ_TRITON_INTERPRET=1``: CPU tensors go through the same Triton kernels under
  Triton's interpreter, so the CUDA code path runs end to end without a GPU (slow; for
  tests). It sets ``TRITON_INTERPRET=1`` before the kernels are first imported.

Weight-only sites (activation bits 16) always use the reference. A fake implementation makes
the op traceable by ``torch.compile`` and ``torch.export``; nothing in the op syncs with the
host, so it can be captured in CUDA graphs.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from splitq_modifier.runtime.params import SiteParams
from splitq_modifier.runtime.reference import site_linear_reference

__all__ = ["site_linear", "site_linear_op", "triton_enabled"]


def triton_enabled(device: torch.device) -> bool:
    """Whether the op runs the Triton kernels for tensors on ``device``."""
    if device.type == "cuda":
        return os.environ.get("SPLITQ_DISABLE_TRITON", "0") != "1"
    return os.environ.get("SPLITQ_TRITON_INTERPRET", "0") == "1"


def _run_site(
    x: Tensor, p: SiteParams, text_mask: Tensor | None, out_dtype: torch.dtype | None
) -> Tensor:
    """Flatten the leading dims (inside the op: no extra graph nodes), run the kernels or the
    reference on (N, d), restore the leading dims."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    mask = None if text_mask is None else text_mask.reshape(-1)
    if p.quantized and triton_enabled(x.device):
        if os.environ.get("SPLITQ_TRITON_INTERPRET", "0") == "1":
            os.environ.setdefault("TRITON_INTERPRET", "1")
        from splitq_modifier.kernels import site_linear_triton  # lazy: triton only when used

        y = site_linear_triton(flat, p, mask, out_dtype)
    else:
        y = site_linear_reference(flat, p, mask, out_dtype)
    return y.reshape(*lead, y.shape[-1])


@torch.library.custom_op("splitq::site_linear", mutates_args=())
def site_linear_op(
    x: Tensor,
    tensors: list[Tensor],
    text_mask: Tensor | None,
    meta: list[int],
    out_dtype: torch.dtype | None,
) -> Tensor:
    """``torch.ops.splitq.site_linear(x, tensors, text_mask, meta, out_dtype)``; ``tensors``
    and ``meta`` are :meth:`SiteParams.to_op`'s. See :func:`site_linear`."""
    return _run_site(x, SiteParams.from_op(tensors, meta), text_mask, out_dtype)


@site_linear_op.register_fake
def _site_linear_fake(x, tensors, text_mask, meta, out_dtype):
    torch._check(x.dim() >= 1, lambda: "splitq::site_linear expects an input (..., d)")
    d_out = SiteParams.from_op(tensors, meta).d_out
    return x.new_empty((*x.shape[:-1], d_out), dtype=out_dtype or x.dtype)


def site_linear(
    x: Tensor,
    params: SiteParams,
    text_mask: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Run one site: ``x`` (..., d) untransformed -> (..., D), the site's linears side by side.

    ``text_mask`` (...) bool over the leading dims of ``x`` (True = text token) or None (every
    token is text, as at decode time); ``out_dtype`` None = ``x.dtype``.
    """
    tensors, meta = params.to_op()
    return torch.ops.splitq.site_linear(x, tensors, text_mask, meta, out_dtype)
