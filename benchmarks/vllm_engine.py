"""A SplitQ checkpoint served by a real vLLM engine, against the transformers runtime.

Runs in the project's environment (llm-compressor, compressed-tensors 0.19) and drives vLLM
in its own environment (``.ci/vllm-env``: vLLM pins compressed-tensors 0.17) through
``benchmarks/vllm_engine_worker.py`` subprocesses. Steps:

1. a tiny Qwen2.5-VL (hidden 128, 4 heads of 32, 1 kv head, qkv biases) is quantized with
   SplitQ W4A4 (``epochs=0``: initial transforms, branches on) and saved; its language model
   is re-saved as the text-only ``Qwen2ForCausalLM`` with the tensors byte for byte (vLLM's
   VLM classes need torchvision, which has no build for this machine's CPU torch);
2. the transformers runtime (``import splitq_modifier`` + ``from_pretrained``) gives the
   reference: greedy tokens and top-5 logprobs (fp32, full recompute per step);
3. vLLM runs the same prompts in the chosen modes; tokens must be equal and the top-5
   logprobs within ``--atol`` (1e-4).

``python benchmarks/vllm_engine.py`` prints one row per mode (wall time of the worker
process, engine start, generation, max |logprob difference|) and what a stock vLLM (the
plugin not loaded) prints for the checkpoint. ``tests/test_vllm.py`` uses the same
functions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = [
    "MODES",
    "PROMPTS",
    "compare",
    "engine_args",
    "hf_reference",
    "make_checkpoint",
    "plugin_overlay",
    "resave_language_model",
    "run_worker",
    "vllm_env",
    "vllm_python",
]

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "vllm_engine_worker.py"

#: Prompts (token ids; the vision ids 508-511 of the tiny model are left out): a batch of
#: three of different lengths, so prefill and decode run batched.
PROMPTS = [[5, 17, 33, 99, 120, 7, 8, 9], [300, 2, 77], [11] * 20]
MAX_TOKENS = 8
TOP = 5

#: Engine modes: name -> (multiprocessing, enforce_eager, tensor_parallel_size).
MODES = {
    "inproc-eager": (False, True, 1),
    "inproc-compiled": (False, False, 1),
    "mp-eager": (True, True, 1),
    "mp-compiled": (True, False, 1),
    "mp-eager-tp2": (True, True, 2),
    "mp-compiled-tp2": (True, False, 2),
}


# ------------------------------------------------------------------------------ checkpoint
def resave_language_model(src: str | Path, dst: str | Path) -> Path:
    """Re-save the language model of a saved tiny Qwen2.5-VL SplitQ checkpoint as a
    text-only ``Qwen2ForCausalLM`` folder: the same tensors byte for byte (vision tensors
    dropped), the text config, the quantization config with the group targets renamed from
    ``model.language_model.`` to ``model.``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    text = dict(cfg["text_config"])
    text.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", dtype="float32")
    rope = dict(text.pop("rope_parameters", None) or {})
    text["rope_parameters"] = {"rope_theta": rope.get("rope_theta", 1e6), "rope_type": "default"}
    text["tie_word_embeddings"] = cfg.get("tie_word_embeddings", False)
    qc = json.dumps(cfg["quantization_config"])
    text["quantization_config"] = json.loads(qc.replace(r"model\\.language_model\\.", r"model\\."))
    (dst / "config.json").write_text(json.dumps(text, indent=2))
    keep = ("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.")
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(keep)}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst


def make_checkpoint(root: str | Path) -> Path:
    """Quantize the tiny Qwen2.5-VL with SplitQ W4A4 and save it; return the folder of its
    text-only re-save (``root/text``)."""
    from llmcompressor import oneshot

    from splitq_modifier import SplitQModifier
    from splitq_modifier.testing.tiny import (
        build_tiny_vlm,
        calibration_dataset,
        collate,
        synthetic_samples,
    )

    root = Path(root)
    tiny = build_tiny_vlm("qwen2_5_vl", hidden=128, layers=2, heads=4, kv_heads=1,
                          path=str(root / "fp"))  # fmt: skip
    oneshot(
        model=tiny.model,
        dataset=calibration_dataset(synthetic_samples(tiny, 2)),
        data_collator=collate,
        recipe=[SplitQModifier(epochs=0, report_plots=False)],
        num_calibration_samples=2,
        processor=tiny.tokenizer,
    )
    tiny.model.save_pretrained(str(root / "vlm"), save_compressed=True)
    tiny.tokenizer.save_pretrained(str(root / "vlm"))
    return resave_language_model(root / "vlm", root / "text")


def hf_reference(path: str | Path, prompts=PROMPTS, max_tokens: int = MAX_TOKENS) -> list[dict]:
    """Greedy tokens and top-5 logprobs of the transformers runtime (fp32, every step
    recomputed from the whole sequence)."""
    import torch
    from transformers import AutoModelForCausalLM

    import splitq_modifier  # noqa: F401  (the splitq-packed loader)

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids, tokens, logprobs = list(prompt), [], []
            for _ in range(max_tokens):
                logits = model(torch.tensor([ids])).logits[0, -1].float()
                lp = torch.log_softmax(logits, -1)
                values, idx = lp.topk(TOP)
                logprobs.append({int(i): float(v) for i, v in zip(idx, values)})
                tokens.append(int(logits.argmax()))
                ids.append(tokens[-1])
            out.append({"tokens": tokens, "logprobs": logprobs})
    return out


def compare(ref: list[dict], got: list[dict]) -> dict:
    """Tokens equal? Same top-5 ids? Max |logprob difference| over them."""
    tokens_equal = [r["tokens"] == g["tokens"] for r, g in zip(ref, got)]
    same_ids, worst = True, 0.0
    for r, g in zip(ref, got):
        for lr, lg in zip(r["logprobs"], g["logprobs"]):
            lg = {int(k): v for k, v in lg.items()}
            if set(lr) != set(lg):
                same_ids = False
                continue
            worst = max(worst, *(abs(lr[k] - lg[k]) for k in lr))
    return {"tokens_equal": all(tokens_equal) and len(ref) == len(got),
            "top5_ids_equal": same_ids, "max_abs_dlogprob": worst}  # fmt: skip


# ------------------------------------------------------------------------------ vLLM side
def vllm_python(build: bool = True) -> str:
    """The vLLM environment's python: ``.ci/vllm-env`` builds it once (a few minutes) and
    reuses it after; with ``build=False`` only an existing environment is used."""
    cmd = ["bash", str(ROOT / ".ci" / "vllm-env")] + ([] if build else ["--check"])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip()[-3000:])
    return proc.stdout.strip().splitlines()[-1]


def plugin_overlay(python: str, dst: str | Path) -> Path:
    """Install this checkout (no dependencies) into ``dst`` for the vLLM environment: put
    ``dst`` on ``PYTHONPATH`` and vLLM finds the plugin's entry point there. Built from a
    copy of the package sources, so nothing is written into the checkout."""
    dst = Path(dst)
    tmp = Path(tempfile.mkdtemp(prefix="splitq_build_"))
    try:
        src = tmp / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(ROOT / name, src / name)
        skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
        for name in ("src", "kernels"):
            shutil.copytree(ROOT / name, src / name, ignore=skip)
        subprocess.run(
            [python, "-m", "pip", "install", "-qq", "--no-deps", "--no-build-isolation",
             "--target", str(dst), str(src)],
            check=True, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp)},
        )  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def vllm_env(overlay: str | Path | None, multiprocessing: bool = True, tp: int = 1) -> dict:
    """Environment of a vLLM worker process on this CPU machine."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(
        VLLM_TARGET_DEVICE="cpu",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocessing else "0",
        # the compile cache would let a later run skip compiling (and reuse a stale graph)
        VLLM_DISABLE_COMPILE_CACHE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    if tp > 1:
        # one core per worker: vLLM's automatic binding wants one NUMA node per rank
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % (os.cpu_count() or 1))
                                                    for i in range(tp))  # fmt: skip
    if overlay is not None:
        env["PYTHONPATH"] = str(overlay)
    return env


def run_worker(python: str, args: list[str], env: dict, timeout: int = 600) -> dict:
    """Run ``vllm_engine_worker.py ARGS`` with the vLLM python; its ``RESULT`` line, plus
    ``wall_s``; raise with the output tail if it failed."""
    t0 = time.time()
    proc = subprocess.run([python, str(WORKER), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=tempfile.gettempdir())  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout[-2000:] + "\n" + proc.stderr[-6000:]).strip()
        raise RuntimeError(f"vLLM worker {args[:1]} failed (rc {proc.returncode}):\n{tail}")
    res = json.loads(lines[-1][len("RESULT") :])
    res["wall_s"] = time.time() - t0
    return res


def engine_args(path: str | Path, mode: str) -> tuple[list[str], bool, int]:
    """Worker arguments of an engine run in ``mode`` (see :data:`MODES`)."""
    mp, eager, tp = MODES[mode]
    args = ["engine", str(path), "--tp", str(tp), "--max-tokens", str(MAX_TOKENS),
            "--prompts", json.dumps(PROMPTS)]  # fmt: skip
    if eager:
        args.append("--eager")
    return args, mp, tp


# ------------------------------------------------------------------------------ CLI
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--workdir", default=None, help="keep the checkpoint here")
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--json", default=None, help="write the rows here")
    a = ap.parse_args()

    work = Path(a.workdir or tempfile.mkdtemp(prefix="splitq_vllm_"))
    t0 = time.time()
    python = vllm_python()
    t_env = time.time() - t0
    t0 = time.time()
    path = work / "text" if (work / "text" / "config.json").exists() else make_checkpoint(work)
    t_ckpt = time.time() - t0
    t0 = time.time()
    ref = hf_reference(path)
    t_ref = time.time() - t0
    t0 = time.time()
    overlay = plugin_overlay(python, work / "plugin")
    t_overlay = time.time() - t0
    print(f"vLLM env {t_env:.1f}s, checkpoint {t_ckpt:.1f}s, transformers reference "
          f"{t_ref:.1f}s, plugin install {t_overlay:.1f}s")  # fmt: skip

    stock = run_worker(python, ["stock", str(path)], vllm_env(None, multiprocessing=False))
    print(f"stock vLLM ({stock['wall_s']:.1f}s): {stock['error']}")
    rows = [{"mode": "stock", **stock}]
    print(f"{'mode':<18}{'wall s':>8}{'start s':>9}{'gen s':>7}  tokens  top5  max|dlogprob|")
    for mode in a.modes:
        args, mp, tp = engine_args(path, mode)
        res = run_worker(python, args, vllm_env(overlay, mp, tp))
        cmp = compare(ref, res["outputs"])
        ok = cmp["tokens_equal"] and cmp["top5_ids_equal"] and cmp["max_abs_dlogprob"] <= a.atol
        print(f"{mode:<18}{res['wall_s']:>8.1f}{res['start_s']:>9.1f}{res['gen_s']:>7.1f}  "
              f"{str(cmp['tokens_equal']):<6}  {str(cmp['top5_ids_equal']):<4}  "
              f"{cmp['max_abs_dlogprob']:.2e} {'ok' if ok else 'FAIL'}")  # fmt: skip
        rows.append({"mode": mode, **{k: v for k, v in res.items() if k != "outputs"}, **cmp})
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
