"""Torch ops in one forward of a reloaded SplitQ model against the FP model (CPU profiler).

Counts the top-level profiler events of one forward of a 2-layer tiny LLaVA (hidden 64), FP
and SplitQ W4A4 saved with ``save_compressed=True`` and reloaded with ``from_pretrained``. The
transforms of a site run inside its ``splitq::site_linear`` call, so the ops outside those
calls should be close to the FP model's.

    python benchmarks/op_count.py
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter

import torch
from llmcompressor import oneshot
from transformers import AutoModelForImageTextToText

import splitq_modifier  # noqa: F401
from splitq_modifier import SplitQModifier
from splitq_modifier.testing.tiny import (
    build_tiny_vlm,
    calibration_dataset,
    clone_model,
    collate,
    synthetic_samples,
)


def top_level_ops(model: torch.nn.Module, sample: dict) -> Counter:
    """Top-level torch.profiler events of one forward of ``model`` on ``sample``."""
    with (
        torch.no_grad(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
    ):
        model(**sample)
    return Counter(e.name for e in prof.events() if e.cpu_parent is None)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="llava", choices=["llava", "qwen2_5_vl"])
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        tiny = build_tiny_vlm(args.arch, hidden=64, layers=args.layers, path=f"{root}/fp")
        fp = clone_model(tiny.model)
        oneshot(
            model=tiny.model,
            dataset=calibration_dataset(synthetic_samples(tiny, 2)),
            data_collator=collate,
            recipe=[SplitQModifier(epochs=0)],
            num_calibration_samples=2,
            processor=tiny.tokenizer,
        )
        tiny.model.save_pretrained(f"{root}/q", save_compressed=True)
        q = AutoModelForImageTextToText.from_pretrained(f"{root}/q")
        sample = synthetic_samples(tiny, 1, seed=5)[0]
        ref, got = top_level_ops(fp, sample), top_level_ops(q, sample)
    outside = sum(n for k, n in got.items() if not k.startswith("splitq::"))
    sites = got.get("splitq::site_linear", 0)
    fp_total = sum(ref.values())
    print(f"\n{args.arch}, {args.layers} layers, hidden 64: top-level torch ops in one forward")
    print("| model | splitq::site_linear calls | other torch ops | ratio to FP |")
    print("|---|---|---|---|")
    print(f"| FP | 0 | {fp_total} | 1.00 |")
    print(f"| SplitQ W4A4, reloaded | {sites} | {outside} | {outside / fp_total:.2f} |")
    return {"fp": fp_total, "outside": outside, "site_calls": sites}


if __name__ == "__main__":
    main()
