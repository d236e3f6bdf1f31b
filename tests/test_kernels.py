"""Triton kernels of the SplitQ activation site, run on CPU through Triton's interpreter.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before the kernels are imported; the launch
functions are called directly on CPU tensors (and once through ``torch.ops.splitq.site_linear``
with ``SPLITQ_TRITON_INTERPRET=1``). What is checked, and with which tolerance:

* **kernel A** vs the reference: ``tests/test_kernel_quant.py`` (its module doc: fp16 operands
  on the main path at <= 4 bits, fp32 elsewhere; branch codes exact given the kernel's own main
  codes);
* **kernel B** vs ``site_gemm_reference`` on the same codes: fp32 output within ``1e-6``
  relative (the interpreter applies the epilogue in the reference's order; a GPU may contract
  FMAs); fp16/bf16 outputs within two ulps;
* **the whole op** vs ``site_linear_reference``: equal to ``site_gemm_reference`` of the
  kernel's own codes as above, and within ``1e-5`` (fp32; ``1e-3`` on a site with an fp16
  main path, see ``test_site_linear``) of the reference on all but the few outputs that a
  flipped code touches (<= 5 %), and within ``5e-2 * max|y|`` there;
* every kernel configuration compiles to a cubin for sm_90 (``triton.compile``, no GPU needed).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
import triton
from _kernel_sites import (
    N_TOKENS,
    OUT_TOL,
    QUANT_CASES,
    case_site,
    make_mask,
    make_x,
    op_args,
)
from splitq_modifier.kernels import (
    site_linear_triton,
    site_quantize_triton,
)

from splitq_modifier.runtime import (
    site_gemm_reference,
    site_linear_reference,
)

# --------------------------------------------------------------------------------------------
# The whole op
# --------------------------------------------------------------------------------------------
OP_CASES = [
    # case index, w_bits, mask, bias, input dtype override, out_dtype
    (0, (4, 4, 4), "mixed", True, None, None),
    (1, (4, 3, 3), None, False, None, None),
    (2, (8, 4, 4), "mixed", True, None, torch.float32),
    (3, (3, 2, 4), "text", True, None, None),
    (4, (4, 4, 4), "mixed", False, torch.float16, None),
    (5, (2, 2, 2), "vision", True, None, torch.bfloat16),
]


@pytest.mark.parametrize("ocase", OP_CASES)
def test_site_linear(ocase) -> None:
    idx, w_bits, mask_kind, with_bias, in_dtype, out_dtype = ocase
    p, dtype = case_site(QUANT_CASES[idx], with_bias, w_bits, seed=idx + 20)
    dtype = in_dtype or dtype
    x = make_x(N_TOKENS, p.d_in, dtype)
    mask = make_mask(mask_kind, N_TOKENS)
    args = op_args(p, x, mask, out_dtype)
    y = site_linear_triton(*args)
    want_dtype = out_dtype or dtype
    assert y.dtype == want_dtype and y.shape == (N_TOKENS, p.d_out)

    # Exactly the reference GEMM of the kernel's own codes ...
    acts = site_quantize_triton(x, p)
    own = site_gemm_reference(acts, p, mask, want_dtype)
    tol = OUT_TOL[want_dtype]
    scale = own.float().abs().max().item()
    torch.testing.assert_close(y, own, rtol=tol, atol=tol * scale)
    # ... and the full reference but where a code flipped (rare, bounded). On a site whose
    # main path runs with fp16 operands (<= 4 bits, >= 2 factors), ~2^-11 of each token's
    # absmax moves ~1 % of the MAC input codes by one step, and every such flip moves the
    # outputs of its token by ~1e-4 of their scale: the threshold is 1e-3 there.
    ref = site_linear_reference(*args).float()
    err = (y.float() - ref).abs()
    fast = p.a_bits[2] <= 4 and len(p.dims[2]) >= 2
    rel = max(tol, 1e-3 if fast else 1e-5)
    far = err > rel * scale + rel * ref.abs()
    assert far.float().mean().item() <= 0.05, far.float().mean().item()
    assert err.max().item() <= 5e-2 * scale


def test_op_dispatch_interpreter(monkeypatch) -> None:
    """``torch.ops.splitq.site_linear`` runs these kernels on CPU with SPLITQ_TRITON_INTERPRET=1
    (and the reference without it, or for weight-only sites)."""
    import splitq_modifier.kernels as kernels

    from splitq_modifier.runtime import site_linear

    p, _ = case_site(QUANT_CASES[0], bias=True)
    x = make_x(5, p.d_in, torch.float32)
    mask = make_mask("mixed", 5)
    calls = []
    real = kernels.site_linear_triton

    def spy(*args):
        calls.append(len(args))
        return real(*args)

    monkeypatch.setattr(kernels, "site_linear_triton", spy)
    monkeypatch.setenv("SPLITQ_TRITON_INTERPRET", "1")
    y = site_linear(x, p, mask)
    assert calls == [4]
    torch.testing.assert_close(y, real(*op_args(p, x, mask)), rtol=0, atol=0)
    p.a_bits = (16, 16, 16)
    site_linear(x, p, mask)
    assert calls == [4]  # weight-only: the reference
    monkeypatch.setenv("SPLITQ_TRITON_INTERPRET", "0")
    p.a_bits = (4, 4, 4)
    site_linear(x, p, mask)
    assert calls == [4]


def test_site_linear_decode_and_empty() -> None:
    """One token (decode: every token text) and zero tokens."""
    p, _ = case_site(QUANT_CASES[2], bias=True)
    x = make_x(1, p.d_in, torch.bfloat16)
    y = site_linear_triton(*op_args(p, x, None))
    acts = site_quantize_triton(x, p)
    own = site_gemm_reference(acts, p, None, torch.bfloat16)
    torch.testing.assert_close(y, own, rtol=1.6e-2, atol=1.6e-2 * own.float().abs().max().item())
    empty = site_linear_triton(*op_args(p, x[:0], None))
    assert empty.shape == (0, p.d_out) and empty.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------
# Compile for Hopper (no GPU needed) and, where a GPU exists, run for real
# --------------------------------------------------------------------------------------------
def _env_without_interpreter() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("SPLITQ_TRITON_INTERPRET", None)
    return env


def test_compile_sm90() -> None:
    """Every kernel config the launchers use on a GPU builds to a cubin for sm_90, at factor
    shapes of every family of the real-model table, within the shared-memory limit.

    ``triton.compile`` needs ptxas, which ships in the triton wheel; it runs in a subprocess
    because under ``TRITON_INTERPRET=1`` ``triton.jit`` yields uncompilable interpreted
    functions. Cubins are cached by Triton (``~/.triton/cache``), so reruns are fast.
    """
    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists() and not os.environ.get("TRITON_PTXAS_PATH"):
        pytest.skip(f"no ptxas at {ptxas} and TRITON_PTXAS_PATH unset: cannot build cubins")
    from benchmarks.compile_check import kernel_specs

    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.compile_check", "--arch", "90"],
        cwd=pathlib.Path(__file__).resolve().parents[1],
        env=_env_without_interpreter(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("ok ") == len(kernel_specs()), proc.stdout


_GPU_SCRIPT = r"""
import torch
from splitq_modifier.kernels import site_linear_triton, site_quantize_triton
from splitq_modifier.runtime import site_linear_reference
from splitq_modifier.runtime import site_transform_reference, site_quantize_reference
from splitq_modifier.testing.sites import random_site_params
for n, dtype, outs, sizes, dims in (
    (1, torch.bfloat16, (3584, 512, 512), (64, 64, 3456), ((64,), (64,), (54, 64))),
    (37, torch.float16, (3584,), (416, 384, 18144), ((16, 26), (16, 24), (24, 27, 28))),
    (1200, torch.bfloat16, (2048, 2048), (160, 160, 7872), ((10, 16), (10, 16), (64, 123))),
):
    p = random_site_params(outs, sizes, dims, cws_rank=20, mac_rank=30, bias=True,
                           device="cuda")
    x = (torch.randn(n, sum(sizes), device="cuda") * 3).to(dtype)
    mask = torch.rand(n, device="cuda") > 0.5
    y = site_linear_triton(x, p, mask)
    ref = site_linear_reference(x, p, mask)
    err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    assert err < 5e-2, (n, dtype, err)
    xt = site_transform_reference(x, p)
    got = site_quantize_triton(x, p)
    want = site_quantize_reference(xt, p)
    d = (got["qx"].int() - want["qx"].int()).abs()
    assert d.max() <= 1 and (d != 0).float().mean() <= 1e-3, (n, (d != 0).float().mean())
    print(n, "mismatch", (d != 0).float().mean().item(), "rel err", err)
print("gpu ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_reference() -> None:
    proc = subprocess.run([sys.executable, "-c", _GPU_SCRIPT], env=_env_without_interpreter(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0 and "gpu ok" in proc.stdout, proc.stdout + proc.stderr[-5000:]
