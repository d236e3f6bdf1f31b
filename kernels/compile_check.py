"""Compile every SplitQ kernel configuration for a CUDA target without a GPU.

``python -m splitq_modifier.kernels.compile_check [--arch 90]`` runs Triton's full pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin, ptxas being shipped in the triton wheel under
``triton/backends/nvidia/bin``) for the configurations the launchers use on a GPU, so that an
illegal block shape (say an int8 ``tl.dot`` with K < 32, which the interpreter accepts) fails on
a CPU-only machine. It must run with ``TRITON_INTERPRET`` unset: under the interpreter
``triton.jit`` yields interpreted functions, which cannot be compiled.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .gemm import GEMM_GPU_CONFIGS, gemm_constexprs, splitq_gemm_kernel
from .quant import act_quant_config, act_quant_constexprs, act_quant_kernel

# Pointer element types of the kernel arguments (everything else not constexpr is an i32).
_QUANT_PTRS = {
    "x_ptr": "*bf16", "clip_ptr": "*fp32", "qx_ptr": "*i8", "sx_ptr": "*fp32",
    "l2_ptr": "*i32", "l2s_ptr": "*fp32", "hq_ptr": "*i8", "sh_ptr": "*fp32",
    "l4_ptr": "*i32", "l4s_ptr": "*fp32", "uq_ptr": "*i8", "su_ptr": "*fp32",
    "gq_ptr": "*i8", "sg_ptr": "*fp32",
}  # fmt: skip
_GEMM_PTRS = {
    "qx_ptr": "*i8", "sx_ptr": "*fp32", "out_ptr": "*bf16",
    "wv_ptr": "*i32", "wt_ptr": "*i32", "wm_ptr": "*i32",
    "wsv_ptr": "*fp32", "wst_ptr": "*fp32", "wsm_ptr": "*fp32",
    "hq_ptr": "*i8", "sh_ptr": "*fp32", "l1_ptr": "*i32", "l1s_ptr": "*fp32",
    "gq_ptr": "*i8", "sg_ptr": "*fp32", "l3_ptr": "*i32", "l3s_ptr": "*fp32",
    "mask_ptr": "*u8", "bias_ptr": "*bf16",
}  # fmt: skip


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


def kernel_specs() -> list[tuple[str, object, dict, dict, dict]]:
    """``(label, kernel, pointer types, constexprs, options)`` of every configuration to build.

    The GEMM is built for every GPU block config (every token-count bucket) with both branches,
    the text mask and bias on, and weight bits mixing 4/3/2 and 8 so that both unpack variants
    (straddling and not) are compiled; the quantize kernel with both branches.
    """
    specs = []
    qcfg = act_quant_config(4096)
    # mac_input only swaps one expression; 0 (the residual) is the larger kernel.
    const = act_quant_constexprs((4, 4, 4), (4, 4, 4, 4), 72, 108, 0, False)
    const.update(BLOCK_M=qcfg["BLOCK_M"], BLOCK_K=qcfg["BLOCK_K"])
    opts = {"num_warps": qcfg["num_warps"], "enable_fp_fusion": False}
    specs.append(("act_quant", act_quant_kernel, _QUANT_PTRS, const, opts))
    for i, (_max_n, bm, bn, bk, warps, stages) in enumerate(GEMM_GPU_CONFIGS):
        # Alternate weight bits and branch shapes: ranks 72/108 (padded to 128) with 4/3-bit
        # factors, and ranks 20/30 (padded to 32, one 3-bit group) with 3/2-bit factors.
        if i % 2 == 0:
            w_bits, branch_bits, r1, r2 = (4, 3, 2), (4, 4, 3, 4), 72, 108
        else:
            w_bits, branch_bits, r1, r2 = (8, 4, 3), (3, 4, 2, 4), 20, 30
        const = gemm_constexprs(w_bits, branch_bits, r1, r2, True, True)
        const.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        opts = {"num_warps": warps, "num_stages": stages, "enable_fp_fusion": True}
        specs.append((f"gemm {bm}x{bn}x{bk} bits={w_bits}", splitq_gemm_kernel, _GEMM_PTRS,
                      const, opts))  # fmt: skip
    return specs


def compile_all(arch: int = 90, warp_size: int = 32, verbose: bool = True) -> list[str]:
    """Compile every spec of :func:`kernel_specs` to a cubin for ``cuda:arch``.

    Returns the labels built; raises the first compilation error.
    """
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset")
    target = GPUTarget("cuda", arch, warp_size)
    done = []
    for label, fn, ptrs, const, opts in kernel_specs():
        t0 = time.time()
        src = ASTSource(fn=fn, signature=_signature(fn, const, ptrs), constexprs=const)
        compiled = triton.compile(src, target=target, options=opts)
        assert "cubin" in compiled.asm, f"{label}: no cubin produced"
        if verbose:
            print(
                f"ok  {label:40s} shared={compiled.metadata.shared}B  {time.time() - t0:.1f}s",
                flush=True,
            )
        done.append(label)
    return done


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)
    compile_all(args.arch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
