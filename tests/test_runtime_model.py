"""A quantized tiny VLM at runtime: cost of a forward, torch.compile of a decoder layer,
serving without llm-compressor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from llmcompressor import oneshot

from benchmarks.op_count import top_level_ops  # the benchmark's op counter
from splitq_modifier import SplitQModifier
from splitq_modifier.runtime import SplitQSiteLinear
from splitq_modifier.testing.tiny import (
    build_tiny_vlm,
    calibration_dataset,
    clone_model,
    collate,
    synthetic_samples,
)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """(FP model, SplitQ W4A4 model, sample, saved dir) on a 2-layer tiny LLaVA."""
    root = tmp_path_factory.mktemp("runtime_model")
    tiny = build_tiny_vlm("llava", hidden=64, layers=2, path=str(root / "fp"))
    fp = clone_model(tiny.model)
    oneshot(
        model=tiny.model,
        dataset=calibration_dataset(synthetic_samples(tiny, 2)),
        data_collator=collate,
        recipe=[SplitQModifier(epochs=0)],
        num_calibration_samples=2,
        processor=tiny.tokenizer,
    )
    sample = synthetic_samples(tiny, 1, seed=5)[0]
    path = root / "q"
    tiny.model.save_pretrained(str(path), save_compressed=True)
    torch.save(sample, path / "sample.pt")
    return fp, tiny.model, sample, path


def test_transforms_run_inside_the_op(quantized):
    """Outside ``splitq::`` calls, a reloaded quantized model's forward runs at most 1.25x the
    torch ops of the FP forward (the gather, smoothing and Kronecker transforms all happen
    inside the op), and exactly one op call per activation site."""
    from transformers import AutoModelForImageTextToText

    fp, _, sample, path = quantized
    q = AutoModelForImageTextToText.from_pretrained(str(path))
    ref, got = top_level_ops(fp, sample), top_level_ops(q, sample)
    outside = sum(n for k, n in got.items() if not k.startswith("splitq::"))
    assert got.get("splitq::site_linear") == 4 * 2
    assert outside <= 1.25 * sum(ref.values()), (outside, sum(ref.values()))


def test_torch_compile_of_a_decoder_layer(quantized):
    _, q, sample, _ = quantized
    layer = q.model.language_model.layers[0]
    captured = {}

    def grab(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs

    h = layer.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        q(**sample)
    h.remove()
    torch._dynamo.reset()
    compiled = torch.compile(layer)
    with torch.no_grad():
        want = layer(*captured["args"], **captured["kwargs"])
        got = compiled(*captured["args"], **captured["kwargs"])
    want = want[0] if isinstance(want, tuple) else want
    got = got[0] if isinstance(got, tuple) else got
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert isinstance(layer.self_attn.k_proj, SplitQSiteLinear)


#: A serving process: loads the saved model with ``import splitq_modifier`` only, runs it
#: through the Triton kernels (the CUDA code path, in Triton's interpreter on CPU), saves the
#: logits and reports which calibration modules it imported.
_SERVE = textwrap.dedent(
    """
    import json, sys, torch
    import splitq_modifier
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(sys.argv[1])
    sample = torch.load(sys.argv[1] + "/sample.pt", weights_only=False)
    with torch.no_grad():
        torch.save(model(**sample).logits, sys.argv[1] + "/triton_logits.pt")
    heavy = [m for m in sys.modules if m.split(".")[0] == "llmcompressor"]
    calib = ["splitq_modifier." + m for m in ("modifier", "calibrate", "mocd", "split_linear")]
    calib = [m for m in calib if m in sys.modules]
    print("RESULT" + json.dumps({"llmcompressor": heavy, "calibration": calib}))
    """
)


@pytest.fixture(scope="module")
def served(quantized) -> dict:
    """What the serving process reported (one process for the tests below)."""
    path = quantized[3]
    env = {**os.environ, "SPLITQ_TRITON_INTERPRET": "1", "TRITON_INTERPRET": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _SERVE, str(path)], capture_output=True,
                          text=True, timeout=900, env=env)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT") :])


def test_serving_loads_without_llmcompressor(served):
    assert served == {"llmcompressor": [], "calibration": []}


def test_triton_path_matches_reference_at_model_level(quantized, served):
    """A reloaded model's forward through the Triton kernels (CUDA code path, run by Triton's
    interpreter on CPU) gives the reference path's logits."""
    from transformers import AutoModelForImageTextToText

    _, _, sample, path = quantized
    got = torch.load(path / "triton_logits.pt")
    with torch.no_grad():
        ref = AutoModelForImageTextToText.from_pretrained(str(path))(**sample).logits
    err = float((got - ref).abs().max() / ref.abs().max())
    print(f"Triton (interpreter) vs reference logits: max relative error {err:.3g}")
    assert err <= 1e-3
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
