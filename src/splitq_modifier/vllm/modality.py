"""The text mask in vLLM: which tokens of a step are text (the MAC branch applies to those).

vLLM knows which positions hold multimodal embeddings: at every step of a multimodal model,
the model runner calls ``model.embed_input_ids(input_ids, mm_embeds, is_multimodal=mask)``
outside the compiled graph, with ``mask`` (one bool per scheduled token, batched requests and
chunked prefills flattened in the order the model will see them) True at the positions its
encoder outputs fill. That is the only place the positions reach the model.

So each process keeps one persistent bool buffer per model, ``splitq_text_mask``
(``max_num_batched_tokens`` entries, on the model's device, all True at first), registered as
a non-persistent buffer of every SplitQ layer with a MAC branch:

- :func:`attach_text_mask` wraps the loaded model's ``embed_input_ids``: after the original
  call it writes ``~is_multimodal`` into the first ``num_tokens`` entries (a
  ``non_blocking`` copy plus an in-place ``logical_not_``: no host sync), or True when the
  call carries no positions (text-only steps, text-only models); vLLM's model loaders call it
  on every model they return (a patch of ``BaseModelLoader.load_model``, listed in
  :mod:`splitq_modifier.integrations`);
- each SplitQ layer passes ``splitq_text_mask[:num_tokens]`` to the op. The buffer's address
  never changes, so compiled graphs and CUDA graphs read the current step's mask; entries
  past the step's tokens belong to padding rows, whose outputs vLLM discards.

Text-only models never call ``embed_input_ids`` with positions, so their mask stays all True:
every token is text, as in transformers.
"""

from __future__ import annotations

import functools

import torch
from loguru import logger
from torch import nn

__all__ = [
    "MASK_BUFFER",
    "attach_text_mask",
    "make_text_mask",
    "update_text_mask",
]

#: Name of the text-mask buffer on SplitQ layers.
MASK_BUFFER = "splitq_text_mask"
#: Buffer size when no vLLM config is current (layers built outside an engine).
_DEFAULT_TOKENS = 8192


def _max_tokens() -> int:
    """The most tokens one forward can carry in the current vLLM config."""
    try:
        from vllm.config import get_current_vllm_config_or_none

        cfg = get_current_vllm_config_or_none()
    except ImportError:
        cfg = None
    if cfg is None:
        return _DEFAULT_TOKENS
    sizes = [getattr(cfg.scheduler_config, "max_num_batched_tokens", None)]
    sizes.append(getattr(cfg.compilation_config, "max_cudagraph_capture_size", None))
    sizes = [int(s) for s in sizes if s]
    return max(sizes) if sizes else _DEFAULT_TOKENS


def make_text_mask(
    num_tokens: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """A new all-True text-mask buffer (default size: the current config's token budget;
    default device: torch's current default device, the model's while vLLM builds it)."""
    n = _max_tokens() if num_tokens is None else int(num_tokens)
    return torch.ones(n, dtype=torch.bool, device=device)


def update_text_mask(
    buffers: list[torch.Tensor], num_tokens: int, is_multimodal: torch.Tensor | None
) -> None:
    """Write one step's mask: entry ``i < num_tokens`` is ``not is_multimodal[i]`` (True for
    every token when ``is_multimodal`` is None)."""
    for buf in buffers:
        if num_tokens > buf.numel():
            raise ValueError(
                f"splitq text mask holds {buf.numel()} tokens, but a step embeds {num_tokens}"
            )
        view = buf[:num_tokens]
        if is_multimodal is None:
            view.fill_(True)
        else:
            view.copy_(is_multimodal.reshape(-1)[:num_tokens], non_blocking=True)
            view.logical_not_()


def _mask_buffers(model: nn.Module) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for module in model.modules():
        buf = module._buffers.get(MASK_BUFFER)
        if buf is not None:
            seen.setdefault(id(buf), buf)
    return list(seen.values())


def attach_text_mask(model: nn.Module) -> bool:
    """Wrap ``model.embed_input_ids`` so each call updates the text mask of the model's
    SplitQ layers. Returns whether the model has such layers (idempotent)."""
    buffers = _mask_buffers(model)
    if not buffers:
        return False
    if getattr(model, "_splitq_text_mask_attached", False):
        return True
    embed = getattr(model, "embed_input_ids", None)
    if embed is None:
        logger.warning(
            "splitq_modifier: {} has no embed_input_ids; the MAC branch will treat every "
            "token as text",
            type(model).__name__,
        )
        return True

    @functools.wraps(embed)
    def embed_input_ids(input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = embed(input_ids, *args, **kwargs)
        update_text_mask(buffers, int(input_ids.shape[0]), kwargs.get("is_multimodal"))
        return out

    model.embed_input_ids = embed_input_ids
    model._splitq_text_mask_attached = True
    return True
