"""SplitQ at real widths: layout, per-layer calibration cost, MOCD selection speed.

    python benchmarks/scale.py --layout                     # every model of the width table
    python benchmarks/scale.py --calib --model Qwen2.5-VL-3B --samples 8 --tokens 128
    python benchmarks/scale.py --mocd --d 18944 --text-tokens 4096

1. ``--layout``: per site of each model in :data:`splitq_modifier.widths.REAL_MODELS`, the
   realised path widths, Kronecker factor shapes and the online transform's share of the
   site's linear MACs (:func:`splitq_modifier.layout.plan_site`).
2. ``--calib``: one decoder layer at the model's widths (random weights, planted outliers,
   tiny vision tower), ``samples`` calibration samples of about ``tokens`` tokens, calibrated
   by ``oneshot`` with SplitQ, the FlatQuant-style base (SplitQ without channel split and
   branches) and GPTQ, each in a fresh process, same data: wall seconds of ``oneshot`` and
   peak RSS, as ratios. SplitQ also runs at half the widths, and the two peaks give a measured
   memory slope per layer weight, projected to Qwen2.5-VL-7B and -72B layers (plus the layer
   cache of 128 samples x 1024 tokens, on the GPU or offloaded with ``cache_device: cpu``).
3. ``--mocd``: :mod:`benchmarks.mocd_speed` (MOCD selection vs a per-channel scikit-learn
   KMeans loop, Jaccard of the selections).

Only CPU here: seconds are on this machine's cores, memory is fp32 calibration on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from splitq_modifier.layout import plan_site
from splitq_modifier.widths import REAL_MODELS, ModelWidths, site_widths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------- layout
def layout_table(names: list[str]) -> None:
    """Print the realised layout of every site of the named models."""
    print(f"{'model':<22}{'site':<10}{'d':>7}{'paths v/t/m':>20}  {'factors (v | t | m)':<34}"
          f"{'cost':>7}")  # fmt: skip
    for name in names:
        for site, (d, outs) in site_widths(REAL_MODELS[name]).items():
            p = plan_site(d, outs, 0.02, 0.02)
            fac = " | ".join("x".join(map(str, f)) or "-" for f in p.dims)
            sizes = "/".join(map(str, p.sizes))
            print(f"{name:<22}{site:<10}{d:>7}{sizes:>20}  {fac:<34}{p.cost:>7.2%}")


# ------------------------------------------------------------------------------ calibration
def _worker(args: argparse.Namespace) -> None:
    """One oneshot run in this process; prints a JSON line."""
    import torch
    from llmcompressor import oneshot

    from splitq_modifier import SplitQModifier
    from splitq_modifier.testing.tiny import (
        build_tiny_vlm,
        calibration_dataset,
        collate,
        synthetic_samples,
    )

    sys.path.insert(0, ROOT)
    from benchmarks.fidelity import recipe_gptq

    torch.manual_seed(0)
    hidden, inter, heads, kv = args.widths
    tiny = build_tiny_vlm("qwen2_5_vl", hidden=hidden, layers=1, intermediate=inter,
                          heads=heads, kv_heads=kv, outliers=8)  # fmt: skip
    ds = calibration_dataset(synthetic_samples(tiny, args.samples, seq_text=args.tokens - 6))
    kw = dict(epochs=args.epochs, cache_device=args.cache_device)
    recipe = {
        "splitq": lambda: [SplitQModifier(**kw)],
        "base": lambda: [
            SplitQModifier(channel_selection="none", cws_rank_ratio=0.0, mac_rank_ratio=0.0, **kw)
        ],  # fmt: skip
        "gptq": lambda: recipe_gptq(4, 4),
    }[args.worker]()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    oneshot(model=tiny.model, dataset=ds, data_collator=collate, recipe=recipe,
            num_calibration_samples=args.samples, processor=tiny.tokenizer)  # fmt: skip
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    q, kvw = heads * (hidden // heads), kv * (hidden // heads)
    params = hidden * (q + 2 * kvw) + q * hidden + 3 * hidden * inter  # the layer's weights
    print("RESULT" + json.dumps({"seconds": seconds, "peak": peak, "before": base_rss,
                                 "params": params}))  # fmt: skip


def _run(method: str, widths: tuple[int, ...], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method,
           "--widths", *map(str, widths), "--samples", str(args.samples),
           "--tokens", str(args.tokens), "--epochs", str(args.epochs)]  # fmt: skip
    if args.cache_device:
        cmd += ["--cache-device", args.cache_device]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{method} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT") :])


def _widths(m: ModelWidths, scale: float = 1.0) -> tuple[int, int, int, int]:
    """(hidden, intermediate, heads, kv heads) of ``m`` scaled by ``scale`` (head dim 128)."""
    hidden = max(128, round(m.hidden * scale / 128) * 128)
    kv = max(1, round(m.kv_out // 128 * scale))
    return hidden, round(m.intermediate * scale / 64) * 64, hidden // 128, kv


def calibration(args: argparse.Namespace) -> None:
    """Per-layer calibration time and peak memory: SplitQ vs base vs GPTQ, same data."""
    m = REAL_MODELS[args.model]
    if m.q_out != m.hidden:
        raise SystemExit(f"{m.name}: the tiny builder needs q_out == hidden; pick another model")
    full = _widths(m)
    print(
        f"one decoder layer at {m.name} widths (hidden, intermediate, heads, kv heads) = "
        f"{full}, {args.samples} samples x ~{args.tokens} tokens, {args.epochs} epoch(s)"
    )
    res = {meth: _run(meth, full, args) for meth in ("splitq", "base", "gptq")}
    gb = 1e9
    print(f"\n{'method':<10}{'oneshot s':>11}{'peak RSS GB':>13}{'RSS before GB':>15}"
          f"{'time / base':>13}{'peak / base':>13}")  # fmt: skip
    for meth, r in res.items():
        print(f"{meth:<10}{r['seconds']:>11.1f}{r['peak'] / gb:>13.2f}{r['before'] / gb:>15.2f}"
              f"{r['seconds'] / res['base']['seconds']:>13.2f}"
              f"{r['peak'] / res['base']['peak']:>13.2f}")  # fmt: skip
    half = _widths(m, 0.5)
    small = _run("splitq", half, args)
    big = res["splitq"]
    slope = (big["peak"] - small["peak"]) / max(big["params"] - small["params"], 1)
    print(
        f"\nSplitQ peak RSS at half widths {half}: {small['peak'] / gb:.2f} GB; measured "
        f"slope {slope:.1f} bytes of calibration memory per model weight (fp32 on CPU)"
    )
    for name in ("Qwen2.5-VL-7B", "Qwen2.5-VL-72B"):
        w = REAL_MODELS[name]
        layer = w.params_per_layer() * slope
        cache = 128 * 1024 * w.hidden * 4 * 2  # fp32 inputs + targets of one layer
        print(
            f"projected for one {name} layer on a GPU: {layer / gb:.1f} GB working memory "
            f"+ {cache / gb:.1f} GB layer cache (128 x 1024 tokens; ~0 on the GPU with "
            "cache_device: cpu)"
        )


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layout", action="store_true")
    ap.add_argument("--calib", action="store_true")
    ap.add_argument("--mocd", action="store_true")
    ap.add_argument("--model", default="Qwen2.5-VL-3B")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--cache-device", default=None)
    ap.add_argument("--d", type=int, default=18944)
    ap.add_argument("--text-tokens", type=int, default=4096)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--widths", type=int, nargs=4, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args)
    if not (args.layout or args.calib or args.mocd):
        args.layout = args.calib = args.mocd = True
    if args.layout:
        layout_table(list(REAL_MODELS))
    if args.calib:
        calibration(args)
    if args.mocd:
        sys.path.insert(0, ROOT)
        from benchmarks import mocd_speed

        mocd_speed.main(["--d", str(args.d), "--tokens", str(args.text_tokens)])


if __name__ == "__main__":
    main()
