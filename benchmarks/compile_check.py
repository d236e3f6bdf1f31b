"""Compile every SplitQ site-kernel configuration for a CUDA target without a GPU.

``python -m benchmarks.compile_check [--arch 90] [--all] [--jobs N]`` (from the repository
root; a development tool, not part of the installed package) runs
Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin, ptxas being shipped in the
triton wheel under ``triton/backends/nvidia/bin``) for the configurations the launchers use on a
GPU, so that an illegal block shape (an int8 ``tl.dot`` with K < 32, which the interpreter
accepts) or a tile that overflows shared memory fails on a CPU-only machine. It must run with
``TRITON_INTERPRET`` unset: under the interpreter ``triton.jit`` yields interpreted functions,
which cannot be compiled.

The default set covers every block configuration of both kernels at least once and every
shape family of the real-model table (:mod:`splitq_modifier.widths`) at least once: one dense
factor per outlier path with a balanced pair on the main path (Qwen2.5-VL-7B attention input,
54 x 64, at the decode configuration), two-factor outlier paths with the widest balanced pair
(Qwen2.5-VL-72B attention input, 64 x 123) and three factors (Qwen2.5-VL-7B MLP down,
24 x 27 x 28), both at the prefill configuration. ``--all`` builds kernel A for every distinct
site of the table (96 x 110 and the other pairs included) at both configurations (long: tens
of seconds per build on a slow CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import triton
from splitq_modifier.kernels.site_gemm import (
    SITE_GEMM_GPU_CONFIGS,
    site_gemm_config,
    site_gemm_constexprs,
    site_gemm_kernel,
)
from splitq_modifier.kernels.site_quant import (
    SITE_QUANT_GPU_TOKENS,
    site_branch_constexprs,
    site_branch_kernel,
    site_quant_config,
    site_quant_constexprs,
    site_quant_kernel,
    site_quant_options,
)
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from splitq_modifier.runtime.quant import packed_words

#: Largest dynamic shared memory of one block on sm_90 (227 KiB).
SM90_SHARED_LIMIT = 232448

# Pointer element types of the kernel arguments (everything else not constexpr is an i32).
_QUANT_PTRS = {
    "x_ptr": "*bf16", "perm_ptr": "*i32", "smooth_ptr": "*fp32", "f_ptr": "*fp32",
    "clip_ptr": "*fp32", "qx_ptr": "*i8", "sx_ptr": "*fp32", "qsum_ptr": "*i32",
    "uq_ptr": "*i8", "su_ptr": "*fp32", "scr_ptr": "*fp32", "scr16_ptr": "*fp16", "acc_ptr": "*i32",
    "cnt_ptr": "*i32", "l2_ptr": "*i32", "l2s_ptr": "*fp32", "hq_ptr": "*i8",
    "sh_ptr": "*fp32", "l4_ptr": "*i32", "l4s_ptr": "*fp32", "gq_ptr": "*i8", "sg_ptr": "*fp32",
}  # fmt: skip
_GEMM_PTRS = {
    "qx_ptr": "*i8", "sx_ptr": "*fp32", "qsum_ptr": "*i32", "out_ptr": "*bf16",
    "wv_ptr": "*u8", "wt_ptr": "*u8", "wm_ptr": "*u8",
    "wsv_ptr": "*fp32", "wst_ptr": "*fp32", "wsm_ptr": "*fp32",
    "hq_ptr": "*i8", "sh_ptr": "*fp32", "l1_ptr": "*i32", "l1s_ptr": "*fp32",
    "gq_ptr": "*i8", "sg_ptr": "*fp32", "l3_ptr": "*i32", "l3s_ptr": "*fp32",
    "mask_ptr": "*u8", "bias_ptr": "*bf16",
}  # fmt: skip

#: (label, model, site, token count) of the kernel A builds by default: each shape family
#: once, each block configuration (decode, prefill) at least once.
FAMILY_SITES = (
    ("1-factor outliers, 54x64 main", "Qwen2.5-VL-7B", "attn_in", SITE_QUANT_GPU_TOKENS[0]),
    ("2-factor outliers, 64x123 main", "Qwen2.5-VL-72B", "attn_in", SITE_QUANT_GPU_TOKENS[1]),
    ("2-factor outliers, 24x27x28 main", "Qwen2.5-VL-7B", "mlp_down", SITE_QUANT_GPU_TOKENS[1]),
)


def _signature(fn, constexprs: dict, ptr_types: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr_types[name]
        else:
            sig[name] = "i32"
    return sig


def _attrs(fn, constexprs: dict, ints: dict) -> dict:
    """The specialization a launch on real tensors gets from Triton's JIT: every pointer
    16-byte aligned (torch allocations are), and the integer arguments that are multiples of
    16 at the real site (``ints``: name -> value) marked so. Without it the compiler must assume
    unaligned rows and emits byte-wise loads (more registers than a real launch uses)."""
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            continue
        if name.endswith("_ptr") or (name in ints and ints[name] % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def real_site(model: str, site: str) -> dict:
    """Layout of one real-model site with the recipe defaults (2 % outlier paths, CWS rank 2 %
    and MAC rank 3 % of each linear's full rank)."""
    from splitq_modifier.acc import branch_rank
    from splitq_modifier.layout import plan_site
    from splitq_modifier.runtime import flatten_factor_dims
    from splitq_modifier.widths import REAL_MODELS, site_widths

    d, outs = site_widths(REAL_MODELS[model])[site]
    plan = plan_site(d, outs, 0.02, 0.02)
    km = plan.sizes[2]
    return {
        "sizes": plan.sizes,
        "factor_dims": flatten_factor_dims(plan.dims),
        "dims": plan.dims,
        "out_splits": tuple(outs),
        "cws_ranks": tuple(branch_rank(0.02, o, km) for o in outs),
        "mac_ranks": tuple(branch_rank(0.03, o, km) for o in outs),
    }


def quant_spec(
    label: str, site: dict, n_tokens: int, a_bits=(4, 4, 4), branch_bits=(4, 4, 3, 4)
) -> tuple:
    """``(label, "quant", constexprs, options, ints)`` of kernel A's K1 at a real site (see
    :func:`real_site`) in the GPU configuration for ``n_tokens``."""
    cfg = site_quant_config(n_tokens, interpret=False)
    const = site_quant_constexprs(
        site["sizes"], site["factor_dims"], site["cws_ranks"], site["mac_ranks"], a_bits,
        branch_bits, 0, cfg, asm=True,
    )  # fmt: skip
    opts = dict(site_quant_options(const, cfg), enable_fp_fusion=True)
    ints = {"stride_x": sum(site["sizes"])}
    tag = "prefill" if const["BRANCH"] == 1 else "decode"
    return (f"kernel A K1 {tag} {label}", "quant", const, opts, ints)


def branch_spec(label: str, site: dict, n_tokens: int, branch_bits=(4, 4, 3, 4)) -> tuple:
    """``(label, "branch", constexprs, options, ints)`` of kernel A's K2 (the split-K branch
    down-projections of the decode configuration) at a real site."""
    cfg = site_quant_config(n_tokens, interpret=False)
    const = site_quant_constexprs(
        site["sizes"], site["factor_dims"], site["cws_ranks"], site["mac_ranks"], (4, 4, 4),
        branch_bits, 0, cfg, asm=True,
    )  # fmt: skip
    ints = {}
    opts = {"num_warps": 4, "num_stages": 1, "enable_fp_fusion": True}
    return (f"kernel A K2 {label}", "branch", site_branch_constexprs(const), opts, ints)


def kernel_and_ptrs(kind: str, const: dict) -> tuple:
    """The jit function of a spec kind ("quant": K1, "branch": K2, "gemm": kernel B) and the
    element types of its pointer arguments (4-bit branch factors are read as bytes)."""
    if kind == "gemm":
        return site_gemm_kernel, _GEMM_PTRS
    ptrs = dict(_QUANT_PTRS)
    for name, bits in (("l2_ptr", "CWS_W_BITS"), ("l4_ptr", "MAC_W_BITS")):
        if const[bits] == 4:
            ptrs[name] = "*u8"
    return (site_quant_kernel if kind == "quant" else site_branch_kernel), ptrs


def gemm_spec(
    label: str, site: dict, n_tokens: int, w_bits=(4, 4, 4), branch_bits=(4, 4, 4, 4)
) -> tuple:
    """``(label, "gemm", constexprs, options, ints)`` of kernel B at a real site, with both
    branches, the text mask and bias on, in the GPU configuration for ``n_tokens``."""
    cfg = site_gemm_config(n_tokens, interpret=False)
    const = site_gemm_constexprs(
        site["sizes"], site["out_splits"], site["cws_ranks"], site["mac_ranks"], w_bits,
        branch_bits, True, True, cfg,
    )  # fmt: skip
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    opts["enable_fp_fusion"] = True
    ints = {
        "stride_l1": packed_words(max(site["cws_ranks"]), branch_bits[0]),
        "stride_l3": packed_words(max(site["mac_ranks"]), branch_bits[2]),
    }
    cfg_s = f"{cfg['BLOCK_O']}x{cfg['BLOCK_T']}x{cfg['BLOCK_K']}"
    return (f"kernel B {cfg_s} {label} w_bits={tuple(w_bits)}", "gemm", const, opts, ints)


def kernel_specs(all_sites: bool = False) -> list[tuple[str, str, dict, dict, dict]]:
    """``(label, kernel name, constexprs, options, integer arguments)`` of every configuration
    to build (the integers: real-site values of the strides, for :func:`_attrs`).

    Kernel A: K1 at :data:`FAMILY_SITES` and with an 8-bit (exact, tf32x3) main path
    (``--all``: every distinct real-model site at every configuration), and K2 once. MAC
    factors are 3-bit and CWS 4-bit, so both unpack variants are built.
    Kernel B: every token-count configuration of :data:`SITE_GEMM_GPU_CONFIGS`, with both
    branches, the text mask and bias on, at real sites with 3, 2 and 1 linears, mixing weight
    bits 4/3/2 and 8.
    """
    specs = []
    if all_sites:
        from splitq_modifier.widths import REAL_MODELS, site_widths

        seen = set()
        for model in REAL_MODELS:
            for name in site_widths(REAL_MODELS[model]):
                site = real_site(model, name)
                for n in SITE_QUANT_GPU_TOKENS:
                    spec = quant_spec(f"{model}:{name} {site['dims']}", site, n)
                    # Same generated code: same path plans modulo offsets and widths, same
                    # padded ranks and number of linears.
                    c = spec[2]
                    shape = tuple(pl[2:9] + pl[12:] for pl in (c["PV"], c["PT"], c["PM"]))
                    key = (n, shape, c["R1P"], c["R2P"], len(c["SEG1"]), len(c["SEG2"]))
                    if key not in seen:
                        seen.add(key)
                        specs.append(spec)
    else:
        for label, model, name, n in FAMILY_SITES:
            specs.append(quant_spec(label, real_site(model, name), n))
        attn_7b = real_site("Qwen2.5-VL-7B", "attn_in")
        specs.append(quant_spec("8-bit (exact) main path, 54x64", attn_7b,
                                SITE_QUANT_GPU_TOKENS[1], a_bits=(8, 8, 8)))  # fmt: skip
    specs.append(
        branch_spec(
            "3 linears, 4-bit CWS + 3-bit MAC factors",
            real_site("Qwen2.5-VL-7B", "attn_in"),
            SITE_QUANT_GPU_TOKENS[0],
        )
    )
    gemm_sites = (
        ("Qwen2.5-VL-7B", "attn_in", (4, 3, 2), (4, 4, 3, 4)),
        ("Qwen2.5-VL-7B", "mlp_in", (8, 4, 3), (3, 4, 2, 4)),
        ("Qwen2.5-VL-7B", "mlp_down", (4, 4, 4), (4, 4, 4, 4)),
        ("Qwen2.5-VL-72B", "attn_in", (4, 8, 2), (2, 4, 8, 4)),
    )
    for cfg_row, (model, name, w_bits, branch_bits) in zip(SITE_GEMM_GPU_CONFIGS, gemm_sites):
        max_n = cfg_row[0] or 4096
        label, kind, const, opts, ints = gemm_spec(
            f"{model}:{name}", real_site(model, name), max_n, w_bits, branch_bits
        )
        specs.append((f"{label} (<= {cfg_row[0]} tokens)", kind, const, opts, ints))
    return specs


def _build(spec: tuple, arch: int, warp_size: int) -> tuple[str, int, float, int]:
    label, kind, const, opts, ints = spec
    fn, ptrs = kernel_and_ptrs(kind, const)
    t0 = time.time()
    src = ASTSource(
        fn=fn,
        signature=_signature(fn, const, ptrs),
        constexprs=const,
        attrs=_attrs(fn, const, ints),
    )
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, warp_size), options=opts)
    if "cubin" not in compiled.asm:
        raise RuntimeError(f"{label}: no cubin produced")
    shared = int(compiled.metadata.shared)
    if shared > SM90_SHARED_LIMIT:
        raise RuntimeError(f"{label}: {shared} B of shared memory > {SM90_SHARED_LIMIT} B")
    return label, shared, time.time() - t0, resource_usage(compiled.asm["cubin"])


def resource_usage(cubin: bytes) -> str:
    """``REG:.. STACK:.. LOCAL:..`` of a cubin, read by the ``cuobjdump`` of the triton wheel
    (a STACK above 0 means register spills); ``?`` where it is missing."""
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return "?"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout  # fmt: skip
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    return f"regs={m[1]} stack={m[2]}B local={m[3]}B" if m else "?"


def compile_all(
    arch: int = 90,
    warp_size: int = 32,
    verbose: bool = True,
    all_sites: bool = False,
    jobs: int | None = None,
) -> list[str]:
    """Compile every spec of :func:`kernel_specs` to a cubin for ``cuda:arch``.

    Builds run in ``jobs`` worker processes (default: the CPU count, at most 4). Returns the
    labels built; raises the first compilation error.
    """
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset")
    specs = kernel_specs(all_sites)
    jobs = jobs or min(4, os.cpu_count() or 1)
    done = []
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_build, s, arch, warp_size) for s in specs]
        for fut in futures:
            label, shared, secs, usage = fut.result()
            if verbose:
                print(f"ok  {label}: shared={shared}B {usage} ({secs:.0f}s)", flush=True)
            done.append(label)
    return done


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--all", action="store_true", help="every distinct real-model site")
    ap.add_argument("--jobs", type=int, default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # options set it per kernel anyway
    t0 = time.time()
    done = compile_all(args.arch, all_sites=args.all, jobs=args.jobs)
    print(f"{len(done)} kernels built for sm_{args.arch} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
