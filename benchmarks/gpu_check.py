"""One command for the first GPU: check both site kernels and the op against the torch
reference at every site of Qwen2.5-VL-7B, time them against bf16, write one JSON.

    python benchmarks/gpu_check.py                      # on a CUDA GPU (H100 / H200)
    python benchmarks/gpu_check.py --tiny               # CPU, Triton's interpreter, tiny widths

Phases (GPU):

1. **checks**, one worker process per (site, token count) at 1, 16 and 2048 tokens, run in
   parallel (``--jobs``): their Triton compiles fill the cache that phase 2 reuses. Each
   checks, against the torch reference (``splitq_modifier.runtime.reference``) on CUDA:

   * kernel A (``site_quantize_triton``) against ``site_quantize_reference`` of the fp32
     reference transform: per path, activation codes within +-1 and at most 1e-3 of them
     different; the main path's quantization MSE within 1 % of the reference's; the branch
     hidden codes ``hq``/``gq`` are reported (not judged: one flipped input code moves them);
   * kernel B (``site_gemm_triton``) on the reference's codes: fp32 output within 1e-6 of
     ``site_gemm_reference`` (relative to its largest value);
   * the op (``site_linear_triton``, bf16): within bf16 rounding (1.6e-2 of the largest
     value) of ``site_gemm_reference`` of the kernels' own codes, and within 5e-2 of the
     full reference.

2. **timings** in this process, alone on the GPU: kernel A, kernel B, the op and the site's
   bf16 linears (separate GEMMs, as in Hugging Face models) per site, and a decoder layer
   (``benchmarks/kernel.py``'s ``Layer``: linears only, and the full layer with RMSNorm, SDPA
   attention, SiLU gate and residuals), SplitQ vs bf16, at 1, 16, 2048 and 8192 tokens; CUDA
   graphs (``triton.testing.do_bench_cudagraph``) at 1-16 tokens, ``do_bench`` above.

Writes ``docs/results/gpu_check_<card>.json`` (or ``--out``): the card's name, versions,
every check with its numbers and verdict, every timing, errors (a kernel that fails to
compile or run is recorded, and the rest goes on), and each phase's duration.

Imports: only ``splitq_modifier``'s runtime, kernels and testing helpers, without the
package's library integrations (:func:`_import_runtime_only`): no compressed-tensors,
transformers or llm-compressor import, so the device image's transformers version does not
matter. Beyond the image (torch, Triton) it needs ``loguru`` (``splitq_modifier.layout``):
``bash benchmarks/gpu_wheels.sh`` downloads it (and the wheels of a full ``import
splitq_modifier``) into ``wheels/``; install on the device with
``pip install --no-deps --no-index wheels/*.whl``.

``--tiny``: the same phases on CPU under Triton's interpreter, at tiny widths (hidden 64),
checks in this process, one timed run per case (a test runs it end to end).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _import_runtime_only() -> None:
    """Make ``splitq_modifier`` importable without running its ``__init__`` (which checks and
    patches compressed-tensors, transformers and llm-compressor): a bare package module whose
    subpackages (runtime, kernels, testing) import as usual. Works from an installed package
    or from this repository (``src/`` and ``kernels/``)."""
    if "splitq_modifier" in sys.modules:
        return
    import importlib.util
    import types

    spec = importlib.util.find_spec("splitq_modifier")
    if spec is None:
        sys.path.insert(0, str(ROOT / "src"))
        spec = importlib.util.find_spec("splitq_modifier")
    pkg = types.ModuleType("splitq_modifier")
    pkg.__path__ = list(spec.submodule_search_locations)
    if (ROOT / "kernels" / "__init__.py").exists():  # splitq_modifier.kernels from the repo
        pkg.__path__.append(str(ROOT))
    pkg.__spec__ = spec
    pkg.__file__ = spec.origin
    sys.modules["splitq_modifier"] = pkg
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # benchmarks.kernel


def _setup(tiny: bool) -> None:
    if tiny:  # the kernels run in Triton's interpreter: set before they are imported
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["SPLITQ_TRITON_INTERPRET"] = "1"
    _import_runtime_only()


# --------------------------------------------------------------------------------------------
# Sites
# --------------------------------------------------------------------------------------------
CHECK_TOKENS = (1, 16, 2048)
TIME_TOKENS = (1, 16, 2048, 8192)
TINY_CHECK_TOKENS = (1, 17)  # decode and the smallest prefill configuration
TINY_TIME_TOKENS = (17,)
#: Code agreement of kernel A with the reference (issue 18's contract).
MAX_CODE_DIFF, MAX_FLIP_RATE, MSE_TOL = 1, 1e-3, 0.01
GEMM_TOL, OP_TOL_OWN, OP_TOL_REF = 1e-6, 1.6e-2, 5e-2


def model_widths(tiny: bool):
    from splitq_modifier.widths import REAL_MODELS, ModelWidths

    if tiny:
        return ModelWidths("tiny", "qwen2_5_vl", 64, 160, 64, 32, 1)
    return REAL_MODELS["Qwen2.5-VL-7B"]


def site_specs(tiny: bool) -> list:
    """The four sites of one decoder layer, W4A4 with the recipe defaults
    (``benchmarks/kernel.py``'s ``layer_sites``)."""
    from benchmarks.kernel import layer_sites

    return layer_sites(model_widths(tiny), 4, 4)


def site_params(s, device, seed: int = 0):
    """Random parameters of site spec ``s`` (``random_site_params``)."""
    import torch

    from splitq_modifier.testing.sites import random_site_params

    p = random_site_params(s.out_splits, s.sizes, s.dims, s.w_bits, s.a_bits,
                           s.cws or 0, s.mac or 0, 0, s.bias, "cpu", seed,
                           s.branch_bits)  # fmt: skip
    return p.to(torch.device(device))


def site_input(n: int, d: int, device, seed: int = 1):
    """bf16 input with a few outlier channels, and the text mask (half the tokens above 16
    tokens, none at decode sizes)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) * 2
    x[:, torch.randperm(d, generator=gen)[: max(1, d // 200)]] *= 15
    x = x.to(device=device, dtype=torch.bfloat16)
    mask = (torch.arange(n, device=device) >= n // 2) if n > 16 else None
    return x, mask


# --------------------------------------------------------------------------------------------
# Phase 1: checks
# --------------------------------------------------------------------------------------------
def _codes(got, want) -> dict:
    d = (got.int() - want.int()).abs()
    n = d.numel()
    return {"max_diff": int(d.max()) if n else 0, "flip_rate": float((d != 0).sum()) / max(n, 1)}


def check_site(s, n: int, device) -> dict:
    """Every check of one site at ``n`` tokens (see the module doc)."""
    import torch
    from splitq_modifier.kernels import site_gemm_triton, site_linear_triton, site_quantize_triton

    from splitq_modifier.runtime import (
        site_gemm_reference,
        site_linear_reference,
        site_quantize_reference,
        site_transform_reference,
    )

    rec = {"site": s.name, "tokens": n, "errors": {}}
    p = site_params(s, device)
    x, mask = site_input(n, p.d_in, device)
    xt = site_transform_reference(x, p)
    ref = site_quantize_reference(xt, p)
    b = p.bounds
    got = None
    try:
        got = site_quantize_triton(x, p)
        paths = {}
        ok = True
        for i, name in enumerate(("vision", "text", "main")):
            if b[i + 1] == b[i]:
                continue
            st = _codes(got["qx"][:, b[i] : b[i + 1]], ref["qx"][:, b[i] : b[i + 1]])
            st["bits"] = int(p.a_bits[i])
            ok &= st["max_diff"] <= MAX_CODE_DIFF and st["flip_rate"] <= MAX_FLIP_RATE
            paths[name] = st
        xm = xt[:, b[2] : b[3]]

        def mse(acts) -> float:
            deq = acts["qx"][:, b[2] : b[3]].float() * acts["sx"][:, 2:3]
            return float(((deq - xm) ** 2).mean())

        m_got, m_ref = mse(got), mse(ref)
        ratio = m_got / m_ref if m_ref > 0 else 1.0
        ok &= abs(ratio - 1.0) <= MSE_TOL
        branches = {k: _codes(got[k], ref[k]) for k in ("hq", "gq") if ref.get(k) is not None}
        rec["kernel_a"] = {"paths": paths, "main_mse_ratio": ratio, "branches": branches,
                           "pass": bool(ok)}  # fmt: skip
    except Exception as e:  # recorded, the other checks go on
        rec["errors"]["kernel_a"] = f"{type(e).__name__}: {e}"[:2000]
    try:
        y = site_gemm_triton(ref, p, mask, torch.float32)
        y_ref = site_gemm_reference(ref, p, mask, None)
        rel = float((y - y_ref).abs().max() / y_ref.abs().max())
        rec["kernel_b"] = {"rel_err": rel, "pass": rel <= GEMM_TOL}
    except Exception as e:
        rec["errors"]["kernel_b"] = f"{type(e).__name__}: {e}"[:2000]
    try:
        y = site_linear_triton(x, p, mask).float()
        full = site_linear_reference(x, p, mask).float()
        scale = float(full.abs().max())
        rel_ref = float((y - full).abs().max()) / scale
        rec["op"] = {"rel_err_ref": rel_ref}
        ok = rel_ref <= OP_TOL_REF
        if got is not None:
            own = site_gemm_reference(got, p, mask, torch.bfloat16).float()
            rel_own = float((y - own).abs().max()) / float(own.abs().max())
            rec["op"]["rel_err_own_codes"] = rel_own
            ok &= rel_own <= OP_TOL_OWN
        rec["op"]["pass"] = bool(ok)
    except Exception as e:
        rec["errors"]["op"] = f"{type(e).__name__}: {e}"[:2000]
    if device != "cpu":
        torch.cuda.synchronize()
    return rec


def run_checks(tiny: bool, jobs: int, tokens) -> list[dict]:
    """Phase 1: in worker processes (GPU) or in this process (``--tiny``)."""
    specs = site_specs(tiny)
    cases = [(s.name, n) for n in tokens for s in specs]
    if tiny or jobs <= 0:
        by_name = {s.name: s for s in specs}
        dev = "cpu" if tiny else "cuda"
        return [check_site(by_name[name], n, dev) for name, n in cases]
    import tempfile

    out, running, todo = [], [], list(cases)
    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    while todo or running:
        while todo and len(running) < jobs:
            name, n = todo.pop(0)
            path = os.path.join(tmp, f"{name}_{n}.json")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", f"{name}:{n}",
                   "--out", path]  # fmt: skip
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)  # fmt: skip
            running.append((proc, name, n, path, time.time()))
        time.sleep(0.5)
        for item in list(running):
            proc, name, n, path, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log = proc.stdout.read()
            if proc.returncode == 0 and os.path.exists(path):
                rec = json.load(open(path))
            else:
                rec = {"site": name, "tokens": n, "errors": {"worker": log[-3000:]}}
            rec["worker_s"] = round(time.time() - t0, 1)
            print(f"  checked {name} at {n} tokens ({rec['worker_s']} s): "
                  f"{_verdict(rec)}", flush=True)  # fmt: skip
            out.append(rec)
    return out


def _verdict(rec: dict) -> str:
    parts = []
    for k in ("kernel_a", "kernel_b", "op"):
        if k in rec:
            parts.append(f"{k} {'ok' if rec[k]['pass'] else 'FAIL'}")
        elif k in rec.get("errors", {}):
            parts.append(f"{k} ERROR")
    if "worker" in rec.get("errors", {}):
        parts.append("worker ERROR")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# Phase 2: timings
# --------------------------------------------------------------------------------------------
def _bench(fn, n: int, tiny: bool) -> float:
    """Milliseconds per call: CUDA graphs at 1-16 tokens, ``do_bench`` above; ``--tiny``: one
    timed call (interpreter, not a speed)."""
    if tiny:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import torch
    import triton.testing

    fn()
    torch.cuda.synchronize()
    if n <= 16:
        return float(triton.testing.do_bench_cudagraph(fn, rep=50))
    return float(triton.testing.do_bench(fn, warmup=10, rep=50))


def _timed(rows: list, errors: list, what: dict, fn, n: int, tiny: bool) -> None:
    try:
        rows.append({**what, "ms": _bench(fn, n, tiny)})
    except Exception as e:
        errors.append({**what, "error": f"{type(e).__name__}: {e}"[:2000]})


def run_timings(tiny: bool, tokens) -> dict:
    """Phase 2: per-site kernels and the decoder layer vs bf16."""
    import torch
    import torch.nn.functional as F
    from splitq_modifier.kernels import site_gemm_triton, site_linear_triton, site_quantize_triton

    from benchmarks.kernel import Layer
    from splitq_modifier.runtime import site_quantize_reference, site_transform_reference

    dev = "cpu" if tiny else "cuda"
    specs = site_specs(tiny)
    params = {s.name: site_params(s, dev) for s in specs}
    rows, errors = [], []
    gen = torch.Generator().manual_seed(3)
    for s in specs:
        p = params[s.name]
        ws = [(torch.randn(o, s.d, generator=gen) * s.d**-0.5).to(dev, torch.bfloat16)
              for o in s.out_splits]  # fmt: skip
        for n in tokens:
            x, mask = site_input(n, p.d_in, dev)
            try:
                acts = site_quantize_triton(x, p)
            except Exception:  # kernel A failed (recorded below): time B on reference codes
                acts = site_quantize_reference(site_transform_reference(x, p), p)
            base = {"site": s.name, "tokens": n}
            _timed(rows, errors, {**base, "what": "kernel A"},
                   lambda x=x, p=p: site_quantize_triton(x, p), n, tiny)  # fmt: skip
            _timed(rows, errors, {**base, "what": "kernel B"},
                   lambda a=acts, p=p, m=mask: site_gemm_triton(a, p, m, torch.bfloat16), n,
                   tiny)  # fmt: skip
            _timed(rows, errors, {**base, "what": "op"},
                   lambda x=x, p=p, m=mask: site_linear_triton(x, p, m), n, tiny)  # fmt: skip
            _timed(rows, errors, {**base, "what": "bf16 linears"},
                   lambda x=x, ws=ws: [F.linear(x, w) for w in ws], n, tiny)  # fmt: skip
        del ws
    m = model_widths(tiny)
    sq = Layer(m, specs, dev, splitq=True, params=params)
    bf = Layer(m, specs, dev, splitq=False)
    layer = []
    for n in tokens:
        h = torch.randn(n, m.hidden, generator=gen).to(dev, torch.bfloat16)
        mask = (torch.arange(n, device=dev) >= n // 2) if n > 16 else None
        for name, lay in (("splitq", sq), ("bf16", bf)):
            base = {"layer": name, "tokens": n}
            _timed(layer, errors, {**base, "what": "linears only"},
                   lambda lay=lay, h=h, mask=mask: lay.sites_only(h, mask), n, tiny)  # fmt: skip
            _timed(layer, errors, {**base, "what": "full layer"},
                   lambda lay=lay, h=h, mask=mask: lay(h, mask), n, tiny)  # fmt: skip
        if not tiny:
            torch.cuda.empty_cache()
    return {"sites": rows, "layer": layer, "errors": errors, "ratios": _ratios(rows, layer)}


def _ratios(rows: list, layer: list) -> list[dict]:
    """bf16 time / SplitQ time per site and for the layer (above 1: SplitQ faster)."""
    out = []
    t = {(r["site"], r["tokens"], r["what"]): r["ms"] for r in rows}
    for (site, n, what), ms in t.items():
        if what == "op" and (site, n, "bf16 linears") in t:
            out.append({"site": site, "tokens": n, "bf16/op": t[(site, n, "bf16 linears")] / ms})
    lt = {(r["layer"], r["tokens"], r["what"]): r["ms"] for r in layer}
    for (name, n, what), ms in lt.items():
        if name == "splitq" and ("bf16", n, what) in lt:
            out.append({"layer": what, "tokens": n, "bf16/splitq": lt[("bf16", n, what)] / ms})
    return out


# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run the phases and write the JSON (see the module doc)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU interpreter, tiny widths")
    ap.add_argument("--out", default=None, help="JSON path")
    ap.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1),
                    help="check workers in parallel (GPU)")  # fmt: skip
    ap.add_argument("--check-tokens", nargs="+", type=int, default=None)
    ap.add_argument("--time-tokens", nargs="+", type=int, default=None)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "site:tokens"
    args = ap.parse_args(argv)
    _setup(args.tiny)
    import torch

    if args.worker:  # one check in a worker process (phase 1 on a GPU)
        name, n = args.worker.split(":")
        spec = {s.name: s for s in site_specs(args.tiny)}[name]
        rec = check_site(spec, int(n), "cpu" if args.tiny else "cuda")
        with open(args.out, "w") as f:
            json.dump(rec, f)
        return 0
    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA GPU: run with --tiny for the CPU interpreter version")
        return 2
    import triton

    t_start = time.time()
    card = "CPU (Triton interpreter)" if args.tiny else torch.cuda.get_device_name()
    check_tokens = args.check_tokens or (TINY_CHECK_TOKENS if args.tiny else CHECK_TOKENS)
    time_tokens = args.time_tokens or (TINY_TIME_TOKENS if args.tiny else TIME_TOKENS)
    result = {"card": card, "torch": torch.__version__, "triton": triton.__version__,
              "python": sys.version.split()[0], "model": model_widths(args.tiny).name,
              "bits": "W4A4", "check_tokens": list(check_tokens),
              "time_tokens": list(time_tokens), "phases_s": {}}  # fmt: skip
    print(f"gpu_check on {card}: checks at {list(check_tokens)} tokens "
          f"({args.jobs} workers)", flush=True)  # fmt: skip
    t0 = time.time()
    result["checks"] = run_checks(args.tiny, args.jobs, check_tokens)
    result["phases_s"]["checks"] = round(time.time() - t0, 1)
    result["all_checks_pass"] = all(
        not r.get("errors") and all(r[k]["pass"] for k in ("kernel_a", "kernel_b", "op"))
        for r in result["checks"]
    )
    if not args.no_timing:
        print(f"timings at {list(time_tokens)} tokens", flush=True)
        t0 = time.time()
        result["timings"] = run_timings(args.tiny, time_tokens)
        result["phases_s"]["timings"] = round(time.time() - t0, 1)
    result["phases_s"]["total"] = round(time.time() - t_start, 1)
    safe = "".join(c if c.isalnum() else "_" for c in card).strip("_")
    out = args.out or str(ROOT / "docs" / "results" / f"gpu_check_{safe}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"checks {'all pass' if result['all_checks_pass'] else 'FAILED (see JSON)'}; "
          f"{result['phases_s']}; wrote {out}")  # fmt: skip
    for r in result.get("timings", {}).get("ratios", []):
        if "layer" in r:
            print(f"  layer {r['layer']} at {r['tokens']} tokens: bf16/SplitQ "
                  f"{r['bf16/splitq']:.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
