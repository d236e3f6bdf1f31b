"""Patches of compressed-tensors (listed, with why, in :mod:`splitq_modifier.integrations`)."""

from __future__ import annotations

import enum

from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors import format as ct_format
from compressed_tensors.config import CompressionFormat

from splitq_modifier.format.spec import FORMAT_NAME

__all__ = ["MEMBER_NAME", "extend_compression_format", "install_save_hook", "register_format"]

#: Attribute name of the new enum member: ``CompressionFormat.splitq_packed``.
MEMBER_NAME = "splitq_packed"


def extend_compression_format(name: str = MEMBER_NAME, value: str = FORMAT_NAME) -> enum.Enum:
    """Add ``name = value`` to ``CompressionFormat`` in place (idempotent); return the member."""
    if value in CompressionFormat._value2member_map_:
        return CompressionFormat(value)
    member = str.__new__(CompressionFormat, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = CompressionFormat
    member._sort_order_ = len(CompressionFormat._member_names_)
    add = getattr(CompressionFormat, "_add_member_", None)  # Python >= 3.13
    if add is not None:
        add(name, member)
    else:
        CompressionFormat._member_map_[name] = member
        CompressionFormat._member_names_.append(name)
        type.__setattr__(CompressionFormat, name, member)
    CompressionFormat._value2member_map_[value] = member
    return member


def register_format() -> None:
    """The enum member, the compressor (public ``BaseCompressor.register``) and first place in
    the format-inference priority list (the compressor matches only SplitQ linears)."""
    from splitq_modifier.format.compressor import register_compressor

    member = extend_compression_format()
    register_compressor()
    if member not in ct_format.COMPRESSION_FORMAT_PRIORITY:
        ct_format.COMPRESSION_FORMAT_PRIORITY.insert(0, member)


def install_save_hook() -> None:
    """Wrap ``ModelCompressor.from_pretrained_model`` to prepare SplitQ linears (idempotent).

    With SplitQ linears in the model, a ``quantization_format`` other than ``splitq-packed``
    (including ``save_compressed=False``, which asks for ``dense``) is refused: a SplitQ linear
    has no dense or pack-quantized form. ``splitq-packed`` given explicitly is not forced on
    the model's other quantized modules (they keep their own formats).
    """
    from splitq_modifier.format.save import SplitQModelCompressor, prepare_for_compressor

    original = ModelCompressor.__dict__["from_pretrained_model"].__func__
    if getattr(original, "_splitq_wrapped", False):
        return

    def from_pretrained_model(cls, model, quantization_format=None, *args, **kwargs):
        if not prepare_for_compressor(model, quantization_format):
            return original(cls, model, quantization_format, *args, **kwargs)
        return SplitQModelCompressor.finish(original(SplitQModelCompressor, model, None, *args,
                                                     **kwargs))  # fmt: skip

    from_pretrained_model._splitq_wrapped = True
    ModelCompressor.from_pretrained_model = classmethod(from_pretrained_model)
