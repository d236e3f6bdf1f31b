"""Patches and private API of transformers (listed in :mod:`splitq_modifier.integrations`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from transformers.quantizers import auto as hf_auto

__all__ = ["install_loader", "key_maps"]


def install_loader() -> None:
    """Route transformers' ``compressed-tensors`` checkpoints through
    :class:`~splitq_modifier.format.load.SplitQCompressedTensorsHfQuantizer`, and their
    ``quantization_config`` through
    :class:`~splitq_modifier.format.guard.SplitQCompressedTensorsConfig` (idempotent). Both
    behave exactly like transformers' own classes for checkpoints without SplitQ groups."""
    from splitq_modifier.format.guard import SplitQCompressedTensorsConfig
    from splitq_modifier.format.load import SplitQCompressedTensorsHfQuantizer

    for mapping, cls in (
        (hf_auto.AUTO_QUANTIZER_MAPPING, SplitQCompressedTensorsHfQuantizer),
        (hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, SplitQCompressedTensorsConfig),
    ):
        current = mapping.get("compressed-tensors")
        if current is None or not issubclass(current, cls):
            mapping["compressed-tensors"] = cls


def key_maps(
    model: nn.Module, keys: Iterable[str] = (), hf_quantizer: Any = None
) -> tuple[Callable[[str], str], Callable[[str], str]]:
    """``(to_model, to_checkpoint)``: rename checkpoint keys to the model's parameter names as
    transformers does when it loads (e.g. Qwen2.5-VL stores ``model.layers.*`` for the module
    ``model.language_model.layers.*``), and model names back as it does when it saves.

    Reads transformers' private ``core_model_loading`` (no public API exposes the renaming);
    on a transformers where it has moved, the names pass unchanged (the checks that use them
    then report keys in the model's own naming).
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )

        mapping = get_model_conversion_mapping(model, None, hf_quantizer)
        meta = model.state_dict()
        prefix = getattr(model, "base_model_prefix", None)

        def split(ts):
            return (
                [t for t in ts if isinstance(t, WeightRenaming)],
                [t for t in ts if isinstance(t, WeightConverter)],
            )

        fwd = split(mapping)
        rev = split([t.reverse_transform() for t in reversed(mapping)])

        def to_model(key: str) -> str:
            renamed, _ = rename_source_key(key, *fwd, prefix, meta)
            return key if renamed not in meta and key in meta else renamed

        def to_checkpoint(key: str) -> str:
            return rename_source_key(key, *rev, reverse=True)[0]

        for key in list(keys)[:1]:
            to_model(key)
        return to_model, to_checkpoint
    except (ImportError, TypeError, AttributeError, ValueError, KeyError):  # other versions
        return (lambda k: k), (lambda k: k)
