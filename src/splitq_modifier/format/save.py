"""Saving: attach ``splitq-packed`` schemes to the SplitQ linears of a model.

llm-compressor's ``model.save_pretrained(dir, save_compressed=True)`` (installed on the model by
``oneshot``) builds a compressed-tensors ``ModelCompressor`` from the model: it collects each
module's ``quantization_scheme`` into config groups, infers each module's format, compresses
each module's state dict with that format's compressor, saves, and writes
``quantization_config`` into ``config.json``. ``SplitQModifier`` leaves
:class:`~splitq_modifier.runtime.SplitQSiteLinear` modules without schemes (a scheme needs the
module's name, for its ``targets``), so :func:`prepare_model_for_save` runs first
(``import splitq_modifier`` wraps ``ModelCompressor.from_pretrained_model`` to call it:
:mod:`splitq_modifier.integrations`). It
groups the linears by :class:`LinearSpec` (a site's owner, e.g. ``q_proj``, stores the site's
tensors; ``k_proj`` and ``v_proj`` record their index in it) and gives each group one scheme
whose targets are ``re:`` patterns of the module names with layer indices generalised (checked
to match exactly that group), or the exact names where no pattern does. The compressor it
returns (:class:`SplitQModelCompressor`) writes ``config.json`` in the guarded form of
:mod:`splitq_modifier.format.guard`.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import QuantizationStatus
from torch import nn

from splitq_modifier.format.guard import encode_quantization_config
from splitq_modifier.format.spec import FORMAT_NAME, LinearSpec, SplitQFormatError, is_splitq_scheme
from splitq_modifier.runtime.modules import SplitQSiteLinear

__all__ = [
    "SplitQModelCompressor",
    "splitq_linears",
    "prepare_model_for_save",
    "group_name_hint",
    "prepare_for_compressor",
]

#: Config group names of SplitQ schemes carry this hint: transformers' config validation error
#: (raised when the package is not imported) quotes the group name.
GROUP_HINT = "requires `import splitq_modifier` before loading"


def group_name_hint(index: int) -> str:
    """Name of the ``index``-th splitq-packed config group."""
    return f"splitq-packed_{index} ({GROUP_HINT})"


def splitq_linears(model: nn.Module) -> list[tuple[str, SplitQSiteLinear]]:
    """``(name, module)`` of every :class:`SplitQSiteLinear` in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SplitQSiteLinear)]


def _pattern(name: str) -> str:
    parts = name.split(".")
    return "^" + r"\.".join(r"\d+" if p.isdigit() else re.escape(p) for p in parts) + "$"


def _targets(names: list[str], all_names: list[str]) -> list[str]:
    patterns = sorted({_pattern(n) for n in names})
    regexes = [re.compile(p) for p in patterns]
    matched = {n for n in all_names if any(r.match(n) for r in regexes)}
    if matched == set(names):
        return ["re:" + p for p in patterns]
    return sorted(names)


def prepare_model_for_save(model: nn.Module) -> int:
    """Attach a ``splitq-packed`` scheme to every SplitQ linear.

    Called automatically by ``ModelCompressor.from_pretrained_model`` once the package is
    imported; idempotent. Returns the number of SplitQ linears.
    """
    linears = splitq_linears(model)
    groups: dict[LinearSpec, list[str]] = defaultdict(list)
    modules = dict(linears)
    for name, module in linears:
        groups[LinearSpec.from_module(module)].append(name)
    all_names = [n for n, _ in model.named_modules()]
    for spec, names in groups.items():
        scheme = spec.scheme(_targets(names, all_names))
        for n in names:
            m = modules[n]
            m.quantization_scheme = scheme
            # already in their stored form: compress_model(skip_compressed=True) leaves them
            # alone (under torch.distributed it would otherwise re-create their tensors as
            # parameters through a broadcast from whichever rank it assigns them to)
            m.quantization_status = QuantizationStatus.COMPRESSED
    return len(linears)


def _rename_groups(compressor: ModelCompressor) -> None:
    qc = compressor.quantization_config
    if qc is None:
        return
    renamed, i = {}, 0
    for name, scheme in qc.config_groups.items():
        if is_splitq_scheme(scheme):
            renamed[group_name_hint(i)] = scheme
            i += 1
        else:
            renamed[name] = scheme
    qc.config_groups = renamed


class SplitQModelCompressor(ModelCompressor):
    """The ``ModelCompressor`` of a model with SplitQ linears: writes ``config.json``'s
    ``quantization_config`` in the guarded file form (:mod:`splitq_modifier.format.guard`)."""

    @staticmethod
    def finish(compressor: ModelCompressor) -> ModelCompressor:
        """Name the SplitQ config groups with the loading hint; returns ``compressor``."""
        _rename_groups(compressor)
        return compressor

    def update_config(self, save_directory: str) -> None:
        """compressed-tensors' ``update_config``, then the SplitQ groups encoded."""
        super().update_config(save_directory)
        path = os.path.join(save_directory, "config.json")
        if not os.path.exists(path):
            return
        with open(path) as f:
            data = json.load(f)
        if "quantization_config" not in data:
            return
        data["quantization_config"] = encode_quantization_config(data["quantization_config"])
        with open(path, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)


def prepare_for_compressor(model: nn.Module, quantization_format=None) -> bool:
    """Before ``ModelCompressor.from_pretrained_model``: whether ``model`` has SplitQ linears
    (then their schemes are attached). With SplitQ linears, a ``quantization_format`` other
    than ``splitq-packed`` (including ``save_compressed=False``, which asks for ``dense``) is
    refused: a SplitQ linear has no dense or pack-quantized form. ``splitq-packed`` given
    explicitly is not forced on the model's other quantized modules."""
    if not splitq_linears(model):
        return False
    fmt = getattr(quantization_format, "value", quantization_format)
    if fmt not in (None, FORMAT_NAME):
        raise SplitQFormatError(
            f"cannot save SplitQ linears as {fmt!r}: they are stored only in the "
            f"{FORMAT_NAME!r} format (their weights exist only as packed integers with "
            "online transforms). Save with save_compressed=True and no quantization_format."
        )
    prepare_model_for_save(model)
    return True
