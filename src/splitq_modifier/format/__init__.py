"""The ``splitq-packed`` compressed-tensors format: save, reload and run from packed weights.

- :mod:`.spec`: what the format records about a SplitQ linear, and the tensors it stores;
- :mod:`.compressor`: :class:`SplitQPackedCompressor`, registered under ``splitq-packed``;
- :mod:`.save`: schemes attached to the SplitQ linears before llm-compressor's
  ``save_pretrained(dir, save_compressed=True)`` compresses the model;
- :mod:`.load`: :class:`SplitQCompressedTensorsHfQuantizer`, which turns loaded SplitQ
  linears into :class:`~splitq_modifier.runtime.SplitQSiteLinear` modules;
- :mod:`.guard`: the ``config.json`` form that stops stock loaders with one line;
- :mod:`.validate`: checks of a checkpoint, each naming the file, module and tensor.

``import splitq_modifier`` registers it all with compressed-tensors and transformers
(:mod:`splitq_modifier.integrations`). See ``docs/format.md``.
"""

from splitq_modifier.format.compressor import SplitQPackedCompressor
from splitq_modifier.format.guard import (
    GUARD_MESSAGE,
    VLLM_GUARD_MESSAGE,
    SplitQCompressedTensorsConfig,
    decode_quantization_config,
    encode_quantization_config,
)
from splitq_modifier.format.load import (
    SplitQCompressedTensorsHfQuantizer,
    check_checkpoint,
    convert_loaded_model,
)
from splitq_modifier.format.save import prepare_model_for_save
from splitq_modifier.format.spec import (
    CONVERTED_VERSIONS,
    FORMAT_NAME,
    FORMAT_VERSION,
    SUPPORTED_VERSIONS,
    BranchSpec,
    LinearSpec,
    SplitQFormatError,
)

__all__ = [
    "CONVERTED_VERSIONS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GUARD_MESSAGE",
    "SUPPORTED_VERSIONS",
    "VLLM_GUARD_MESSAGE",
    "BranchSpec",
    "LinearSpec",
    "SplitQCompressedTensorsConfig",
    "SplitQCompressedTensorsHfQuantizer",
    "SplitQFormatError",
    "SplitQPackedCompressor",
    "check_checkpoint",
    "convert_loaded_model",
    "decode_quantization_config",
    "encode_quantization_config",
    "prepare_model_for_save",
]
