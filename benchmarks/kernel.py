"""SplitQ site kernels vs bf16, per decoder layer at real widths.

    python benchmarks/kernel.py                        # Qwen2.5-VL-7B, W4A4
    python benchmarks/kernel.py --model-only --per-site  # the hardware model (c) alone
    python benchmarks/kernel.py --model Qwen2.5-VL-72B --tokens 1 2048

A decoder layer has four activation sites (attention input q/k/v, attention output o, MLP input
gate/up, MLP down), each one ``torch.ops.splitq.site_linear`` call = kernel A (transform +
quantize + branch down-projections) + kernel B (GEMM over the site's concatenated weights +
branch up-projections + bias). The bf16 layer runs its seven linears as seven GEMMs. Layout and
ranks are the recipe defaults: 2 % outlier paths per modality, CWS rank 2 % and MAC rank 3 % of
each linear's full rank, outlier paths and branches at max(b, 4) bits.

Printed:

(a) launches per layer forward: Triton launches counted by a pre-run hook on the kernels
    (kernel A's K1 and, at decode on a GPU, its split-K K2; kernel B) and the torch ops under
    the four ``splitq::site_linear`` calls (``torch.profiler``), on tiny shapes (under
    Triton's interpreter when there is no GPU), against the bf16 layer's seven GEMMs;
(b) bytes read and written per layer and per token, from the kernels' shapes (weights,
    scales, factors, branch factors, activations, codes, kernel A's ``uq`` and int32 branch
    accumulators, outputs; kernel A's scratch slot stays in L2 and is listed apart), SplitQ vs
    bf16;
(c) the hardware model on H100 and H200 SXM (132 SMs at 1.83 GHz, 3.35 / 4.8 TB/s, 50 MB L2):
    each launch takes ``max(tensor core, ALU issue, memory, L2)``, with the tensor-core and
    instruction counts read from the kernels compiled for sm_90 (``benchmarks/sass.py``, run
    in a subprocess: it needs ptxas/nvdisasm from the triton wheel, no GPU; kernel A's loop
    trips follow its launch geometry at each token count), the grid against 132 SMs, kernel
    B's grouped program order and the busiest SM's L2 traffic; kernel B's main-loop integer
    instructions per 4-bit code; linears-only and full-layer ratios vs bf16 (see
    ``print_model``);
(d) transform precision: quantization codes that flip against an fp64 transform, for fp32
    and for TF32 operands (emulated; fp16 operands flip as many as TF32), on a real-width
    site;
(e) on a GPU only: the measured time of a decoder layer (RMSNorm, the four sites or seven
    bf16 linears, SDPA attention without rotary or KV cache, SiLU-gated MLP, residuals) at
    the model's widths, CUDA graphs for 1-16 tokens, and the card's name. Without a GPU the
    script says so. Ratios are printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import math
import os
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:  # the kernels run under Triton's interpreter: set before they are imported
    os.environ.setdefault("SPLITQ_TRITON_INTERPRET", "1")
    os.environ.setdefault("TRITON_INTERPRET", "1")

from splitq_modifier.acc import branch_rank  # noqa: E402
from splitq_modifier.layout import plan_site  # noqa: E402
from splitq_modifier.runtime import (  # noqa: E402
    SiteParams,
    build_site_params,
    flatten_factor_dims,
    mma_weight_words,
    packed_words,
    quantize_per_token,
    site_linear,
    split_factors,
)
from splitq_modifier.widths import REAL_MODELS, ModelWidths, site_widths  # noqa: E402

TOKENS = (1, 16, 2048, 8192)
SITES = ("attn_in", "attn_out", "mlp_in", "mlp_down")
#: HBM bandwidth (B/s, the datasheets). Both have 132 SMs and the same tensor-core peaks
#: (989 bf16 TFLOP/s, 1979 int8 TOP/s dense): see ``CLOCK_HZ`` and ``MAC_PER_CLK``.
GPUS = {"H100 SXM": {"hbm": 3.35e12}, "H200 SXM": {"hbm": 4.8e12}}


# --------------------------------------------------------------------------------------------
# Site layout at real widths
# --------------------------------------------------------------------------------------------
@dataclass
class SiteSpec:
    """Shapes of one site: path widths, factor sides, linears, branch ranks, bits."""

    name: str
    sizes: tuple[int, int, int]
    dims: tuple[tuple[int, ...], ...]
    out_splits: tuple[int, ...]
    cws: tuple[int, ...]
    mac: tuple[int, ...]
    w_bits: tuple[int, int, int]
    a_bits: tuple[int, int, int]
    branch_bits: tuple[int, int]
    bias: bool

    @property
    def d(self) -> int:
        return sum(self.sizes)

    @property
    def big_d(self) -> int:
        return sum(self.out_splits)


def layer_sites(m: ModelWidths, wb: int, ab: int, branches: bool = True) -> list[SiteSpec]:
    """The four sites of one decoder layer of ``m`` (recipe defaults, see the module doc)."""
    out = []
    fw, fa = max(wb, 4), max(ab, 4)
    for name, (d, outs) in site_widths(m).items():
        plan = plan_site(d, outs, 0.02, 0.02)
        km = plan.sizes[2]
        cws = tuple(branch_rank(0.02, o, km) for o in outs) if branches else ()
        mac = tuple(branch_rank(0.03, o, km) for o in outs) if branches else ()
        bias = name == "attn_in" and m.model_type.startswith("qwen2")  # q/k/v biases
        spec = SiteSpec(name, plan.sizes, plan.dims, tuple(outs), cws, mac, (fw, fw, wb),
                        (fa, fa, ab), (fw, fa), bias)  # fmt: skip
        out.append(spec)
    return out


def build_params(s: SiteSpec, device, seed: int = 0) -> SiteParams:
    """Random site parameters of shape ``s`` (weights quantized and packed on ``device``)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    km = s.sizes[2]

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    def orth(n):
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return q.float().to(device)

    def branch(ranks):
        if not ranks:
            return None
        downs = [rnd(r, km, scale=km**-0.5) for r in ranks]
        ups = [rnd(o, r, scale=0.1 * s.d**-0.5) for o, r in zip(s.out_splits, ranks)]
        return downs, ups

    return build_site_params(
        [rnd(s.big_d, k, scale=s.d**-0.5) for k in s.sizes],
        s.out_splits,
        torch.randperm(s.d, generator=gen).to(device),
        (torch.rand(s.d, generator=gen) + 0.5).to(device),
        [[orth(n) for n in path] for path in s.dims],
        s.w_bits,
        s.a_bits,
        (0.95, 0.95, 0.9),
        branch(s.cws),
        branch(s.mac),
        s.branch_bits,
        0,
        rnd(s.big_d).to(torch.bfloat16) if s.bias else None,
    )


# --------------------------------------------------------------------------------------------
# (b): bytes and FLOPs from the launchers' own tile plans (also the model's memory term)
# --------------------------------------------------------------------------------------------
@dataclass
class KernelCost:
    """One launch: bytes moved and multiply-adds by unit."""

    name: str
    read: int
    write: int
    macs: dict  # unit -> MACs ("bf16", "int8", "fp16", "tf32x3")
    scratch: int = 0  # kernel A: bytes of its on-chip/L2 scratch traffic (not in read/write)
    grid: int = 0  # programs of the launch (0: set by the caller)
    l2_per_program: float = 0.0  # bytes one program moves between L2 and the SM


def _gpu_configs(n: int) -> tuple[dict, dict]:
    """The launchers' GPU block configurations for ``n`` tokens."""
    from splitq_modifier.kernels import site_gemm_config, site_quant_config

    return site_quant_config(n, interpret=False), site_gemm_config(n, interpret=False)


def kernel_a_launches(s: SiteSpec, n: int) -> list[KernelCost]:
    """Kernel A's launches for one site at ``n`` tokens (``kernels/site_quant.py``): K1, and at
    decode K2. HBM bytes: the bf16 input, the first read of ``perm``/``smooth``/factors, the
    branch factors once (K1 at prefill, K2 at decode), and every output (codes, scales, code
    sums, the MAC input codes ``uq`` and the int32 branch accumulators, whose read-backs hit
    L2). ``scratch``: mode-3 paths' slot traffic (Z written, read by two passes, fp16 on a fast
    path; with the MAC the residual written and read in fp32), which stays in L2 (``G``
    slots).
    ``l2_per_program``: the busiest program's L2 <-> SM bytes: ``perm``/``smooth``/factors once
    (L1 across its tokens), the scratch of its tokens, and per block the branch factors and
    the 16-row code tiles of every rank piece (K1 at prefill), or K2's slice of them."""
    from splitq_modifier.kernels.site_quant import (
        site_quant_config,
        site_quant_constexprs,
        site_quant_grid,
    )

    cfg = site_quant_config(max(n, 1), interpret=False)
    kv, kt, km = s.sizes
    d, m = s.d, len(s.out_splits)
    r1, r2 = sum(s.cws), sum(s.mac)
    fd = flatten_factor_dims(s.dims)
    bb = (s.branch_bits[0], s.branch_bits[1], s.branch_bits[0], s.branch_bits[1])
    const = site_quant_constexprs(s.sizes, fd, s.cws or None, s.mac or None, s.a_bits, bb, 0,
                                  cfg, asm=True)  # fmt: skip
    geo = site_quant_grid(max(n, 1), cfg, km, SMS)
    acc_w = const["R1P"] + const["R2P"] + int(bool(r2))
    factors = 4 * sum(k * k for k in fd)
    branch_f = (r1 * (const["W2"] * 4 + 4) if r1 else 0) + (r2 * (const["W4"] * 4 + 4) if r2 else 0)
    read = n * d * 2 + d * 8 + factors + 12
    write = n * (d + 24) + (n * (km + 4) if r2 else 0) + n * acc_w * 4
    out_br = (n * (r1 + 4 * m) if r1 else 0) + (n * (r2 + 4 * m) if r2 else 0)
    per_tok_scr = 0
    for pl in (const["PV"], const["PT"], const["PM"]):
        if pl[2] == 3:  # Z written once, read by two passes (fp16 on a fast path, else fp32)
            per_tok_scr += pl[1] * (2 if pl[15] else 4) * 3
            if pl is const["PM"] and r2:  # the MAC input: fp32, written and read once
                per_tok_scr += pl[1] * 8
    blocks = -(-geo["per_program"] // geo["T"])
    l2_1 = d * 8 + factors + geo["per_program"] * per_tok_scr
    prefill = const["BRANCH"] == 1
    pieces = len(const["PIECES1"]) * bool(r1) + len(const["PIECES2"]) * bool(r2)  # K loops
    if prefill:
        read += branch_f
        write += out_br
        l2_1 += blocks * (branch_f + pieces * 16 * km + 2 * 16 * acc_w * 4)
    k1 = KernelCost(f"{s.name} A", read, write, {}, n * per_tok_scr, geo["G"], l2_1)
    out = [k1]
    if const["BRANCH"] == 2:
        grid2 = geo["S"] * geo["tiles"]
        ks = geo["k_split"]
        l2_2 = branch_f * ks / max(km, 1) + pieces * 16 * ks + 16 * acc_w * 4
        out.append(KernelCost(f"{s.name} A2", branch_f, out_br, {}, 0, grid2, l2_2))
    return out


def site_costs(s: SiteSpec, n: int) -> list[KernelCost]:
    """Kernel A (its launches summed) and kernel B of one site at ``n`` tokens (bf16 input and
    output)."""

    qcfg, gcfg = _gpu_configs(n)
    kv, kt, km = s.sizes
    d, big_d, m = s.d, s.big_d, len(s.out_splits)
    r1, r2 = sum(s.cws), sum(s.mac)
    del qcfg, kv, kt
    la = kernel_a_launches(s, n)
    cost_a = KernelCost(f"{s.name} A", sum(c.read for c in la), sum(c.write for c in la), {},
                        sum(c.scratch for c in la))  # fmt: skip
    # kernel B: path weights in the MMA block packing (whole 64-code blocks), branch
    # up-factors dense, ranks in 32-wide MMA steps
    n_b = math.ceil(n / gcfg["BLOCK_T"]) * gcfg["BLOCK_T"]
    read = sum(big_d * mma_weight_words(k, b) * 4 + big_d * 4 for k, b in zip(s.sizes, s.w_bits))
    for ranks in (s.cws, s.mac):
        if ranks:
            read += big_d * (packed_words(max(ranks), s.branch_bits[0]) * 4 + 4)
    read += big_d * 2 if s.bias else 0
    read += n * (d + 24) + (n * (r1 + 4 * m) if r1 else 0) + (n * (r2 + 4 * m + 1) if r2 else 0)
    write = n * big_d * 2
    up = sum(32 * math.ceil(max(r) / 32) for r in (s.cws, s.mac) if r)
    cost_b = KernelCost(f"{s.name} B", read, write, {"int8": n_b * big_d * (d + up)})
    return [cost_a, cost_b]


def bf16_costs(s: SiteSpec, n: int) -> list[KernelCost]:
    """The site's linears as separate bf16 GEMMs (HF layout: q, k, v apart)."""
    out = []
    for j, o in enumerate(s.out_splits):
        read = n * s.d * 2 + s.d * o * 2 + (o * 2 if s.bias else 0)
        out.append(KernelCost(f"{s.name} bf16 {j}", read, n * o * 2, {"bf16": n * s.d * o}))
    return out


def print_bytes(sites: list[SiteSpec], tokens) -> None:
    print("\n(b) bytes read + written per decoder layer (HBM traffic model from kernel shapes)")
    print("| tokens | SplitQ MB/layer | kernel A scratch MB (L2, not counted) | bf16 MB/layer "
          "| SplitQ/bf16 | SplitQ KB/token | bf16 KB/token |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in tokens:
        costs = [c for s in sites for c in site_costs(s, n)]
        sq = sum(c.read + c.write for c in costs)
        scratch = sum(c.scratch for c in costs)
        bf = sum(c.read + c.write for s in sites for c in bf16_costs(s, n))
        print(f"| {n} | {sq / 1e6:.2f} | {scratch / 1e6:.2f} | {bf / 1e6:.2f} | {sq / bf:.3f} "
              f"| {sq / n / 1e3:.1f} | {bf / n / 1e3:.1f} |")  # fmt: skip
    static = sum(c.read + c.write for s in sites for c in site_costs(s, 0))
    bf_w = sum(c.read + c.write for s in sites for c in bf16_costs(s, 0))
    print(f"(token-independent part: SplitQ weights, scales, factors, branches {static / 1e6:.2f} "
          f"MB; bf16 weights and biases {bf_w / 1e6:.2f} MB)")  # fmt: skip


# --------------------------------------------------------------------------------------------
# (c) the hardware model: max(tensor core, integer/ALU issue, memory) per kernel, grid on SMs
# --------------------------------------------------------------------------------------------
#: One clock for every unit: the datasheet tensor-core peaks (989.4 bf16 TFLOP/s, 1979 int8
#: TOP/s dense) are 2048 bf16 / 4096 int8 multiply-adds per clock per SM x 132 SMs at 1.83 GHz.
#: (The 1.98 GHz maximum boost would make the integer times 7.6 % shorter.)
CLOCK_HZ = 1.83e9
SMS = 132
L2_BYTES = 50e6
#: Tensor-core multiply-adds per clock per SM (dense): int8, bf16/fp16, TF32.
MAC_PER_CLK = {"int8": 4096, "bf16": 2048, "fp8": 4096, "tf32": 1024}
#: Share of the tensor-core peak reached, on both sides: the bf16 GEMMs measured on this
#: workplace's H100 (~798 of 989 TFLOP/s).
TENSOR_EFF = 798 / 989
#: Share of the bf16 peak reached by SDPA (flash) attention, causal, head dim 128: an
#: assumption between FlashAttention-2 (~35-40 %) and FlashAttention-3 (~60-75 %) on H100.
ATTN_EFF = 0.5
#: Bytes one SM can pull from L2/HBM per clock (an upper bound: the SM's L2 read port); caps
#: the memory rate of a grid that occupies few SMs.
SM_BYTES_PER_CLK = 64


def _sass_records(model: str, bits: str, tokens) -> list[dict]:
    """Per-program SASS counts of every kernel configuration (``benchmarks/sass.py``, run in
    a subprocess: compiling needs Triton's interpreter off). Triton caches the cubins."""
    import json
    import subprocess
    import sys
    import tempfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "SPLITQ_TRITON_INTERPRET")}  # fmt: skip
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "benchmarks.sass", "--model", model, "--bits", bits,
               "--json", f.name, "--tokens", *map(str, tokens)]  # fmt: skip
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError("benchmarks/sass.py failed:\n" + proc.stderr[-3000:])
        return json.load(open(f.name))


def _record(records: list[dict], site: str, kernel: str, n: int) -> dict:
    """The record of ``n`` tokens (kernel A's depend on the launch geometry) or, failing
    that, the one compiled for ``n`` tokens' GPU configuration."""
    from splitq_modifier.kernels import site_gemm_config, site_quant_config

    for r in records:
        if r["site"] == site and r["kernel"] == kernel and r["n_tokens"] == n:
            return r
    conf = site_quant_config if kernel.startswith("A") else site_gemm_config
    key = conf(n, interpret=False)
    for r in records:
        if r["site"] == site and r["kernel"] == kernel and conf(r["n_tokens"], False) == key:
            return r
    raise KeyError((site, kernel, n))


@dataclass
class KernelTime:
    """One launch under the model (seconds; ``binding``: the largest term)."""

    name: str
    grid: int
    tensor: float
    integer: float  # integer instructions at 64 lanes/clk/SM
    issue: float  # max(integer, all instructions at 128, FP32 at 128, XU at 16)
    memory: float
    hbm_bytes: float
    l2: float = 0.0  # the busiest SM's L2 <-> SM bytes at SM_BYTES_PER_CLK

    @property
    def time(self) -> float:
        return max(self.tensor, self.issue, self.memory, self.l2)

    @property
    def serial(self) -> float:
        """Tensor and ALU work not overlapped (today's loops wait for their MMAs)."""
        return max(self.tensor + self.issue, self.memory, self.l2)

    @property
    def binding(self) -> str:
        t = {"tensor": self.tensor, "ALU": self.issue, "memory": self.memory, "L2": self.l2}
        if self.issue == self.integer and self.issue >= max(self.tensor, self.memory):
            return "integer"
        return max(t, key=t.get)


def program_clocks(rec: dict) -> dict:
    """Clocks one program keeps an SM's units busy: tensor cores (padded MMAs as compiled,
    at ``TENSOR_EFF`` of the peak), integer lanes, issue slots, FP32 lanes, the XU."""
    c, threads, lanes = rec["counts"], rec["num_warps"] * 32, rec["lanes"]
    tensor = sum(m / MAC_PER_CLK[u] for u, m in rec["macs"].items()) / TENSOR_EFF
    integer = c.get("int", 0) * threads / lanes["int"]
    issue = sum(c.values()) * threads / lanes["issue"]
    fp32 = c.get("fp32", 0) * threads / lanes["fp32"]
    xu = c.get("xu", 0) * threads / lanes["xu"]
    return {"tensor": tensor, "int": integer, "alu": max(integer, issue, fp32, xu)}


def kernel_time(name: str, rec: dict, grid: int, hbm_bytes: float, gpu: dict,
                l2_per_program: float = 0.0) -> KernelTime:  # fmt: skip
    """A launch of ``grid`` programs: the busiest SM runs ``ceil(grid / 132)`` of them one
    after another (units shared); memory at ``min(HBM, SMs in use x 64 B/clk)``; the busiest
    SM's L2 traffic (``l2_per_program`` per program) at 64 B/clk."""
    clk = program_clocks(rec)
    per_sm = math.ceil(grid / SMS)
    bw = min(gpu["hbm"], min(grid, SMS) * SM_BYTES_PER_CLK * CLOCK_HZ)
    l2 = per_sm * l2_per_program / (SM_BYTES_PER_CLK * CLOCK_HZ)
    return KernelTime(name, grid, per_sm * clk["tensor"] / CLOCK_HZ,
                      per_sm * clk["int"] / CLOCK_HZ, per_sm * clk["alu"] / CLOCK_HZ,
                      hbm_bytes / bw, hbm_bytes, l2)  # fmt: skip


def gemm_stream_bytes(
    d_out: int, n: int, cfg: dict, w_bytes: float, act_bytes: float
) -> tuple[float, float]:
    """HBM bytes of kernel B's weights and activation codes under its grouped program order:
    groups of ``GROUP_O`` output tiles x every token tile, output tiles fastest. A group's
    weights stay in L2 while its token tiles run when they fit in half of it (else each token
    tile fetches them again); the activation codes are read once in all when they fit in half
    the L2, else once per group."""
    ot, tt = math.ceil(d_out / cfg["BLOCK_O"]), math.ceil(n / cfg["BLOCK_T"])
    group = min(cfg["GROUP_O"], ot)
    groups = math.ceil(ot / group)
    w_hbm = w_bytes if w_bytes * group / ot <= L2_BYTES / 2 else w_bytes * tt
    a_hbm = act_bytes if act_bytes <= L2_BYTES / 2 else act_bytes * groups
    return w_hbm, a_hbm


def site_model(s: SiteSpec, n: int, records: list[dict], gpu: dict) -> list[KernelTime]:
    """Kernel A (K1, and K2 at decode: ``A2``) and kernel B of site ``s`` at ``n`` tokens
    under the model."""
    qcfg, gcfg = _gpu_configs(n)
    cost_a, cost_b = site_costs(s, n)
    static_b = site_costs(s, 0)[1].read  # weights, scales, branch up-factors, bias
    act_b = n * (s.d + 24)  # codes, scales and code sums of the three paths
    w_hbm, a_hbm = gemm_stream_bytes(s.big_d, n, gcfg, static_b, act_b)
    grid_b = math.ceil(s.big_d / gcfg["BLOCK_O"]) * math.ceil(n / gcfg["BLOCK_T"])
    out = []
    for c in kernel_a_launches(s, n):
        kind = c.name.split()[-1]
        out.append(kernel_time(c.name, _record(records, s.name, kind, n), c.grid,
                               c.read + c.write, gpu, c.l2_per_program))  # fmt: skip
    b = kernel_time(f"{s.name} B", _record(records, s.name, "B", n), grid_b,
                    cost_b.read + cost_b.write - static_b - act_b + w_hbm + a_hbm,
                    gpu)  # fmt: skip
    return out + [b]


def bf16_linear_time(s: SiteSpec, n: int, gpu: dict) -> float:
    """The site's bf16 GEMMs: max(FLOPs at ``TENSOR_EFF`` of the bf16 peak, bytes at HBM)."""
    return sum(max(c.macs["bf16"] / (MAC_PER_CLK["bf16"] * SMS * CLOCK_HZ * TENSOR_EFF),
                   (c.read + c.write) / gpu["hbm"]) for c in bf16_costs(s, n))  # fmt: skip


def other_ops_time(m: ModelWidths, n: int, gpu: dict, context: int = 0) -> dict:
    """The rest of the layer at bf16, the same on both sides: two RMSNorms, two residual adds,
    the SiLU gate, SDPA attention over the ``n`` tokens (causal) plus ``context`` cached ones
    (rotary and the KV-cache write left out)."""
    h, inter = m.hidden, m.intermediate
    hd = 128 if m.q_out % 128 == 0 else math.gcd(m.q_out, m.kv_out)
    heads = m.q_out // hd
    mem = lambda b: b / gpu["hbm"]  # noqa: E731
    out = {
        "rmsnorm x2": 2 * mem(2 * n * h * 2 + h * 2),
        "residual x2": 2 * mem(3 * n * h * 2),
        "silu gate": mem(3 * n * inter * 2),
    }
    flops = 4 * heads * hd * n * (context + (n + 1) / 2)
    attn_bytes = 2 * n * m.q_out * 2 + 2 * (n + context) * m.kv_out * 2
    out["attention"] = max(flops / (2 * MAC_PER_CLK["bf16"] * SMS * CLOCK_HZ * ATTN_EFF),
                           mem(attn_bytes))  # fmt: skip
    return out


def print_model(m: ModelWidths, sites: list[SiteSpec], tokens, records: list[dict],
                context: int = 0, per_site: bool = False) -> dict:  # fmt: skip
    """Print (c): per-kernel terms and the layer ratios; return the ratios."""
    import triton

    r0 = records[0]
    print(f"\n(c) hardware model per decoder layer (SASS of the kernels compiled for sm_90 by "
          f"Triton {r0['triton']} on this machine; no GPU run). Per kernel: max(tensor core, "
          "ALU issue, memory); tensor time from the compiled MMA instructions (padded tiles, "
          f"tf32x3 as three passes) at {TENSOR_EFF:.3f} of the peak; ALU issue from the "
          "per-program dynamic instruction counts (loop bodies x trips + straight-line code) "
          "at 64 integer lanes, 128 issue slots, 128 FP32 lanes and 16 XU lanes per clock per "
          f"SM; {CLOCK_HZ / 1e9:.2f} GHz; the busiest of 132 SMs runs ceil(grid / 132) "
          f"programs; memory at min(HBM, SMs in use x {SM_BYTES_PER_CLK} B/clk), kernel B in "
          "its grouped program order (a group's weights fetched once while they fit in half "
          "the L2, the activation codes once per group when they do not); L2: the busiest "
          f"SM's L2 <-> SM bytes at {SM_BYTES_PER_CLK} B/clk (kernel A: its scratch slot, "
          "branch factors and code tiles re-read per block). Kernel A = K1 (A) + K2 (A2, "
          "decode only).")  # fmt: skip
    del triton
    ratios = {}
    print("\nPer kernel, summed over the four sites (us):")
    print("| GPU | tokens | kernel | programs per site | tensor | integer | ALU issue | memory "
          "| L2 | time | binding (per site) |")  # fmt: skip
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|")
    for gname, gpu in GPUS.items():
        for n in tokens:
            ks = [k for s in sites for k in site_model(s, n, records, gpu)]
            for kind in ("A", "A2", "B"):
                sel = [k for k in ks if k.name.endswith(" " + kind)]
                if not sel:
                    continue
                f = lambda attr, sel=sel: sum(getattr(k, attr) for k in sel) * 1e6  # noqa: E731
                print(f"| {gname} | {n} | {kind} | {'/'.join(str(k.grid) for k in sel)} "
                      f"| {f('tensor'):.1f} | {f('integer'):.1f} | {f('issue'):.1f} "
                      f"| {f('memory'):.1f} | {f('l2'):.1f} | {f('time'):.1f} "
                      f"| {'/'.join(k.binding for k in sel)} |")  # fmt: skip
    print("(sites in order attn_in / attn_out / mlp_in / mlp_down)")
    if per_site:
        gname, gpu = next(iter(GPUS.items()))
        print(f"\nPer kernel and site, {gname} (us):")
        print("| tokens | kernel | programs | tensor | integer | ALU issue | memory | L2 "
              "| HBM MB | binding |")  # fmt: skip
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for n in tokens:
            for k in (k for s in sites for k in site_model(s, n, records, gpu)):
                print(f"| {n} | {k.name} | {k.grid} | {k.tensor * 1e6:.1f} "
                      f"| {k.integer * 1e6:.1f} | {k.issue * 1e6:.1f} | {k.memory * 1e6:.1f} "
                      f"| {k.l2 * 1e6:.1f} | {k.hbm_bytes / 1e6:.1f} | {k.binding} |")  # fmt: skip
    print("\nLayer (us), bf16 linears as separate GEMMs at the same tensor-core efficiency; "
          f"full layer adds RMSNorms, residuals, SiLU gate and SDPA attention ({context} "
          "cached tokens) at bf16 rates on both sides:")  # fmt: skip
    print("| GPU | tokens | bf16 linears | SplitQ A + B | **linears ratio** | same, tensor and ALU "
          "not overlapped | bf16 layer | SplitQ layer | **full-layer ratio** |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for gname, gpu in GPUS.items():
        for n in tokens:
            ks = [k for s in sites for k in site_model(s, n, records, gpu)]
            t_sq = sum(k.time for k in ks)
            t_ser = sum(k.serial for k in ks)
            t_bf = sum(bf16_linear_time(s, n, gpu) for s in sites)
            rest = sum(other_ops_time(m, n, gpu, context).values())
            ratios[(gname, n)] = (t_bf / t_sq, (t_bf + rest) / (t_sq + rest))
            full = (t_bf + rest) / (t_sq + rest)
            print(f"| {gname} | {n} | {t_bf * 1e6:.1f} | {t_sq * 1e6:.1f} "
                  f"| **{t_bf / t_sq:.2f}x** | {t_bf / t_ser:.2f}x | {(t_bf + rest) * 1e6:.1f} "
                  f"| {(t_sq + rest) * 1e6:.1f} | **{full:.2f}x** |")  # fmt: skip
    return ratios


def print_main_loops(records: list[dict]) -> None:
    """Kernel B's main K loop per configuration (from the SASS)."""
    print("\nKernel B main K loop, per iteration and per thread (sm_90 SASS):")
    print("| site | tile O x T x K, warps | MMA instructions | integer | all | integer per MMA "
          "| **integer per 4-bit code** |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|")
    for r in records:
        lp = r.get("main_loop")
        if not lp:
            continue
        mm = ", ".join(f"{k} x{v}" for k, v in lp["mma_ops"].items())
        print(f"| {r['site']} | {'x'.join(map(str, r['tile']))}, {r['num_warps']} | {mm} "
              f"| {lp['int']} | {lp['total']} | {lp['int_per_mma']:.1f} "
              f"| **{lp['int_per_code']:.2f}** ({lp['bits']}-bit) |")  # fmt: skip


# --------------------------------------------------------------------------------------------
# A decoder layer (shared by (a) and (e))
# --------------------------------------------------------------------------------------------
class Layer:
    """A decoder layer with either SplitQ sites or bf16 linears (same norms and attention)."""

    def __init__(self, m: ModelWidths, sites: list[SiteSpec], device, splitq: bool, seed=0,
                 params: dict[str, SiteParams] | None = None):  # fmt: skip
        """``params``: the SplitQ sites' parameters by site name (default: :func:`build_params`
        of each site)."""
        self.m, self.splitq = m, splitq
        # head_dim 128 where the widths allow (all real models here but Gemma's 256, same
        # FLOPs), else their gcd (tiny shapes)
        hd = 128 if m.q_out % 128 == 0 and m.kv_out % 128 == 0 else math.gcd(m.q_out, m.kv_out)
        self.head_dim, self.heads, self.kv_heads = hd, m.q_out // hd, m.kv_out // hd
        self.norm = [torch.ones(m.hidden, device=device, dtype=torch.bfloat16) for _ in "12"]
        self.sites = {s.name: s for s in sites}
        if splitq:
            self.params = params or {
                s.name: build_params(s, device, seed + i) for i, s in enumerate(sites)
            }
        else:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            self.w = {
                s.name: [
                    (torch.randn(o, s.d, generator=gen) * s.d**-0.5).to(device, torch.bfloat16)
                    for o in s.out_splits
                ]
                for s in sites
            }
            self.b = {
                s.name: [torch.zeros(o, device=device, dtype=torch.bfloat16) for o in s.out_splits]
                if s.bias
                else None
                for s in sites
            }

    def linears(self, name: str, x: torch.Tensor, mask) -> list[torch.Tensor]:
        s = self.sites[name]
        if self.splitq:
            y = site_linear(x, self.params[name], mask)
            return list(y.split(list(s.out_splits), dim=-1))
        bs = self.b[name] or [None] * len(s.out_splits)
        return [F.linear(x, w, b) for w, b in zip(self.w[name], bs)]

    def __call__(self, h: torch.Tensor, mask) -> torch.Tensor:
        n = h.shape[0]
        x = F.rms_norm(h, (h.shape[-1],), self.norm[0])
        q, k, v = self.linears("attn_in", x, mask)
        q = q.view(n, self.heads, self.head_dim).transpose(0, 1)
        k = k.view(n, self.kv_heads, self.head_dim).transpose(0, 1)
        v = v.view(n, self.kv_heads, self.head_dim).transpose(0, 1)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = a.transpose(0, 1).reshape(n, self.heads * self.head_dim)
        h = h + self.linears("attn_out", a, mask)[0]
        x = F.rms_norm(h, (h.shape[-1],), self.norm[1])
        gate, up = self.linears("mlp_in", x, mask)
        return h + self.linears("mlp_down", F.silu(gate) * up, mask)[0]

    def sites_only(self, h: torch.Tensor, mask) -> None:
        """The four site calls alone, on inputs of the right widths."""
        for name in SITES:
            s = self.sites[name]
            x = h if s.d == h.shape[-1] else h.new_ones(h.shape[0], s.d)
            self.linears(name, x, mask)


# --------------------------------------------------------------------------------------------
# (a) launches
# --------------------------------------------------------------------------------------------
_NO_KERNEL = {
    "aten::empty", "aten::empty_strided", "aten::view", "aten::reshape", "aten::_reshape_alias",
    "aten::as_strided", "aten::alias", "aten::detach", "aten::lift_fresh", "aten::t",
    "aten::transpose", "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::select",
    "aten::slice", "aten::split", "aten::resolve_conj", "aten::resolve_neg", "aten::to",
    "aten::contiguous", "aten::stride", "aten::size", "aten::numel", "aten::dim",
    "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense",
}  # fmt: skip


def _launches_kernel(e) -> bool:
    """Whether a profiler event or any op under it does device work (not a view, an
    allocation or a no-op ``to``)."""
    return e.name not in _NO_KERNEL or any(_launches_kernel(c) for c in e.cpu_children)


def count_launches(device) -> None:
    """Run one tiny decoder layer's four sites through the op; count Triton launches (pre-run
    hook on the two kernels) and the torch ops inside the op calls (profiler)."""
    from splitq_modifier.kernels import site_branch_kernel, site_gemm_kernel, site_quant_kernel

    tiny = ModelWidths("tiny", "qwen2_5_vl", 64, 160, 64, 32, 1)
    sites = layer_sites(tiny, 4, 4)
    layer = Layer(tiny, sites, device, splitq=True)
    launches = Counter()
    for kern, label in ((site_quant_kernel, "kernel A"), (site_branch_kernel, "kernel A2"),
                        (site_gemm_kernel, "kernel B")):  # fmt: skip
        kern.add_pre_run_hook(lambda *a, _l=label, **k: launches.update([_l]))
        # A profiler range around each launch, so that the torch ops Triton's interpreter runs
        # to emulate the kernel are not counted as the op's own.
        run = kern.run

        def traced(*a, _run=run, _l=label, **k):
            with torch.profiler.record_function(f"triton::{_l}"):
                return _run(*a, **k)

        kern.run = traced
    print("\n(a) launches per decoder-layer forward (tiny shapes: hidden 64, MLP 160; "
          f"{'GPU' if device.type == 'cuda' else 'Triton interpreter on CPU'})")  # fmt: skip
    print("| case | Triton launches | torch ops that launch a kernel | torch ops that do not "
          "(views, allocations) | launches total | bf16 layer GEMMs |")  # fmt: skip
    print("|---|---:|---|---|---:|---:|")
    for case, n, mask in (("prefill, mixed text mask", 24, "mixed"), ("decode, 1 token", 1, None)):
        h = torch.randn(n, tiny.hidden, device=device, dtype=torch.bfloat16)
        mask_t = (torch.arange(n, device=device) % 3 != 0) if mask else None
        layer.sites_only(h, mask_t)  # warm-up (compilation on a GPU)
        launches.clear()
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            layer.sites_only(h, mask_t)
        events = prof.events()
        ops = [e for e in events if e.name == "splitq::site_linear"]
        inner, kernel_ops = Counter(), set()
        for e in events:
            par, in_kernel = e.cpu_parent, False
            while par is not None and par.name != "splitq::site_linear":
                in_kernel |= par.name.startswith("triton::")
                par = par.cpu_parent
            top = e.cpu_parent is not None and e.cpu_parent.name == "splitq::site_linear"
            if par is not None and not in_kernel and e.name.startswith("aten::") and top:
                inner[e.name] += 1
                if _launches_kernel(e):
                    kernel_ops.add(e.name)
        with_k = {k: v for k, v in inner.items() if k in kernel_ops}
        without = {k: v for k, v in inner.items() if k not in kernel_ops}
        fmt = lambda c: ", ".join(f"{k[6:]} x{v}" for k, v in sorted(c.items())) or "none"  # noqa: E731
        tl_n = sum(launches.values())
        print(f"| {case} ({len(ops)} op calls) | {tl_n} ({dict(launches)}) | {fmt(with_k)} "
              f"| {fmt(without)} | {tl_n + sum(with_k.values())} | 7 |")  # fmt: skip
    print("(vLLM-style bf16 with fused qkv and gate/up projections: 4 GEMMs; norms, attention "
          "and activations are the same in both and not counted)")  # fmt: skip


# --------------------------------------------------------------------------------------------
# (d) transform precision
# --------------------------------------------------------------------------------------------
def _tf32(t: torch.Tensor) -> torch.Tensor:
    b = t.contiguous().view(torch.int32)
    return ((b + 0x1000) & ~0x1FFF).view(torch.float32)  # round to 10 mantissa bits


def _kron(x, mats, rnd):
    if not mats:
        return x
    if len(mats) == 1:
        return rnd(x) @ rnd(mats[0])
    dims = [int(m.shape[0]) for m in mats]
    y = rnd(x.reshape(-1, dims[-1])) @ rnd(mats[-1])
    post = dims[-1]
    for i in range(len(mats) - 2, -1, -1):
        y = torch.matmul(rnd(mats[i]).T, rnd(y.reshape(-1, dims[i], post)))
        post *= dims[i]
    return y.reshape(x.shape[0], -1)


def print_precision(sites: list[SiteSpec], n: int = 256) -> None:
    print(f"\n(d) transform precision: share of activation codes that flip against an fp64 "
          f"transform ({n} tokens, Gaussian input with 1 % outlier channels x20)")  # fmt: skip
    print("| site | factors (main) | a_bits | fp32 (kernels) | TF32 operands (emulated) |")
    print("|---|---|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for s in sites:
        if s.name not in ("attn_in", "mlp_down"):
            continue
        p = build_params(
            SiteSpec(s.name, s.sizes, s.dims, (64,), (), (), (4, 4, 4), (4, 4, 4), (4, 4), False),
            "cpu",
        )  # fmt: skip
        x = torch.randn(n, s.d, generator=gen) * (torch.rand(s.d, generator=gen) * 3 + 0.2)
        x[:, torch.randperm(s.d, generator=gen)[: max(1, s.d // 100)]] *= 20
        xs = (x[:, p.perm.long()] * p.smooth).split(list(s.sizes), 1)
        mats = split_factors(p.factors, s.dims)
        exact = torch.cat([_kron(a.double(), [m.double() for m in ms], lambda t: t)
                           for a, ms in zip(xs, mats)], 1).float()  # fmt: skip
        f32 = torch.cat([_kron(a, ms, lambda t: t) for a, ms in zip(xs, mats)], 1)
        tf = torch.cat([_kron(a, ms, _tf32) for a, ms in zip(xs, mats)], 1)
        for bits in (4, 8):
            flips = {"f32": 0, "tf": 0}
            off = 0
            for k in s.sizes:
                q0 = quantize_per_token(exact[:, off : off + k], bits)[0]
                for key, v in (("f32", f32), ("tf", tf)):
                    q = quantize_per_token(v[:, off : off + k], bits)[0]
                    flips[key] += int((q != q0).sum())
                off += k
            tot = n * s.d
            print(f"| {s.name} | {'x'.join(map(str, s.dims[2]))} | {bits} "
                  f"| {flips['f32'] / tot:.1e} | {flips['tf'] / tot:.1e} |")  # fmt: skip


# --------------------------------------------------------------------------------------------
# (e) GPU timing
# --------------------------------------------------------------------------------------------
def time_gpu(m: ModelWidths, sites: list[SiteSpec], tokens) -> None:
    import triton.testing

    dev = torch.device("cuda")
    print(f"\n(e) measured decoder layer on {torch.cuda.get_device_name()} "
          f"({m.name} widths, bf16 activations)")  # fmt: skip
    sq_layer = Layer(m, sites, dev, splitq=True)
    bf_layer = Layer(m, sites, dev, splitq=False)
    print("| tokens | bf16 ms | SplitQ ms | SplitQ/bf16 time | speedup | timing |")
    print("|---:|---:|---:|---:|---:|---|")
    for n in tokens:
        h = torch.randn(n, m.hidden, device=dev, dtype=torch.bfloat16)
        mask = (torch.arange(n, device=dev) >= n // 2) if n > 16 else None
        res = {}
        for name, layer in (("bf16", bf_layer), ("splitq", sq_layer)):
            fn = lambda layer=layer, h=h, mask=mask: layer(h, mask)  # noqa: E731
            fn()
            torch.cuda.synchronize()
            if n <= 16:
                res[name] = triton.testing.do_bench_cudagraph(fn, rep=100)
                how = "CUDA graph"
            else:
                res[name] = triton.testing.do_bench(fn, warmup=10, rep=100)
                how = "do_bench"
        print(f"| {n} | {res['bf16']:.3f} | {res['splitq']:.3f} "
              f"| {res['splitq'] / res['bf16']:.2f} | {res['bf16'] / res['splitq']:.2f}x | {how} |",
              flush=True)  # fmt: skip
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    """Print (a)-(d), and (e) where a GPU exists."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="Qwen2.5-VL-7B", choices=list(REAL_MODELS))
    ap.add_argument("--bits", default="W4A4", help="main-path bits, e.g. W4A4, W3A3, W4A8")
    ap.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    ap.add_argument("--no-branches", action="store_true", help="leave CWS and MAC out")
    ap.add_argument("--context", type=int, default=0, help="cached tokens attention reads")
    ap.add_argument("--model-only", action="store_true", help="print the model (c) only")
    ap.add_argument("--per-site", action="store_true", help="(c) per kernel and site too")
    args = ap.parse_args(argv)
    wb, ab = int(args.bits[1]), int(args.bits[3])
    m = REAL_MODELS[args.model]
    sites = layer_sites(m, wb, ab, not args.no_branches)

    print(f"SplitQ {args.bits} vs bf16, one decoder layer of {m.name} (hidden {m.hidden}, "
          f"MLP {m.intermediate}, q {m.q_out}, kv {m.kv_out})")  # fmt: skip
    if HAS_GPU:
        print(f"GPU: {torch.cuda.get_device_name()}")
    else:
        print("No CUDA GPU here: (a) runs under Triton's interpreter on tiny shapes, (b)-(d) are "
              "computed, the measured timing (e) needs a GPU and is skipped.")  # fmt: skip
    print("| site | d | paths kv/kt/km | factors v / t / m | linears | CWS ranks | MAC ranks |")
    print("|---|---:|---|---|---|---|---|")
    for s in sites:
        dims = " / ".join("x".join(map(str, f)) or "-" for f in s.dims)
        print(f"| {s.name} | {s.d} | {'/'.join(map(str, s.sizes))} | {dims} "
              f"| {'+'.join(map(str, s.out_splits))} | {s.cws} | {s.mac} |")  # fmt: skip

    if not args.model_only:
        count_launches(torch.device("cuda" if HAS_GPU else "cpu"))
        print_bytes(sites, args.tokens)
    records = _sass_records(args.model, args.bits, args.tokens)
    print_main_loops(records)
    print_model(m, sites, args.tokens, records, args.context, args.per_site)
    if not args.model_only:
        print_precision(sites)
    if HAS_GPU:
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            print("warning: TRITON_INTERPRET=1 is set, the kernels run in the interpreter")
        time_gpu(m, sites, args.tokens)


if __name__ == "__main__":
    main()
