"""Building blocks of the real-model examples (``examples/*_example.py``).

The examples follow llm-compressor's ``examples/multimodal_vision`` flow: load the model and
its processor, turn an image-caption dataset into processed samples through the processor's
chat template, calibrate with ``oneshot`` (batch size 1, the language model's decoder layer as
sequential target), save with ``save_compressed=True`` plus the processor, reload with
``AutoModelForImageTextToText`` and generate. This module holds the parts every example
shares, each written against two known traps of that flow:

- **Truncation.** ``processor(..., max_length=n, truncation=True)`` cuts image placeholder
  tokens off (the model then fails with an image-token/feature mismatch), and a fast
  tokenizer keeps the last call's truncation and padding in its backend, which
  ``save_pretrained`` writes into ``tokenizer.json`` (measured with transformers 5.17), so a
  served model truncates its prompts. :func:`build_calibration_set` never truncates (it
  drops samples longer than ``max_length`` instead) and restores the tokenizer's state
  afterwards (:func:`preserved_tokenizer_state`); :func:`save_quantized` checks the saved
  tokenizer.
- **Vision-tower names.** transformers moved the vision tower of several families (Qwen-VL:
  ``visual.*`` became ``model.visual.*``), and checkpoints keep the old names.
  :func:`vision_ignore_patterns` matches both spellings.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from loguru import logger
from torch import nn

from splitq_modifier.arch import get_arch, is_decoder_layer

if TYPE_CHECKING:
    from datasets import Dataset
    from PIL import Image

__all__ = [
    "DEFAULT_DATASET",
    "DEFAULT_PROMPT",
    "build_calibration_set",
    "collate_one",
    "decoder_layer_classes",
    "generate_answer",
    "load_image_text_dataset",
    "load_quantized",
    "preserved_tokenizer_state",
    "save_quantized",
    "tokenizer_state",
    "vision_ignore_patterns",
]

#: The image-caption set llm-compressor's VLM examples calibrate on.
DEFAULT_DATASET = "lmms-lab/flickr30k"
DEFAULT_SPLIT = "test"
DEFAULT_PROMPT = "What does the image show?"

_CAPTION_COLUMNS = ("caption", "captions", "text", "sentences", "answer", "answers")


# --------------------------------------------------------------------------- data
def load_image_text_dataset(
    source: str = DEFAULT_DATASET,
    split: str = DEFAULT_SPLIT,
    num_samples: int | None = None,
    seed: int = 42,
) -> Dataset:
    """Load an image-text dataset as a ``datasets.Dataset`` with an ``image`` column.

    :param source: a hub dataset id (default: flickr30k), a folder of images (``datasets``'
        ``imagefolder`` layout: image files plus an optional ``metadata.jsonl`` /
        ``metadata.csv`` with ``file_name`` and a caption column such as ``text``), or a
        folder written by ``Dataset.save_to_disk``
    :param split: split of a hub dataset (``imagefolder`` folders have ``train``)
    :param num_samples: keep this many rows (after shuffling with ``seed``)
    :returns: the dataset, shuffled, with its columns as stored
    """
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    if os.path.isdir(source):
        if os.path.exists(os.path.join(source, "dataset_info.json")) or os.path.exists(
            os.path.join(source, "dataset_dict.json")
        ):
            ds = load_from_disk(source)
            if isinstance(ds, DatasetDict):
                ds = ds[split] if split in ds else next(iter(ds.values()))
        else:
            ds = load_dataset("imagefolder", data_dir=source, split="train")
    else:
        want = split if num_samples is None or "[" in split else f"{split}[:{num_samples}]"
        ds = load_dataset(source, split=want)
    if not isinstance(ds, Dataset):
        raise ValueError(f"{source!r} did not load as one dataset split (got {type(ds).__name__})")
    if "image" not in ds.column_names:
        raise ValueError(
            f"dataset {source!r} has no 'image' column (columns: {ds.column_names}); "
            "an image-text dataset needs one"
        )
    ds = ds.shuffle(seed=seed)
    if num_samples is not None:
        ds = ds.select(range(min(num_samples, len(ds))))
    return ds


def caption_of(row: dict) -> str | None:
    """The caption of a dataset row (first of a list of captions), or None."""
    for col in _CAPTION_COLUMNS:
        value = row.get(col)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def tokenizer_state(processor: Any) -> dict:
    """The settings a fast tokenizer carries between calls: backend truncation and padding,
    and ``model_max_length``."""
    tok = getattr(processor, "tokenizer", processor)
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    state = {"model_max_length": getattr(tok, "model_max_length", None)}
    if backend is not None:
        state["truncation"] = backend.truncation
        state["padding"] = backend.padding
    return state


@contextmanager
def preserved_tokenizer_state(processor: Any) -> Iterator[None]:
    """Restore the tokenizer's truncation, padding and ``model_max_length`` on exit.

    A fast tokenizer called with ``truncation=True, max_length=n`` (or with padding) keeps
    that setting in its backend and ``save_pretrained`` writes it to ``tokenizer.json``;
    calibration preprocessing must not change what the saved tokenizer does when served.
    """
    tok = getattr(processor, "tokenizer", processor)
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    before = tokenizer_state(processor)
    try:
        yield
    finally:
        if before.get("model_max_length") is not None:
            tok.model_max_length = before["model_max_length"]
        if backend is not None:
            trunc, pad = before.get("truncation"), before.get("padding")
            if trunc is None:
                backend.no_truncation()
            else:
                backend.enable_truncation(**trunc)
            if pad is None:
                backend.no_padding()
            else:
                backend.enable_padding(**pad)


def _messages(prompt: str, answer: str | None) -> list[dict]:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def build_calibration_set(
    processor: Any,
    dataset: Dataset,
    prompt: str = DEFAULT_PROMPT,
    max_length: int | None = 2048,
    with_answers: bool = True,
    num_proc: int | None = None,
) -> Dataset:
    """Processed calibration samples, one image-text conversation each.

    Every row becomes a user turn (the image and ``prompt``) followed, when
    ``with_answers`` and the row has a caption, by an assistant turn holding the caption, so
    calibration sees text tokens after the image as in use. The conversation goes through
    ``processor.apply_chat_template`` and ``processor(text=[...], images=[...])``.

    Samples longer than ``max_length`` tokens are dropped, never truncated: truncation would
    cut image placeholder tokens (the model then rejects the sample) and would leak into
    the saved tokenizer. The tokenizer's state is restored afterwards.

    :returns: a ``datasets.Dataset`` of processor outputs (lists), for
        ``oneshot(dataset=..., data_collator=collate_one)``
    :raises TypeError: when ``processor`` has no image processor (``AutoProcessor`` falls
        back to a bare tokenizer when it cannot find the processor class, and a tokenizer
        silently ignores images)
    :raises ValueError: when every sample is longer than ``max_length``
    """
    if getattr(processor, "image_processor", None) is None:
        raise TypeError(
            f"{type(processor).__name__} is not a multimodal processor (no image_processor): "
            "calibration would see no images. Load the model's processor with "
            "AutoProcessor.from_pretrained(model_id) and check it is its *Processor class"
        )

    def process(row: dict) -> dict:
        answer = caption_of(row) if with_answers else None
        text = processor.apply_chat_template(
            _messages(prompt, answer), tokenize=False, add_generation_prompt=answer is None
        )
        image = row["image"].convert("RGB")
        out = processor(text=[text], images=[image], padding=False)
        return {k: v[0] if k in ("input_ids", "attention_mask") else v for k, v in out.items()}

    with preserved_tokenizer_state(processor):
        processed = dataset.map(
            process, remove_columns=dataset.column_names, num_proc=num_proc, desc="processing"
        )
    if max_length is not None:
        n = len(processed)
        processed = processed.filter(lambda row: len(row["input_ids"]) <= max_length)
        if len(processed) < n:
            logger.warning(
                f"SplitQ calibration: dropped {n - len(processed)} of {n} samples longer than "
                f"max_length={max_length} tokens (truncating would cut image tokens)"
            )
        if not len(processed):
            raise ValueError(
                f"every calibration sample is longer than max_length={max_length} tokens; "
                "raise max_length or use smaller images"
            )
    return processed


def collate_one(batch: list[dict]) -> dict[str, torch.Tensor]:
    """Batch-size-1 collator: the one sample's lists as tensors (``input_ids`` and
    ``attention_mask`` get their batch dimension back)."""
    if len(batch) != 1:
        raise ValueError(f"collate_one takes batches of one sample, got {len(batch)}")
    out = {}
    for key, value in batch[0].items():
        t = torch.tensor(value)
        if key in ("input_ids", "attention_mask") and t.dim() == 1:
            t = t[None]
        out[key] = t
    return out


# --------------------------------------------------------------------------- model
def decoder_layer_classes(model: nn.Module) -> list[str]:
    """Class names of the language model's decoder layers: oneshot's
    ``sequential_targets`` for SplitQ (the vision tower stays one subgraph)."""
    spec = get_arch(model.config)
    names = sorted(
        {type(m).__name__ for n, m in model.named_modules() if is_decoder_layer(n, spec)}
    )
    if not names:
        raise ValueError(
            f"no language-model decoder layer matches {spec.layers!r} in "
            f"{type(model).__name__} (splitq_modifier.arch)"
        )
    return names


def vision_ignore_patterns(model: nn.Module) -> list[str]:
    """llm-compressor ``ignore`` patterns for the vision tower and projector, matching both
    the module names (``model.visual.blocks.0...``) and the older / checkpoint names
    (``visual.blocks.0...``)."""
    spec = get_arch(model.config)
    return [f"re:(.*\\.)?{re.escape(root)}\\..*" for root in spec.vision_modules]


def save_quantized(model: nn.Module, processor: Any, save_dir: str) -> str:
    """Save a SplitQ model (``save_compressed=True``, the ``splitq-packed`` format) and
    its processor to ``save_dir``; warn if the saved tokenizer truncates or pads (served
    prompts would lose tokens, image tokens included). Returns ``save_dir``."""
    model.save_pretrained(save_dir, save_compressed=True)
    processor.save_pretrained(save_dir)
    path = os.path.join(save_dir, "tokenizer.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        kept = {k: saved.get(k) for k in ("truncation", "padding") if saved.get(k)}
        if kept:
            logger.warning(
                f"SplitQ: the tokenizer saved to {save_dir} carries {kept}: served prompts "
                "will be truncated or padded, image tokens included. If this came from "
                "calibration preprocessing, run it inside preserved_tokenizer_state(processor)"
            )
    logger.info(f"SplitQ: saved the quantized model and processor to {save_dir}")
    return save_dir


def load_quantized(save_dir: str, device_map: str | None = None):
    """Load a saved SplitQ model and its processor (``AutoModelForImageTextToText``,
    ``AutoProcessor``). ``device_map`` defaults to ``"auto"`` with a GPU, else CPU."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import splitq_modifier  # noqa: F401  (registers the splitq-packed loader)

    if device_map is None and torch.cuda.is_available():
        device_map = "auto"
    model = AutoModelForImageTextToText.from_pretrained(
        save_dir, dtype="auto", device_map=device_map
    )
    return model.eval(), AutoProcessor.from_pretrained(save_dir)


@torch.no_grad()
def generate_answer(
    model: nn.Module,
    processor: Any,
    image: Image.Image,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 32,
) -> str:
    """Greedy answer of ``model`` to ``prompt`` about ``image`` (a PIL image)."""
    text = processor.apply_chat_template(
        _messages(prompt, None), tokenize=False, add_generation_prompt=True
    )
    inputs = processor(text=[text], images=[image.convert("RGB")], return_tensors="pt")
    device = next(model.parameters(), torch.empty(0)).device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(new, skip_special_tokens=True)[0]
