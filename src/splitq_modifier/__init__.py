"""SplitQ: modality-split low-bit post-training quantization of vision-language models.

``import splitq_modifier`` does two things:

- registers the ``splitq-packed`` compressed-tensors format and its loader, so
  ``AutoModelForImageTextToText.from_pretrained(dir)`` runs a saved SplitQ model through the
  ``splitq::site_linear`` op. This needs only torch, compressed-tensors and transformers: a
  serving process never imports llm-compressor or the calibration code;
- registers :class:`SplitQModifier` with llm-compressor's ``ModifierFactory`` so that YAML
  recipes can name it: at once if llm-compressor is already imported, otherwise as soon as it
  is (``from llmcompressor import oneshot`` after ``import splitq_modifier`` works too).
  ``splitq_modifier.SplitQModifier`` imports it on first use::

    import splitq_modifier  # noqa: F401
    from llmcompressor import oneshot

    oneshot(model=model, dataset=calib, recipe="recipes/splitq_w4a4.yaml")
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

from splitq_modifier import format as _format  # noqa: F401  (registers splitq-packed)

__all__ = ["SplitQModifier"]
__version__ = "0.2.0"


def _register_modifier() -> None:
    partial = sys.modules.get("splitq_modifier.modifier")
    if partial is not None and not hasattr(partial, "SplitQModifier"):
        # llm-compressor is being imported by splitq_modifier.modifier itself (e.g.
        # ``from splitq_modifier import SplitQModifier`` first): the class does not exist
        # yet, and the module registers it once it is defined
        return
    from llmcompressor.modifiers.factory import ModifierFactory

    from splitq_modifier.distributed import install_partition_fix
    from splitq_modifier.modifier import SplitQModifier

    ModifierFactory.register("SplitQModifier", SplitQModifier)
    install_partition_fix()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Registers the modifier right after ``llmcompressor`` finishes importing."""

    def find_spec(self, name, path=None, target=None):
        if name != "llmcompressor":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module) -> None:
            exec_module(module)
            _register_modifier()

        spec.loader.exec_module = exec_and_register
        return spec


if "llmcompressor" in sys.modules:
    _register_modifier()
elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())


def __getattr__(name: str):
    if name == "SplitQModifier":
        # llmcompressor first: importing it registers the modifier (importing
        # splitq_modifier.modifier while that registration runs would be circular)
        import llmcompressor  # noqa: F401

        from splitq_modifier.modifier import SplitQModifier

        return SplitQModifier
    raise AttributeError(f"module 'splitq_modifier' has no attribute {name!r}")
