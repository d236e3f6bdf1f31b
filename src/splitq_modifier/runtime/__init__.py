"""SplitQ runtime: the ``splitq::linear`` torch op, its torch reference and packing helpers."""

from splitq_modifier.runtime.ops import (
    EPS,
    SplitQBranch,
    SplitQLinearParams,
    build_splitq_params,
    pack_path_weight,
    packed_words,
    qmax_of,
    quantize_per_token,
    quantize_weight_per_channel,
    random_splitq_params,
    splitq_linear,
    splitq_linear_op,
    splitq_linear_reference,
    splitq_quantize_activations_reference,
    unpack_path_weight,
)

__all__ = [
    "EPS",
    "SplitQBranch",
    "SplitQLinearParams",
    "build_splitq_params",
    "pack_path_weight",
    "packed_words",
    "qmax_of",
    "quantize_per_token",
    "quantize_weight_per_channel",
    "random_splitq_params",
    "splitq_linear",
    "splitq_linear_op",
    "splitq_linear_reference",
    "splitq_quantize_activations_reference",
    "unpack_path_weight",
]
