"""Quickstart: quantize a tiny VLM with SplitQ through llm-compressor's ``oneshot``.

Builds a tiny Qwen2.5-VL (or LLaVA) in memory with planted modality-specific outlier
channels, makes a synthetic image-text calibration set, quantizes the language model with
``recipes/splitq_w4a4.yaml``, and compares the result with the FP model and with plain
round-to-nearest at the same bits (llm-compressor's QuantizationModifier).

    python examples/quickstart.py                       # W4A4, tiny Qwen2.5-VL
    python examples/quickstart.py --arch llava --recipe recipes/splitq_w3a3.yaml

With a real model the calls are the same: load it with its Auto class, pass a processed
image-text dataset, and call ``oneshot(model=..., dataset=..., recipe=...)``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import yaml
from llmcompressor import oneshot

import splitq_modifier  # noqa: F401  (registers SplitQModifier for YAML recipes)
from splitq_modifier.testing.tiny import (
    ARCH_CHOICES,
    build_tiny_vlm,
    calibration_dataset,
    clone_model,
    collate,
    fidelity,
    rtn_recipe,
    synthetic_samples,
)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RECIPE = os.path.join(HERE, "..", "recipes", "splitq_w4a4.yaml")


def _bits(recipe_path: str) -> tuple[int, int]:
    """Weight and activation bits named in a SplitQ recipe (for the RTN comparison)."""
    with open(recipe_path) as f:
        doc = yaml.safe_load(f)
    for stage in doc.values():
        for group in stage.values():
            if isinstance(group, dict) and "SplitQModifier" in group:
                m = group["SplitQModifier"]
                return m.get("weight_bits", 4), m.get("activation_bits", 4)
    raise ValueError(f"{recipe_path} has no SplitQModifier")


def _run(model, samples, recipe, tokenizer) -> float:
    start = time.time()
    oneshot(
        model=model,
        dataset=calibration_dataset(samples),
        data_collator=collate,
        recipe=recipe,
        num_calibration_samples=len(samples),
        processor=tokenizer,
    )
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="SplitQ YAML recipe")
    parser.add_argument("--arch", default="qwen2_5_vl", choices=ARCH_CHOICES)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--calib", type=int, default=16, help="calibration samples")
    parser.add_argument("--eval", type=int, default=16, help="evaluation samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    tiny = build_tiny_vlm(args.arch, hidden=args.hidden, layers=args.layers, seed=args.seed)
    calib = synthetic_samples(tiny, args.calib, seed=args.seed)
    evals = synthetic_samples(tiny, args.eval, seed=args.seed + 1000)
    fp = clone_model(tiny.model)
    wb, ab = _bits(args.recipe)
    print(
        f"tiny {args.arch}: hidden {args.hidden}, {args.layers} layers; planted vision "
        f"channels {tiny.vision_channels}, text channels {tiny.text_channels}"
    )

    rtn = clone_model(fp)
    rtn.config.name_or_path = tiny.path
    t_rtn = _run(rtn, calib, rtn_recipe(wb, ab), tiny.tokenizer)

    t_splitq = _run(tiny.model, calib, args.recipe, tiny.tokenizer)
    from llmcompressor.core import active_session

    (modifier,) = [
        m
        for m in active_session().lifecycle.recipe.modifiers
        if type(m).__name__ == "SplitQModifier"
    ]

    print("\nChannels on the vision and text outlier paths, per activation site:")
    for name, rep in modifier.report.items():
        if "vision" in rep:
            print(f"  {name:<45} vision {rep['vision']}  text {rep['text']}  (of {rep['dim']})")
    print("\nPer-layer relative output error (before -> after training):")
    for name, rep in modifier.report.items():
        if "loss_before" in rep:
            print(f"  {name:<45} {rep['loss_before']:.4f} -> {rep['loss_after']:.4f}")

    rows = [
        (f"RTN W{wb}A{ab}", fidelity(fp, rtn, evals, tiny.image_token_id), t_rtn),
        (f"SplitQ W{wb}A{ab}", fidelity(fp, tiny.model, evals, tiny.image_token_id), t_splitq),
    ]
    print(f"\nFidelity to the FP model on {args.eval} held-out samples:")
    print("| method | KL(FP||Q) | KL text | KL vision | top-1 agree | time (s) |")
    print("|---|---|---|---|---|---|")
    for name, f, t in rows:
        print(
            f"| {name} | {f['kl_all']:.4g} | {f['kl_text']:.4g} | {f['kl_vision']:.4g} "
            f"| {f['top1_all']:.3f} | {t:.0f} |"
        )
    ratio = rows[0][1]["kl_all"] / max(rows[1][1]["kl_all"], 1e-12)
    print(f"\nSplitQ's KL is {ratio:.1f}x lower than RTN's.")


if __name__ == "__main__":
    main()
