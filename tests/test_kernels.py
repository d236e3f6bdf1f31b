"""Triton kernels of the SplitQ linear, run on CPU through Triton's interpreter.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before the kernels are imported; the launch
functions are called directly on CPU tensors.

* integer activation quantization (codes and scales of the three paths, of the CWS hidden state,
  of the MAC input and hidden state): equal to the torch reference exactly;
* the linear output vs the torch reference (same dtype in, same dtype out). Tolerances
  (``rtol``, and ``atol`` relative to ``max|y|``): fp32 ``1e-5`` (the interpreter is in fact
  bit-exact; a GPU may contract the epilogue into FMAs), fp16 out ``2e-3`` (two fp16 ulps),
  bf16 out ``1.6e-2`` (two bf16 ulps: the interpreter truncates fp32 -> bf16 where the torch
  reference and the GPU round to nearest);
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
import triton.language as tl
from splitq_modifier.kernels import quantize_activations, splitq_linear_triton
from splitq_modifier.kernels.common import load_packed_kmajor, round_half_even

from splitq_modifier.runtime import (
    SplitQLinearParams,
    pack_path_weight,
    random_splitq_params,
)
from splitq_modifier.runtime.ops import (
    splitq_linear_reference,
    splitq_quantize_activations_reference,
)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
N_TOKENS = 21  # not a multiple of any block size


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
@triton.jit
def _round_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, round_half_even(tl.load(x_ptr + offs)))


def test_round_half_even() -> None:
    base = torch.tensor([-3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 0.49999997, -0.50000006])
    x = torch.cat([base, torch.randn(52) * 20, torch.tensor([2.0**23 + 1, -(2.0**24)])])
    y = torch.empty_like(x)
    _round_kernel[(1,)](x, y, BLOCK=64)
    assert torch.equal(y, torch.round(x))


@triton.jit
def _unpack_kernel(p_ptr, out_ptr, N, K, stride_p, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_N: tl.constexpr):  # fmt: skip
    n = tl.arange(0, BLOCK_N)
    for k0 in range(0, K, BLOCK_K):
        tile = load_packed_kmajor(p_ptr, n, n < N, stride_p, k0, K, BITS, BLOCK_K, BLOCK_N)
        kk = k0 + tl.arange(0, BLOCK_K)
        m = (kk < K)[:, None] & (n < N)[None, :]
        tl.store(out_ptr + n[None, :] * K + kk[:, None], tile, mask=m)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_load_packed_kmajor(bits: int) -> None:
    """The in-kernel unpack reads compressed-tensors' dense packing (k not a multiple of 32)."""
    n, k = 5, 101
    qmax = 2 ** (bits - 1) - 1
    codes = torch.randint(-qmax - 1, qmax + 1, (n, k), dtype=torch.int8)
    packed = pack_path_weight(codes, bits)
    out = torch.zeros(n, k, dtype=torch.int8)
    _unpack_kernel[(1,)](packed, out, n, k, packed.stride(0), BITS=bits, BLOCK_K=64, BLOCK_N=8)
    assert torch.equal(out, codes)


# --------------------------------------------------------------------------------------------
# Activation quantization: exact
# --------------------------------------------------------------------------------------------
QUANT_CASES = [
    # sizes, a_bits, branch_bits (cws_w, cws_a, mac_w, mac_a), cws_rank, mac_rank, mac_input
    ((7, 9, 301), (4, 4, 4), (4, 4, 4, 4), 5, 6, 0),
    ((0, 11, 150), (8, 2, 3), (3, 8, 2, 4), 3, 0, 0),
    ((13, 0, 99), (4, 3, 8), (4, 4, 3, 3), 0, 7, 1),
    ((5, 6, 77), (2, 4, 2), (2, 2, 4, 2), 2, 33, 0),
]


@pytest.mark.parametrize("case", QUANT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_quant_exact(case, dtype: torch.dtype) -> None:
    sizes, a_bits, bb, r1, r2, mac_input = case
    p = random_splitq_params(8, sizes, (4, 4, 4), a_bits, r1, r2, bb[:2], bb[2:], mac_input,
                             act_clip=(0.9, 1.0, 0.85))  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    d = sum(sizes)
    x = (torch.randn(N_TOKENS, d, generator=gen) * torch.linspace(0.1, 6.0, d)).to(dtype)
    x[4] = 0.0  # an all-zero token takes the 1e-8 floor
    sizes_l, a_l, _, bb_l, mi = p.int_args()
    cws, mac = p.cws, p.mac
    l2, l2s = (cws.down, cws.down_scale) if cws else (None, None)
    l4, l4s = (mac.down, mac.down_scale) if mac else (None, None)
    got = quantize_activations(x, p.act_clip, sizes_l, a_l, l2, l2s, l4, l4s, bb_l, mi,
                               store_uq=True)  # fmt: skip
    ref = splitq_quantize_activations_reference(x, p.act_clip, l2, l2s, l4, l4s, sizes_l, a_l,
                                                bb_l, mi)  # fmt: skip
    for key, want in ref.items():
        if want is None:
            assert got[key] is None, key
        else:
            assert got[key].dtype == want.dtype, key
            assert torch.equal(got[key], want), key


# --------------------------------------------------------------------------------------------
# The linear: kernels vs reference
# --------------------------------------------------------------------------------------------
LINEAR_CASES = [
    # sizes, w_bits, a_bits, cws_rank, mac_rank, mac_input, mask, bias, dtype
    ((5, 7, 90), (4, 4, 4), (4, 4, 4), 0, 0, 0, None, False, torch.float32),
    ((5, 7, 90), (4, 4, 4), (4, 4, 4), 3, 4, 0, "mixed", True, torch.float32),
    ((0, 9, 131), (2, 3, 3), (4, 4, 2), 4, 0, 0, None, True, torch.float32),
    ((6, 0, 70), (3, 2, 4), (8, 4, 4), 0, 5, 1, "mixed", False, torch.float32),
    ((3, 4, 61), (4, 4, 2), (4, 4, 4), 2, 3, 0, "text", False, torch.float32),
    ((3, 4, 61), (4, 4, 3), (4, 4, 3), 2, 3, 1, "vision", True, torch.float32),
    ((4, 4, 100), (8, 4, 4), (4, 8, 4), 3, 3, 0, "mixed", True, torch.float16),
    ((4, 4, 100), (4, 3, 2), (4, 4, 3), 3, 3, 1, "mixed", True, torch.bfloat16),
    ((0, 0, 64), (4, 4, 4), (4, 4, 4), 3, 3, 0, None, False, torch.float16),
]


def _mask(kind: str | None, n: int) -> torch.Tensor | None:
    if kind is None:
        return None
    if kind == "text":
        return torch.ones(n, dtype=torch.bool)
    if kind == "vision":
        return torch.zeros(n, dtype=torch.bool)
    return torch.rand(n, generator=torch.Generator().manual_seed(5)) > 0.5


def _flat_args(p: SplitQLinearParams, x, mask, bias, out_dtype=None) -> tuple:
    sizes, a_bits, w_bits, branch_bits, mac_input = p.int_args()
    return (x, *p.op_args(), mask, bias, sizes, a_bits, w_bits, branch_bits, mac_input, out_dtype)


@pytest.mark.parametrize("case", LINEAR_CASES)
def test_linear_matches_reference(case) -> None:
    sizes, w_bits, a_bits, r1, r2, mac_input, mask_kind, with_bias, dtype = case
    d_out = 72  # two 64-wide output tiles, the second one partial
    p = random_splitq_params(d_out, sizes, w_bits, a_bits, r1, r2, mac_input=mac_input,
                             act_clip=(0.95, 0.9, 0.9), seed=7)  # fmt: skip
    gen = torch.Generator().manual_seed(11)
    d = sum(sizes)
    x = (torch.randn(N_TOKENS, d, generator=gen) * torch.linspace(0.2, 3.0, d)).to(dtype)
    mask = _mask(mask_kind, N_TOKENS)
    bias = torch.randn(d_out, generator=gen).to(dtype) if with_bias else None
    args = _flat_args(p, x, mask, bias)
    y = splitq_linear_triton(*args)
    ref = splitq_linear_reference(*args)
    assert y.dtype == dtype and y.shape == (N_TOKENS, d_out)
    tol = TOL[dtype]
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_linear_out_dtype_and_empty() -> None:
    p = random_splitq_params(40, (2, 2, 60), cws_rank=2, mac_rank=2)
    x = torch.randn(3, 64).to(torch.bfloat16)
    args = _flat_args(p, x, None, None, torch.float32)
    y = splitq_linear_triton(*args)
    assert y.dtype == torch.float32
    ref = splitq_linear_reference(*args)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    empty = splitq_linear_triton(*_flat_args(p, x[:0], None, None))
    assert empty.shape == (0, 40)


# --------------------------------------------------------------------------------------------
# Compile for Hopper (no GPU needed) and, where a GPU exists, run for real
# --------------------------------------------------------------------------------------------
def _env_without_interpreter() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def test_compile_sm90() -> None:
    """Every kernel config the launchers use on a GPU builds to a cubin for sm_90.

    ``triton.compile`` needs ptxas, which ships in the triton wheel; it runs in a subprocess
    because under ``TRITON_INTERPRET=1`` ``triton.jit`` yields uncompilable interpreted
    functions.
    """
    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists() and not os.environ.get("TRITON_PTXAS_PATH"):
        pytest.skip(f"no ptxas at {ptxas} and TRITON_PTXAS_PATH unset: cannot build cubins")
    proc = subprocess.run(
        [sys.executable, "-m", "splitq_modifier.kernels.compile_check", "--arch", "90"],
        env=_env_without_interpreter(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("ok ") >= 5, proc.stdout


_GPU_SCRIPT = r"""
import torch
from splitq_modifier.runtime import random_splitq_params, splitq_linear
from splitq_modifier.runtime.ops import splitq_linear_reference
for n, dtype in ((1, torch.bfloat16), (37, torch.float16), (300, torch.bfloat16)):
    p = random_splitq_params(520, (20, 20, 984), (4, 3, 4), (4, 4, 4), 20, 30,
                             act_clip=(0.9, 0.9, 0.9), device="cuda")
    x = torch.randn(n, 1024, device="cuda").to(dtype)
    mask = torch.rand(n, device="cuda") > 0.5
    bias = torch.randn(520, device="cuda").to(dtype)
    y = splitq_linear(x, p, mask, bias)
    sizes, a, w, bb, mi = p.int_args()
    ref = splitq_linear_reference(x, *p.op_args(), mask, bias, sizes, a, w, bb, mi)
    err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    assert err < 1e-2, (n, dtype, err)
print("gpu ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_reference() -> None:
    proc = subprocess.run([sys.executable, "-c", _GPU_SCRIPT], env=_env_without_interpreter(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0 and "gpu ok" in proc.stdout, proc.stdout + proc.stderr[-5000:]
