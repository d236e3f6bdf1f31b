"""Serving ``splitq-packed`` checkpoints in vLLM: a quantization plugin.

Installed beside vLLM, the package registers itself through the ``vllm.general_plugins``
entry point (``splitq = "splitq_modifier.vllm:register"`` in ``pyproject.toml``), which vLLM
loads in every process it starts (front end, engine core, workers). No flag is needed::

    from vllm import LLM
    llm = LLM("path/to/splitq-checkpoint")          # or: vllm serve path/to/splitq-checkpoint

:func:`register` adds:

- :class:`~splitq_modifier.vllm.config.SplitQConfig` as vLLM quantization method
  ``"splitq"``; its ``override_quantization_method`` claims ``quant_method:
  compressed-tensors`` checkpoints that carry SplitQ config groups, and it hands every layer
  that is not a SplitQ linear (attention's kv cache, an ``lm_head`` quantized by another
  modifier, the vision tower) to vLLM's own compressed-tensors method;
- :class:`~splitq_modifier.vllm.linear.SplitQLinearMethod`, which builds each activation site
  on vLLM's fused layers (``qkv_proj``, ``gate_up_proj``; ``o_proj``, ``down_proj`` alone)
  and runs it with one ``torch.ops.splitq.site_linear`` call (the torch reference on CPU, the
  Triton kernels on CUDA);
- the text mask: the MAC branch applies to text tokens only, and vLLM marks the
  multimodal positions of every step when it embeds the inputs
  (:mod:`splitq_modifier.vllm.modality`).

The serving path imports neither llm-compressor nor the calibration code, and runs with the
compressed-tensors release vLLM pins. See ``docs/serving.md``.
"""

from __future__ import annotations

__all__ = ["register"]


def register() -> None:
    """vLLM plugin entry point: register the ``splitq`` quantization method and the hook
    that feeds the text mask (idempotent; vLLM may call it several times per process)."""
    from splitq_modifier.integrations import apply_library
    from splitq_modifier.vllm.config import SplitQConfig, register_config

    register_config(SplitQConfig)
    apply_library("vllm")  # version-checked: the text-mask hook on vLLM's model loaders
