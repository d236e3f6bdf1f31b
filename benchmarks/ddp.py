"""Data-parallel SplitQ calibration on CPU: wall time of 1 vs 2 ranks, peak memory per rank.

    python benchmarks/ddp.py                       # 32 samples, tiny LLaVA (hidden 256, 2 layers)
    python benchmarks/ddp.py --samples 64 --hidden 512

Each configuration runs ``oneshot`` with SplitQ under ``torch.distributed.run`` (gloo) on the
same total data (the same ``Dataset`` passed to every rank; SplitQ gives each rank its share),
with the layer cache on the calibration device or offloaded (``cache_device: cpu``). Prints
wall seconds, the speedup of 2 ranks over 1, and each rank's peak RSS. On a CPU-only machine
the calibration device *is* the CPU, so offloading the cache moves nothing; the script prints
the cache's size so the GPU memory it frees there can be read off.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args: argparse.Namespace) -> None:
    """One rank: build the tiny model, calibrate, write a JSON line of measurements."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    torch.set_num_threads(1)
    from llmcompressor import oneshot

    from splitq_modifier import SplitQModifier
    from splitq_modifier.testing.tiny import (
        build_tiny_vlm,
        calibration_dataset,
        collate,
        synthetic_samples,
    )

    rank = dist.get_rank()
    path = os.path.join(args.root, "fp")
    tiny = build_tiny_vlm("llava", hidden=args.hidden, layers=args.layers, path=path)
    dist.barrier()
    ds = calibration_dataset(synthetic_samples(tiny, args.samples, seq_text=args.tokens))
    mod = SplitQModifier(epochs=args.epochs, cache_device=args.cache_device)
    dist.barrier()
    t = time.perf_counter()
    oneshot(model=tiny.model, dataset=ds, data_collator=collate, recipe=[mod],
            num_calibration_samples=args.samples, processor=tiny.tokenizer)  # fmt: skip
    dist.barrier()
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"rank": rank, "seconds": seconds, "peak": peak}
    with open(os.path.join(args.root, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


def run(nproc: int, cache_device: str | None, args: argparse.Namespace) -> list[dict]:
    """Launch ``nproc`` ranks; return their measurements."""
    root = tempfile.mkdtemp(prefix="splitq_ddp_")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(29500 + nproc + (7 if cache_device else 0)),
           os.path.abspath(__file__), "--worker", "--root", root,
           "--samples", str(args.samples), "--tokens", str(args.tokens),
           "--hidden", str(args.hidden), "--layers", str(args.layers),
           "--epochs", str(args.epochs)]  # fmt: skip
    if cache_device:
        cmd += ["--cache-device", cache_device]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-4000:])
    return [json.load(open(os.path.join(root, f"rank{r}.json"))) for r in range(nproc)]


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64, help="text tokens per sample")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--cache-device", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    print(
        f"tiny LLaVA hidden {args.hidden}, {args.layers} layers, {args.samples} samples x "
        f"~{args.tokens + 16} tokens, {args.epochs} epochs, gloo on CPU, 1 thread per rank\n"
    )
    print(f"{'ranks':>5} {'layer cache':>12} {'wall s':>8} {'speedup':>8}  peak RSS per rank (GB)")
    base = None
    for cache in (None, "cpu"):
        for nproc in (1, 2):
            res = run(nproc, cache, args)
            wall = max(r["seconds"] for r in res)
            base = wall if nproc == 1 else base
            peaks = ", ".join(f"{r['peak'] / 1e9:.2f}" for r in res)
            print(f"{nproc:>5} {cache or 'on device':>12} {wall:>8.1f} {base / wall:>7.2f}x  "
                  f"{peaks}")  # fmt: skip
    cache_bytes = args.samples * (args.tokens + 16) * args.hidden * 4 * 2
    print(
        f"\nlayer cache (inputs + targets, fp32): {cache_bytes / 1e6:.1f} MB in all, split "
        "across ranks; on a GPU `cache_device: cpu` keeps it off the device"
    )


if __name__ == "__main__":
    main()
