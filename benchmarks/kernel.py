"""Benchmark one SplitQ linear against torch's bf16 matmul at Qwen2.5-VL-7B shapes.

    python benchmarks/kernel.py                      # W4A4, all shapes and token counts
    python benchmarks/kernel.py --bits W4A4 W3A3 W4A8 --tokens 16 2048

The SplitQ side includes the torch-side online transform of the activation site: gather of the
channels into path order, a dense transform on each outlier path (kv = kt = 2% of d) and a
Kronecker pair on the main path, then ``torch.ops.splitq.linear`` with the CWS (rank 2%) and MAC
(rank 3%) branches and a mixed text/vision mask. In a model the transform is shared by the
linears that read the same site (q/k/v, gate/up), so "op only" is the per-linear cost there.

Bit widths follow DESIGN.md: the outlier paths and the branches use max(b, 4) bits.
Weight bytes: packed codes + scales + branch factors (+ the site transform, counted once per
linear here) against bf16 weights.

Without a CUDA GPU the script says so and times the torch reference path on CPU at small token
counts only (those are reference numbers, not kernel numbers). Never used as a timed test.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from splitq_modifier.runtime import (
    SplitQLinearParams,
    random_splitq_params,
    splitq_linear,
    splitq_linear_reference,
)

HIDDEN, INTERMEDIATE = 3584, 18944
SHAPES = {
    "3584->3584": (HIDDEN, HIDDEN),
    "3584->18944": (HIDDEN, INTERMEDIATE),
    "18944->3584": (INTERMEDIATE, HIDDEN),
}
TOKENS = (1, 16, 512, 2048, 8192)
CPU_TOKENS = (1, 16)


def kron_factors(n: int) -> tuple[int, int]:
    """The two divisors ``a * b = n`` nearest ``sqrt(n)`` (``a <= b``)."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


class OnlineTransform:
    """Gather + per-path transforms of one activation site (random orthogonal factors)."""

    def __init__(self, d: int, kv: int, kt: int, device: torch.device, dtype: torch.dtype):
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.kv, self.kt, self.km = kv, kt, d - kv - kt
        self.a, self.b = kron_factors(self.km)

        def orth(n: int) -> torch.Tensor:
            q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
            return q.to(device=device, dtype=dtype)

        self.perm = torch.randperm(d, generator=gen).to(device)
        self.pv = orth(kv) if kv else None
        self.pt = orth(kt) if kt else None
        self.p1t = orth(self.a).T.contiguous()
        self.p2 = orth(self.b)

    def nbytes(self) -> int:
        ts = [self.perm.to(torch.int32), self.p1t, self.p2] + [
            t for t in (self.pv, self.pt) if t is not None
        ]
        return sum(t.numel() * t.element_size() for t in ts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        xg = x[:, self.perm]
        parts = []
        if self.kv:
            parts.append(xg[:, : self.kv] @ self.pv)
        if self.kt:
            parts.append(xg[:, self.kv : self.kv + self.kt] @ self.pt)
        xm = xg[:, self.kv + self.kt :].reshape(n, self.a, self.b)
        # x (P1 kron P2) == vec(P1^T X P2) for the row-major (a, b) view of x.
        parts.append(torch.matmul(self.p1t, xm).matmul(self.p2).reshape(n, self.km))
        return torch.cat(parts, dim=1)


def parse_bits(s: str) -> tuple[int, int]:
    """``'W4A4'`` -> ``(4, 4)``."""
    m = re.fullmatch(r"[Ww](\d)[Aa](\d)", s)
    if not m:
        raise argparse.ArgumentTypeError(f"bits must look like W4A4, got {s!r}")
    return int(m.group(1)), int(m.group(2))


def build(d_in: int, d_out: int, wb: int, ab: int, device, branches: bool = True):
    """Random SplitQ parameters and site transform at one shape."""
    kv = kt = math.ceil(0.02 * d_in)
    km = d_in - kv - kt
    full_rank = min(d_out, km)
    r1 = math.ceil(0.02 * full_rank) if branches else 0
    r2 = math.ceil(0.03 * full_rank) if branches else 0
    fb_w, fb_a = max(wb, 4), max(ab, 4)
    params = random_splitq_params(
        d_out, (kv, kt, km), (fb_w, fb_w, wb), (fb_a, fb_a, ab), r1, r2,
        (fb_w, fb_a), (fb_w, fb_a), mac_input=0, act_clip=(0.95, 0.95, 0.9), device=device,
    )  # fmt: skip
    transform = OnlineTransform(d_in, kv, kt, device, torch.bfloat16)
    return params, transform, (kv, kt, km, r1, r2)


def bench_gpu(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` on the GPU (triton's do_bench: L2 flushed between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def bench_cpu(fn: Callable[[], object], iters: int = 1) -> float:
    """Median milliseconds of ``fn`` on the CPU (one warm-up run; one timed run by default to
    keep the CPU fallback within a couple of minutes)."""
    fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def check_gpu(device: torch.device) -> str:
    """Kernels vs the torch reference at a small shape before timing (max relative error)."""
    params, transform, _ = build(1024, 512, 4, 4, device)
    x = transform(torch.randn(77, 1024, device=device, dtype=torch.bfloat16))
    mask = torch.arange(77, device=device) % 2 == 0
    y = splitq_linear(x, params, mask)
    sizes, a, w, bb, mi = params.int_args()
    ref = splitq_linear_reference(x, *params.op_args(), mask, None, sizes, a, w, bb, mi)
    err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    status = "ok" if err < 1e-2 else "MISMATCH"
    return f"kernel vs reference (bf16, 77 tokens): max rel err {err:.2e} ({status})"


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--bits",
        nargs="+",
        type=parse_bits,
        default=[(4, 4)],
        help="weight/activation bits of the main path, e.g. W4A4 W3A3 W4A8",
    )
    ap.add_argument("--tokens", nargs="+", type=int, default=None)
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--no-branches", action="store_true", help="leave CWS and MAC out")
    args = ap.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            print("warning: TRITON_INTERPRET=1 is set, the kernels run in the interpreter")
        device = torch.device("cuda")
        dev_name = torch.cuda.get_device_name()
        tokens = args.tokens or TOKENS
        timer = bench_gpu
        print(f"device: {dev_name}")
        print(check_gpu(device))
    else:
        device = torch.device("cpu")
        dev_name = f"CPU ({os.cpu_count()} cores), torch reference path"
        tokens = [t for t in (args.tokens or CPU_TOKENS) if t <= 16] or list(CPU_TOKENS)
        timer = bench_cpu
        print("No CUDA GPU present: timing the torch reference path on CPU at "
              f"{tokens} tokens only (reference numbers, not kernel numbers).")  # fmt: skip

    print()
    print("| shape | tokens | bits | paths kv/kt/km | ranks r1/r2 | bf16 ms | SplitQ ms "
          "| op only ms | time SplitQ/bf16 | weight bytes SplitQ/bf16 | device |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.shapes:
        d_in, d_out = SHAPES[name]
        w_bf16 = torch.randn(d_out, d_in, device=device, dtype=torch.bfloat16) * d_in**-0.5
        for wb, ab in args.bits:
            params: SplitQLinearParams
            params, transform, (kv, kt, km, r1, r2) = build(
                d_in, d_out, wb, ab, device, not args.no_branches
            )
            bytes_ratio = (params.weight_bytes() + transform.nbytes()) / (d_in * d_out * 2)
            for n in tokens:
                x = torch.randn(n, d_in, device=device, dtype=torch.bfloat16)
                mask = torch.arange(n, device=device) >= n // 2  # first half vision
                xt = transform(x)

                t_bf16 = timer(lambda x=x, w=w_bf16: F.linear(x, w))
                t_sq = timer(lambda x=x, m=mask, p=params, tf=transform: splitq_linear(tf(x), p, m))
                t_op = timer(lambda xt=xt, m=mask, p=params: splitq_linear(xt, p, m))
                print(
                    f"| {name} | {n} | W{wb}A{ab} | {kv}/{kt}/{km} | {r1}/{r2} | {t_bf16:.3f} "
                    f"| {t_sq:.3f} | {t_op:.3f} | {t_sq / t_bf16:.2f} | {bytes_ratio:.3f} "
                    f"| {dev_name} |",
                    flush=True,
                )
        if on_gpu:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
