"""Does the installed runtime read the format's packed codes? (no vLLM needed)

The ``splitq-packed`` format packs ``b``-bit codes as a dense little-endian bit stream
(``docs/format.md``). The runtime unpacks them with compressed-tensors' helpers, so what it
reads depends on the compressed-tensors release installed beside vLLM: 0.17 (pinned by vLLM
0.25-0.34) packs 3-bit values 10 per int32 word, so it misreads the format's 3-bit codes.
:func:`check_unpacking` catches that when vLLM parses the checkpoint's config, before any
weight is loaded, instead of a shape error (or wrong outputs) at the first forward.
"""

from __future__ import annotations

import torch

from splitq_modifier.format.spec import SplitQFormatError
from splitq_modifier.runtime import unpack_path_weight

__all__ = ["check_unpacking", "format_words"]


def format_words(codes: list[int], bits: int) -> list[int]:
    """Signed ``bits``-bit codes packed as the format defines them (``docs/format.md``):
    value ``k`` of a row, offset by ``2^(bits-1)``, in bits ``[k bits, (k+1) bits)`` of the
    row's little-endian bit stream, cut into int32 words."""
    acc = 0
    for k, c in enumerate(codes):
        acc |= (int(c) + (1 << (bits - 1))) << (k * bits)
    words = [(acc >> (32 * i)) & 0xFFFFFFFF for i in range(-(-len(codes) * bits // 32))]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


def check_unpacking(bits: set[int]) -> None:
    """Check that the runtime's unpacking (which takes compressed-tensors' helpers, so
    depends on the installed release) reads the format's packing at every bit width the
    checkpoint uses; raise :class:`SplitQFormatError` naming the width otherwise.

    compressed-tensors 0.17 (the release vLLM 0.25-0.34 pins) stores 10 three-bit values per
    word instead of a dense bit stream, so it misreads 3-bit weights (2-, 4- and 8-bit
    widths divide 32 and read the same)."""
    for b in sorted(bits):
        k = 96
        codes = [(7 * i + 3) % (1 << b) - (1 << (b - 1)) for i in range(k)]
        words = torch.tensor([format_words(codes, b)], dtype=torch.int32)
        try:
            ok = unpack_path_weight(words, b, k).flatten().tolist() == codes
        except (RuntimeError, ValueError, IndexError):
            ok = False
        if not ok:
            import compressed_tensors

            raise SplitQFormatError(
                f"this splitq-packed checkpoint has {b}-bit codes, but with "
                f"compressed-tensors {compressed_tensors.__version__} installed (the release "
                f"this vLLM pins) the SplitQ runtime unpacks {b}-bit values differently from "
                "the format's dense bit stream, so the model would run on wrong weights. "
                "Checkpoints with 2-, 4- and 8-bit codes only are unaffected."
            )
