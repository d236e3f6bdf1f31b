"""Make ``splitq-packed`` a compressed-tensors format (run once, at ``import splitq_modifier``).

compressed-tensors validates formats against the closed enum ``CompressionFormat`` (in
``QuantizationScheme.format``, ``compress_module``, ``infer_model_format`` ...), so the member is
added to that enum in place; the compressor is registered under the same name and put first in
the format-inference priority list (it only matches ``SplitQSiteLinear``).
"""

from __future__ import annotations

import enum

from compressed_tensors.compressors import format as ct_format
from compressed_tensors.config import CompressionFormat

from splitq_modifier.format.compressor import register_compressor
from splitq_modifier.format.spec import FORMAT_NAME

__all__ = ["MEMBER_NAME", "extend_compression_format", "register_format"]

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
    """Enum member, compressor and inference priority for ``splitq-packed`` (idempotent)."""
    member = extend_compression_format()
    register_compressor()
    if member not in ct_format.COMPRESSION_FORMAT_PRIORITY:
        ct_format.COMPRESSION_FORMAT_PRIORITY.insert(0, member)
