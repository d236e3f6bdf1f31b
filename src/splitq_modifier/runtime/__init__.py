"""SplitQ runtime: everything a serving process needs to run a saved SplitQ model.

``import splitq_modifier.runtime`` registers the ``splitq::site_linear`` torch op and, with
:mod:`splitq_modifier.format`, is all that loading a ``splitq-packed`` checkpoint needs:
llm-compressor, compressed-tensors and the calibration code are not imported (``import
splitq_modifier`` imports them too, and registers the modifier).

- :mod:`.params`: :class:`SiteParams`, the one object describing a site;
- :mod:`.quant`: integer quantization and the format's bit packing;
- :mod:`.reference`: the torch reference of the op (the kernels' contract);
- :mod:`.ops`: the op and :func:`site_linear`;
- :mod:`.modules`: :class:`SplitQSiteLinear` and the text-mask context.
"""

from splitq_modifier.runtime.modules import (
    ModalityContext,
    SiteBranch,
    SplitQSiteLinear,
    attach_modality_context,
    site_members,
)
from splitq_modifier.runtime.ops import site_linear, site_linear_op, triton_enabled
from splitq_modifier.runtime.params import (
    UNQUANTIZED,
    SiteBranchParams,
    SiteParams,
    build_site_params,
    flatten_factor_dims,
    split_factors,
)
from splitq_modifier.runtime.quant import (
    EPS,
    MMA_BLOCK,
    apply_kron,
    dense_to_mma,
    imatmul,
    mma_weight_words,
    pack_mma_weight,
    pack_path_weight,
    packed_words,
    qmax_of,
    quantize_per_token,
    quantize_weight_per_channel,
    unpack_mma_weight,
    unpack_path_weight,
)
from splitq_modifier.runtime.reference import (
    site_gemm_reference,
    site_linear_reference,
    site_quantize_reference,
    site_transform_reference,
)

__all__ = [
    "EPS",
    "MMA_BLOCK",
    "UNQUANTIZED",
    "ModalityContext",
    "SiteBranch",
    "SiteBranchParams",
    "SiteParams",
    "SplitQSiteLinear",
    "apply_kron",
    "attach_modality_context",
    "build_site_params",
    "dense_to_mma",
    "flatten_factor_dims",
    "imatmul",
    "mma_weight_words",
    "pack_mma_weight",
    "pack_path_weight",
    "packed_words",
    "qmax_of",
    "quantize_per_token",
    "quantize_weight_per_channel",
    "site_gemm_reference",
    "site_linear",
    "site_linear_op",
    "site_linear_reference",
    "site_members",
    "site_quantize_reference",
    "site_transform_reference",
    "split_factors",
    "triton_enabled",
    "unpack_mma_weight",
    "unpack_path_weight",
]
