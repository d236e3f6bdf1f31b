"""A decoder layer at a real width (hidden 1024): oneshot, save, fresh-process reload."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
from llmcompressor import oneshot

from benchmarks.size_report import checkpoint_report
from splitq_modifier import SplitQModifier
from splitq_modifier.layout import plan_site
from splitq_modifier.runtime import SplitQSiteLinear
from splitq_modifier.testing.tiny import (
    build_tiny_vlm,
    calibration_dataset,
    collate,
    synthetic_samples,
)

_RELOAD = textwrap.dedent(
    """
    import sys, torch
    import splitq_modifier
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(sys.argv[1])
    sample = torch.load(sys.argv[1] + "/sample.pt", weights_only=False)
    with torch.no_grad():
        torch.save(model(**sample).logits, sys.argv[1] + "/reloaded.pt")
    """
)


def test_hidden_1024_round_trip(tmp_path):
    tiny = build_tiny_vlm(
        "qwen2_5_vl", hidden=1024, layers=1, intermediate=2816, heads=8, kv_heads=2,
        outliers=8, path=str(tmp_path / "fp"),
    )  # fmt: skip
    modifier = SplitQModifier(epochs=1, batch_size=2)
    oneshot(
        model=tiny.model,
        dataset=calibration_dataset(synthetic_samples(tiny, 2, seq_text=40)),
        data_collator=collate,
        recipe=[modifier],
        num_calibration_samples=2,
        processor=tiny.tokenizer,
    )
    layer = tiny.model.model.language_model.layers[0]
    report = modifier.report
    # realised layout: aligned outlier paths (32 = nearest multiple of 2% of 1024), balanced
    # factors; recorded per site in the report
    for site in ("attn_in", "attn_out", "mlp_in", "mlp_down"):
        entry = report[f"model.language_model.layers.0.{site}"]
        assert entry["sizes"][0] % 32 == 0 and entry["sizes"][1] % 32 == 0
        assert entry["transform_cost"] <= 0.05
    assert isinstance(layer.self_attn.q_proj, SplitQSiteLinear)
    down = plan_site(2816, (1024,), 0.02, 0.02)  # 2816 -> 1024: two factors exceed 5%
    assert layer.mlp.down_proj.owner.dims == down.dims and len(down.dims[2]) == 3
    sample = synthetic_samples(tiny, 1, seq_text=40, seed=3)[0]
    with torch.no_grad():
        expected = tiny.model(**sample).logits
    out = tmp_path / "q"
    tiny.model.save_pretrained(str(out), save_compressed=True)
    torch.save(sample, out / "sample.pt")
    proc = subprocess.run(
        [sys.executable, "-c", _RELOAD, str(out)], capture_output=True, text=True, timeout=600,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out / "reloaded.pt")
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-4
    want, in_file = checkpoint_report(str(out))  # the spec's byte count is what the file holds
    assert want == in_file > 0
