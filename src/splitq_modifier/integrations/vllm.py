"""Patches of vLLM (listed, with why, in :mod:`splitq_modifier.integrations`); applied by the
plugin's entry point (:func:`splitq_modifier.vllm.register`), in vLLM's processes only."""

from __future__ import annotations

import functools

__all__ = ["install_loader_hook"]


def install_loader_hook() -> None:
    """Make vLLM's model loaders attach the text mask to every model they load
    (``BaseModelLoader.load_model`` wrapped; idempotent)."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    from splitq_modifier.vllm.modality import attach_text_mask

    load = BaseModelLoader.load_model
    if getattr(load, "_splitq_hook", False):
        return

    @functools.wraps(load)
    def load_model(self, *args, **kwargs):
        model = load(self, *args, **kwargs)
        attach_text_mask(model)
        return model

    load_model._splitq_hook = True
    BaseModelLoader.load_model = load_model
