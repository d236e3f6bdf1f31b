"""Quantize LLaVA (1.5) with SplitQ (W4A4) and run the quantized model.

The flow of llm-compressor's ``examples/multimodal_vision`` scripts, with a SplitQ recipe:

1. load the model and its processor (a hub id or a local folder);
2. calibration data: image-caption pairs (flickr30k by default, or a folder of your own
   images), each turned into a chat turn with ``processor.apply_chat_template`` and
   processed with ``processor(text=[...], images=[...])``; samples longer than
   ``--max-length`` are dropped, never truncated (truncation cuts image tokens, and would be
   saved into the tokenizer);
3. ``oneshot`` with a batch-size-1 collator and the language model's decoder layer as the
   sequential target;
4. save with ``save_compressed=True`` (the ``splitq-packed`` format) and the processor; the
   calibration report lands in ``<save dir>/splitq_report``;
5. reload with ``AutoModelForImageTextToText`` and answer a question about an image.

    python examples/llava_example.py                          # LLaVA-1.5-7B, flickr30k
    python examples/llava_example.py --model llava-hf/llava-1.5-13b-hf \\
        --dataset ./my_images --num-samples 64 --save-dir llava13b-splitq
    python examples/llava_example.py --quantize-vision        # vision encoder too

A folder of images uses ``datasets``' imagefolder layout: image files, plus an optional
``metadata.jsonl`` of ``{"file_name": ..., "text": <caption>}`` lines. Needs the model's
weights and, for 7B/13B sizes, a GPU (layers are onloaded to it one at a time).
"""

from __future__ import annotations

import argparse

from llmcompressor import oneshot
from transformers import AutoProcessor, LlavaForConditionalGeneration

import splitq_modifier  # noqa: F401  (registers SplitQModifier and the splitq-packed format)
from splitq_modifier import SplitQModifier
from splitq_modifier.toolkit import (
    DEFAULT_DATASET,
    DEFAULT_PROMPT,
    build_calibration_set,
    collate_one,
    generate_answer,
    load_image_text_dataset,
    load_quantized,
    save_quantized,
    vision_ignore_patterns,
)

MODEL_ID = "llava-hf/llava-1.5-7b-hf"
#: oneshot's sequential targets: one decoder layer of the language model per subgraph (LLaVA
#: 1.5's is Llama; LLaVA models built on other LMs use theirs, see
#: splitq_modifier.toolkit.decoder_layer_classes); the vision tower runs in the first one.
SEQUENTIAL_TARGETS = ["LlamaDecoderLayer"]


def quantize(
    model_id: str = MODEL_ID,
    dataset: str = DEFAULT_DATASET,
    split: str = "test",
    num_samples: int = 128,
    max_length: int = 2048,
    save_dir: str | None = None,
    recipe=None,
    quantize_vision: bool = False,
    epochs: int = 15,
    seed: int = 42,
) -> str:
    """Calibrate ``model_id`` with SplitQ W4A4 on ``dataset`` and save it; returns the
    save folder."""
    model = LlavaForConditionalGeneration.from_pretrained(model_id, dtype="auto")
    processor = AutoProcessor.from_pretrained(model_id)

    rows = load_image_text_dataset(dataset, split, num_samples, seed)
    calib = build_calibration_set(processor, rows, max_length=max_length)

    if recipe is None:
        recipe = [
            SplitQModifier(
                weight_bits=4,
                activation_bits=4,
                epochs=epochs,
                # vision tower and projector, with or without the "model." prefix
                ignore=[] if quantize_vision else vision_ignore_patterns(model),
                quantize_vision=quantize_vision,
                cache_device="cpu",  # cached layer inputs wait in CPU memory
                seed=seed,
            )
        ]
    oneshot(
        model=model,
        processor=processor,
        dataset=calib,
        recipe=recipe,
        num_calibration_samples=len(calib),
        max_seq_length=max_length,
        data_collator=collate_one,
        sequential_targets=SEQUENTIAL_TARGETS,
    )
    save_dir = save_dir or model_id.rstrip("/").split("/")[-1] + "-SplitQ-W4A4"
    return save_quantized(model, processor, save_dir)


def generate(save_dir: str, image=None, prompt: str = DEFAULT_PROMPT, dataset=None) -> str:
    """Reload the saved model and answer ``prompt`` about ``image`` (default: the first
    image of ``dataset``)."""
    model, processor = load_quantized(save_dir)
    if image is None:
        image = load_image_text_dataset(dataset or DEFAULT_DATASET, num_samples=1)[0]["image"]
    return generate_answer(model, processor, image, prompt)


def main(argv: list[str] | None = None) -> str:
    """Command line: quantize, save, reload, generate; returns the answer."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=MODEL_ID, help="hub id or local folder")
    p.add_argument("--dataset", default=DEFAULT_DATASET, help="hub id or folder of images")
    p.add_argument("--split", default="test")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--save-dir", default=None)
    p.add_argument("--recipe", default=None, help="a SplitQ YAML recipe instead of W4A4")
    p.add_argument("--quantize-vision", action="store_true", help="quantize the vision encoder")
    p.add_argument("--epochs", type=int, default=15, help="training epochs per layer")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    args = p.parse_args(argv)
    save_dir = quantize(
        args.model,
        args.dataset,
        args.split,
        args.num_samples,
        args.max_length,
        args.save_dir,
        args.recipe,
        args.quantize_vision,
        args.epochs,
    )
    answer = generate(save_dir, prompt=args.prompt, dataset=args.dataset)
    print(f"========== SAMPLE GENERATION ==========\n{answer}\n{'=' * 39}")
    return answer


if __name__ == "__main__":
    main()
