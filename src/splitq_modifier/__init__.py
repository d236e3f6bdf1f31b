"""SplitQ: modality-split low-bit post-training quantization of vision-language models.

``import splitq_modifier`` registers :class:`SplitQModifier` with llm-compressor, so YAML
recipes can name it, and then use ``oneshot`` as usual::

    import splitq_modifier  # noqa: F401
    from llmcompressor import oneshot

    oneshot(model=model, dataset=calib, recipe="recipes/splitq_w4a4.yaml")
"""

from llmcompressor.modifiers.factory import ModifierFactory

from splitq_modifier import format as _format  # noqa: F401  (registers splitq-packed)
from splitq_modifier.modifier import SplitQModifier

ModifierFactory.register("SplitQModifier", SplitQModifier)

__all__ = ["SplitQModifier"]
__version__ = "0.1.0"
