"""Helpers of the toolkit tests (examples, families, vision encoder, report): calibrate a tiny
model of a family through the real processor path, and reload saved folders in one fresh
process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REL_TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run the module's torch work on one thread (restored afterwards): on this project's
    shared 2-core machine, torch's default thread count made one tiny oneshot 18x slower
    (measured: 40 s vs 2.2 s under a load average of 7)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_example(name: str):
    """Import ``examples/<name>_example.py`` as a module."""
    path = ROOT / "examples" / f"{name}_example.py"
    spec = importlib.util.spec_from_file_location(f"{name}_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def image_token_count(rows, token_id: int) -> int:
    """How many ``token_id`` positions the processed calibration rows hold."""
    return sum(sum(1 for t in row["input_ids"] if t == token_id) for row in rows)


def held_out_inputs(processor, family, seed: int = 99) -> dict:
    """Processor inputs (tensors) of one held-out image-text sample."""
    from splitq_modifier.testing.families import caption_images
    from splitq_modifier.toolkit import DEFAULT_PROMPT

    image, caption = caption_images(1, family.image_sizes[-1:], seed=seed)[0]
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DEFAULT_PROMPT}]},
        {"role": "assistant", "content": [{"type": "text", "text": caption}]},
    ]
    text = processor.apply_chat_template(msgs, tokenize=False)
    return dict(processor(text=[text], images=[image], return_tensors="pt"))


def save_expected(model, inputs: dict, save_dir: str) -> torch.Tensor:
    """In-memory logits of ``model`` on ``inputs``, stored next to the saved model."""
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.save({"inputs": inputs, "logits": logits}, os.path.join(save_dir, "expected.pt"))
    return logits


_RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    import splitq_modifier
    from splitq_modifier.testing.families import register_offline_processors
    from splitq_modifier.runtime import SplitQSiteLinear
    from transformers import AutoModelForImageTextToText, AutoProcessor

    register_offline_processors()
    res = {}
    for d in sys.argv[1:]:
        model = AutoModelForImageTextToText.from_pretrained(d)
        processor = AutoProcessor.from_pretrained(d)
        exp = torch.load(d + "/expected.pt", weights_only=False)
        with torch.no_grad():
            logits = model(**exp["inputs"]).logits
        err = float((logits - exp["logits"]).abs().max() / exp["logits"].abs().max())
        sq = [n for n, m in model.named_modules() if isinstance(m, SplitQSiteLinear)]
        res[d] = {
            "rel_err": err,
            "splitq_linears": sorted(sq),
            "vision_ids": list(model.splitq_context.vision_ids),
            "processor": type(processor).__name__,
            "has_image_processor": getattr(processor, "image_processor", None) is not None,
        }
    print("RESULT" + json.dumps(res))
    """
)


def reload_fresh(dirs: list[str]) -> dict:
    """Reload every saved folder in one fresh process; per folder: relative logit error
    against ``expected.pt``, the SplitQ linears, the recorded vision ids, the processor."""
    proc = subprocess.run(
        [sys.executable, "-c", _RELOAD, *dirs],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT") :])


def calibrate_family(family: str, root, layers: int = 1, n_images: int = 2, **splitq) -> dict:
    """The examples' flow on a tiny model of ``family``: processor chat template ->
    ``processor(text, images)`` -> oneshot (decoder layer as sequential target) -> save
    (``save_compressed=True`` + processor) -> in-memory logits on a held-out sample.

    :param splitq: extra ``SplitQModifier`` fields (default: 1 epoch, no plots, vision tower
        ignored under both spellings)
    """
    from llmcompressor import oneshot
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from splitq_modifier import SplitQModifier
    from splitq_modifier.testing.families import build_tiny_family, write_image_folder
    from splitq_modifier.toolkit import (
        build_calibration_set,
        collate_one,
        decoder_layer_classes,
        load_image_text_dataset,
        save_quantized,
        vision_ignore_patterns,
    )

    tiny = build_tiny_family(family, str(root / f"{family}-fp"), layers=layers)
    folder = write_image_folder(str(root / f"{family}-images"), n_images, tiny.family.image_sizes)
    model = AutoModelForImageTextToText.from_pretrained(tiny.path, dtype="auto")
    processor = AutoProcessor.from_pretrained(tiny.path)
    calib = build_calibration_set(processor, load_image_text_dataset(folder), max_length=1024)
    fields = dict(epochs=1, report_plots=False, ignore=vision_ignore_patterns(model))
    fields.update(splitq)
    modifier = SplitQModifier(**fields)
    targets = decoder_layer_classes(model)
    oneshot(
        model=model,
        processor=processor,
        dataset=calib,
        recipe=[modifier],
        num_calibration_samples=len(calib),
        data_collator=collate_one,
        sequential_targets=targets,
    )
    save_dir = str(root / f"{family}-splitq")
    save_quantized(model, processor, save_dir)
    save_expected(model, held_out_inputs(processor, tiny.family), save_dir)
    return {
        "tiny": tiny,
        "model": model,
        "modifier": modifier,
        "targets": targets,
        "calib": calib,
        "image_tokens": image_token_count(calib, tiny.image_token_id),
        "tokens": sum(len(r["input_ids"]) for r in calib),
        "save_dir": save_dir,
    }
