"""The ``splitq-packed`` compressed-tensors format: save, reload and run from packed weights.

Importing this subpackage (``import splitq_modifier`` does) registers everything:

- ``CompressionFormat.splitq_packed`` (compressed-tensors' closed format enum, extended in
  place) and :class:`SplitQPackedCompressor` under the name ``splitq-packed``
  (:mod:`.registry`, :mod:`.compressor`);
- a wrapper of ``ModelCompressor.from_pretrained_model`` that attaches the SplitQ schemes
  before llm-compressor's ``save_pretrained(dir, save_compressed=True)`` compresses the model
  (:mod:`.save`);
- :class:`SplitQCompressedTensorsHfQuantizer` as transformers' ``compressed-tensors``
  quantizer, which turns loaded SplitQ linears into :class:`SplitQSiteLinear` modules
  (:mod:`.load`), and :class:`SplitQCompressedTensorsConfig` as its quantization config,
  which reads the guarded ``config.json`` form (:mod:`.guard`: without the package, loading
  stops with one short validation error naming the format and the fix).

See ``docs/format.md``.
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
    install_loader,
)
from splitq_modifier.format.registry import register_format
from splitq_modifier.format.save import install_save_hook, prepare_model_for_save
from splitq_modifier.format.spec import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SUPPORTED_VERSIONS,
    BranchSpec,
    LinearSpec,
    SplitQFormatError,
)

register_format()
install_save_hook()
install_loader()

__all__ = [
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
