"""SplitQ: modality-split low-bit post-training quantization of vision-language models.

``import splitq_modifier`` does two things (:mod:`splitq_modifier.integrations` lists every
change it makes to other libraries, each checked against the versions it was written for):

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

from splitq_modifier.integrations import install as _install

__all__ = ["SplitQModifier", "__version__"]
__version__ = "0.3.0"

_install()


def __getattr__(name: str):
    if name == "SplitQModifier":
        # llmcompressor first: importing it registers the modifier (importing
        # splitq_modifier.modifier while that registration runs would be circular)
        import llmcompressor  # noqa: F401

        from splitq_modifier.modifier import SplitQModifier

        return SplitQModifier
    raise AttributeError(f"module 'splitq_modifier' has no attribute {name!r}")
