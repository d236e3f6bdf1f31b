"""Triton kernels of the SplitQ activation site, run on CPU through Triton's interpreter.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before the kernels are imported; the launch
functions are called directly on CPU tensors (and once through ``torch.ops.splitq.site_linear``
with ``SPLITQ_TRITON_INTERPRET=1``). What is checked, and with which tolerance:

* **kernel A, transform** (``xt``) vs ``site_transform_reference``: the two sum the fp32
  products of the Kronecker factors in different orders, so ``|xt - ref| <= 1e-5 * max|ref|``
  per token (fp32 rounding, a few ulps of the row's largest value);
* **kernel A, quantization given its own** ``xt``: every code and scale (``qx``, ``sx``, ``hq``,
  ``sh``, ``uq``, ``su``, ``gq``, ``sg``) is *equal* to ``site_quantize_reference(xt)``: from the
  same fp32 input the kernel takes the reference's IEEE decisions;
* **kernel A vs the full reference** (from ``x``): the fp32 transform differences move a value
  across a rounding boundary now and then, so codes agree on >= 99.9 % of entries and every
  mismatch is off by one (measured: see the report printed by ``test_code_agreement``);
* **kernel B** vs ``site_gemm_reference`` on the same codes: fp32 output within ``1e-6``
  relative (the interpreter applies the epilogue in the reference's order; a GPU may contract
  FMAs); fp16/bf16 outputs within two ulps;
* **the whole op** vs ``site_linear_reference``: equal to ``site_gemm_reference`` of the
  kernel's own codes as above, and within ``1e-5`` (fp32) of the reference on all but the few
  outputs that a flipped code touches, and within ``5e-2 * max|y|`` there;
* every kernel configuration compiles to a cubin for sm_90 (``triton.compile``, no GPU needed).
"""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from splitq_modifier.kernels import (
    plan_stages,
    site_gemm_triton,
    site_linear_triton,
    site_quantize_triton,
)
from splitq_modifier.kernels.common import load_packed_kmajor, load_packed_rows, round_half_even

from splitq_modifier.layout import plan_site
from splitq_modifier.runtime import (
    SiteParams,
    build_site_params,
    pack_path_weight,
    site_gemm_reference,
    site_linear_reference,
    site_quantize_reference,
    site_transform_reference,
)
from splitq_modifier.widths import REAL_MODELS, site_widths

OUT_TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
N_TOKENS = 21  # not a multiple of any block size


# --------------------------------------------------------------------------------------------
# Site builder: per-linear ranks may differ (random_site_params gives all linears one rank)
# --------------------------------------------------------------------------------------------
def make_site(
    out_splits: tuple[int, ...],
    sizes: tuple[int, int, int],
    dims: tuple[tuple[int, ...], ...],
    w_bits: tuple[int, int, int] = (4, 4, 4),
    a_bits: tuple[int, int, int] = (4, 4, 4),
    cws: tuple[int, ...] | None = None,
    mac: tuple[int, ...] | None = None,
    branch_bits: tuple[int, int] = (4, 4),
    mac_input: int = 0,
    bias: bool = False,
    seed: int = 0,
) -> SiteParams:
    """Random site: Gaussian weights, random orthogonal factors scaled by ~U(0.5, 1.5) rows
    (so the transform is not norm-preserving), positive smoothing, a random permutation."""
    gen = torch.Generator().manual_seed(seed)
    d, big_d, km = sum(sizes), sum(out_splits), sizes[2]

    def factor(n: int) -> torch.Tensor:
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return (q * (torch.rand(n, 1, generator=gen, dtype=torch.float64) + 0.5)).float()

    def branch(ranks):
        if ranks is None:
            return None
        downs = [torch.randn(r, km, generator=gen) * km**-0.5 for r in ranks]
        ups = [torch.randn(o, r, generator=gen) * 0.3 * d**-0.5 for o, r in zip(out_splits, ranks)]
        return downs, ups

    return build_site_params(
        [torch.randn(big_d, k, generator=gen) * d**-0.5 for k in sizes],
        out_splits,
        torch.randperm(d, generator=gen),
        torch.rand(d, generator=gen) + 0.5,
        [[factor(n) for n in path] for path in dims],
        w_bits,
        a_bits,
        torch.rand(3, generator=gen) * 0.2 + 0.8,
        branch(cws),
        branch(mac),
        branch_bits,
        mac_input,
        torch.randn(big_d, generator=gen) if bias else None,
    )


def make_x(n: int, d: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) * torch.linspace(0.1, 4.0, d)
    x[:, torch.randperm(d, generator=gen)[:3]] *= 12.0  # a few outlier channels
    if n > 4:
        x[4] = 0.0  # an all-zero token takes the 1e-8 floor
    return x.to(dtype)


def make_mask(kind: str | None, n: int) -> torch.Tensor | None:
    if kind is None:
        return None
    if kind == "text":
        return torch.ones(n, dtype=torch.bool)
    if kind == "vision":
        return torch.zeros(n, dtype=torch.bool)
    return torch.rand(n, generator=torch.Generator().manual_seed(5)) > 0.5


def ref_quantize(p: SiteParams, xt: torch.Tensor) -> dict:
    return site_quantize_reference(xt, p)


def op_args(p: SiteParams, x, mask, out_dtype=None) -> tuple:
    """Arguments of site_linear_{triton,reference}."""
    return (x, p, mask, out_dtype)


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
def _unpack_kernel(p_ptr, out_ptr, out_t_ptr, N, K, stride_p, BITS: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    n = tl.arange(0, BLOCK_N)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        tile = load_packed_kmajor(p_ptr, n, n < N, stride_p, k0, K, BITS, BLOCK_K, BLOCK_N)
        m = (kk < K)[:, None] & (n < N)[None, :]
        tl.store(out_ptr + n[None, :] * K + kk[:, None], tile, mask=m)
        rows = load_packed_rows(p_ptr, n, n < N, stride_p, k0, K, BITS, BLOCK_K, BLOCK_N)
        tl.store(out_t_ptr + n[:, None] * K + kk[None, :], rows, mask=(n < N)[:, None] &
                 (kk < K)[None, :])  # fmt: skip


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_unpack_tiles(bits: int) -> None:
    """Both in-kernel unpackers read compressed-tensors' dense packing (k % 32 != 0)."""
    n, k = 5, 101
    qmax = 2 ** (bits - 1) - 1
    codes = torch.randint(-qmax - 1, qmax + 1, (n, k), dtype=torch.int8)
    packed = pack_path_weight(codes, bits)
    out, out_t = torch.zeros(n, k, dtype=torch.int8), torch.zeros(n, k, dtype=torch.int8)
    _unpack_kernel[(1,)](packed, out, out_t, n, k, packed.stride(0), BITS=bits, BLOCK_K=64,
                         BLOCK_N=8)  # fmt: skip
    assert torch.equal(out, codes)
    assert torch.equal(out_t, codes)


def _real_site_plans():
    seen = {}
    for m in REAL_MODELS.values():
        for name, (d, outs) in site_widths(m).items():
            plan = plan_site(d, outs, 0.02, 0.02)
            seen.setdefault((plan.sizes, plan.dims), f"{m.name}:{name}")
    return seen


def test_plan_stages_real_models() -> None:
    """Stage tables of every real-model site at every config: tiles within budget, legal dot
    shapes (M >= 16, sides padded to >= 16), each path covered, final stage token-major."""
    from splitq_modifier.runtime import flatten_factor_dims

    plans = _real_site_plans()
    assert len(plans) > 10
    cfgs = [{"BLOCK_M": 16, "TILE": 4096, "NO": 64}, {"BLOCK_M": 64, "TILE": 8192, "NO": 64}]
    for (sizes, dims), _label in plans.items():
        fd = flatten_factor_dims(dims)
        for cfg in cfgs:
            st = plan_stages(sizes, fd, cfg["BLOCK_M"], cfg["TILE"], cfg["NO"])
            for path in range(3):
                mine = [s for s in st if s[0] == path]
                pairs = sum(s[13] for s in mine)
                assert pairs <= 1
                assert len(mine) == (max(len(dims[path]), 1) - pairs if sizes[path] else 0)
                if mine:
                    assert mine[-1][2] == 1 and all(s[2] == 0 for s in mine[:-1])
                    assert mine[0][1] in (0, 1) and all(s[1] == 2 for s in mine[1:])
            for st_ in st:
                _p, kind, final, _start, k, a, ni, b, ro, cb, np_, _f_off, no, pair, _off_b = st_
                assert a * ni * b == k
                if kind:
                    assert np_ >= max(ni, 16) and np_ & (np_ - 1) == 0 and no <= np_
                    assert ro * cb * np_ <= cfg["TILE"] and ro * cb >= 16
                    assert ro & (ro - 1) == 0 and cb & (cb - 1) == 0
                if pair:
                    assert cb >= max(b, 16) and max(np_, cb) <= 64
                elif kind:
                    assert math.ceil(b / cb) * cb / b <= 1.34, (sizes, dims, b, cb)
                if final:
                    assert a == 1 and cfg["BLOCK_M"] % ro == 0


# --------------------------------------------------------------------------------------------
# Kernel A: transform and quantization
# --------------------------------------------------------------------------------------------
QUANT_CASES = [
    # out_splits, sizes, dims, a_bits, branch_bits, cws ranks, mac ranks, mac_input, dtype
    ((40, 24), (6, 9, 120), ((6,), (3, 3), (4, 5, 6)), (4, 4, 4), (4, 4), (3, 5), (4, 2), 0,
     torch.float32),
    ((30,), (0, 11, 150), ((), (11,), (10, 15)), (8, 2, 3), (3, 8), (5,), None, 0,
     torch.bfloat16),
    ((17, 9, 9), (13, 0, 99), ((13,), (), (9, 11)), (4, 3, 8), (4, 3), None, (7, 2, 3), 1,
     torch.float16),
    ((33, 20), (5, 6, 77), ((), (), ()), (2, 4, 2), (2, 4), (2, 3), (33, 4), 0, torch.float32),
    ((25,), (0, 0, 90), ((), (), (2, 3, 15)), (4, 4, 4), (4, 4), (4,), (6,), 1, torch.bfloat16),
    ((24, 8), (16, 16, 140), ((4, 4), (16,), (2, 70)), (8, 8, 8), (8, 8), None, None, 0,
     torch.float32),
]  # fmt: skip


def _case_site(case, bias=False, w_bits=(4, 4, 4), seed=0) -> tuple[SiteParams, torch.dtype]:
    outs, sizes, dims, a_bits, bb, cws, mac, mi, dtype = case
    p = make_site(outs, sizes, dims, w_bits, a_bits, cws, mac, bb, mi, bias, seed)
    return p, dtype


def _check_codes_close(got: torch.Tensor, want: torch.Tensor, what: str, stats: list) -> None:
    diff = (got.int() - want.int()).abs()
    stats.append((what, int((diff != 0).sum()), diff.numel()))
    assert int(diff.max()) <= 1 if diff.numel() else True, f"{what}: a code is off by > 1"
    assert (diff != 0).float().mean().item() <= 1e-3 if diff.numel() else True, what


CODE_STATS: list = []


@pytest.mark.parametrize("case", QUANT_CASES)
def test_site_quantize(case) -> None:
    p, dtype = _case_site(case)
    x = make_x(N_TOKENS, p.d_in, dtype)
    got = site_quantize_triton(x, p, store_uq=True)

    # (1) transform: fp32 within a few ulps of each token's largest value
    xt_ref = site_transform_reference(x, p)
    tol = 1e-5 * xt_ref.abs().amax(dim=1, keepdim=True) + 1e-30
    assert got["xt"].dtype == torch.float32
    assert ((got["xt"] - xt_ref).abs() <= tol).all()

    # (2) quantization of the kernel's own xt: bit-exact
    want = ref_quantize(p, got["xt"])
    for key in ("qx", "sx", "hq", "sh", "uq", "su", "gq", "sg"):
        if want[key] is None:
            assert got[key] is None, key
        else:
            assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
            assert torch.equal(got[key], want[key]), key

    # (3) against the reference from x: codes equal but for rare off-by-one flips
    full = ref_quantize(p, xt_ref)
    for key in ("qx", "hq", "uq", "gq"):
        if full[key] is not None:
            _check_codes_close(got[key], full[key], key, CODE_STATS)
    torch.testing.assert_close(got["sx"], full["sx"], rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "cfg",
    [
        {"BLOCK_M": 32, "BLOCK_K": 64, "TILE": 256, "NO": 16, "num_warps": 4},
        {"BLOCK_M": 64, "BLOCK_K": 32, "TILE": 1024, "NO": 16, "num_warps": 4},
    ],
)
def test_site_quantize_small_tiles(cfg, monkeypatch) -> None:
    """GPU-like stage tables under the interpreter: output blocks narrower than a factor,
    column chunks, final stages of fewer tokens than the block (the absmax scatter)."""
    import splitq_modifier.kernels.site_quant as sq

    monkeypatch.setattr(sq, "site_quant_config", lambda n: dict(cfg))
    st = sq.plan_stages((24, 0, 120), [24, 0, 0, 0, 0, 0, 2, 3, 20], cfg["BLOCK_M"],
                        cfg["TILE"], cfg["NO"])  # fmt: skip
    assert any(s[2] and s[8] < cfg["BLOCK_M"] for s in st)  # a final stage with RO < BLOCK_M
    assert any(s[12] < s[10] for s in st)  # a factor produced in several output blocks
    assert any(s[13] for s in st) and any(s[1] and not s[13] for s in st)  # pair and single
    p = make_site((20,), (24, 0, 120), ((24,), (), (2, 3, 20)), (4, 4, 4), (4, 4, 8), (3,),
                  (4,), seed=4)  # fmt: skip
    x = make_x(N_TOKENS, p.d_in, torch.float32)
    got = sq.site_quantize_triton(x, p, store_uq=True)
    xt_ref = site_transform_reference(x, p)
    assert ((got["xt"] - xt_ref).abs() <= 1e-5 * xt_ref.abs().amax(1, keepdim=True)).all()
    want = ref_quantize(p, got["xt"])
    for key in ("qx", "sx", "hq", "sh", "uq", "su", "gq", "sg"):
        assert torch.equal(got[key], want[key]), key


def test_code_agreement() -> None:
    """Code agreement of kernel A with the full reference over larger inputs (N=128 tokens,
    the shape families of real models at reduced width); prints the measured mismatch rate."""
    stats = []
    for dims, sizes in (
        (((16,), (8, 4), (12, 16)), (16, 32, 192)),
        (((32,), (32,), (4, 6, 8)), (32, 32, 192)),
    ):
        for a_bits in ((4, 4, 4), (8, 8, 8), (4, 4, 2)):
            p = make_site((48,), sizes, dims, (4, 4, 4), a_bits, (6,), (8,), seed=3)
            x = make_x(128, p.d_in, torch.bfloat16, seed=9)
            got = site_quantize_triton(x, p)
            xt_ref = site_transform_reference(x, p)
            full = ref_quantize(p, xt_ref)
            for key in ("qx", "hq", "gq"):
                _check_codes_close(got[key], full[key], f"{key} a_bits={a_bits}", stats)
    stats += CODE_STATS
    flips, total = sum(s[1] for s in stats), sum(s[2] for s in stats)
    print(f"\nkernel A vs reference: {flips} of {total} codes differ ({flips / total:.2e})")
    assert flips / total <= 1e-3


def test_site_quantize_empty_and_decode() -> None:
    p, _ = _case_site(QUANT_CASES[0])
    x = make_x(1, p.d_in, torch.float32)
    got = site_quantize_triton(x, p)
    want = ref_quantize(p, got["xt"])
    assert torch.equal(got["qx"], want["qx"]) and torch.equal(got["gq"], want["gq"])
    empty = site_quantize_triton(x[:0], p)
    assert empty["qx"].shape == (0, p.d_in) and empty["sh"].shape == (0, 2)


# --------------------------------------------------------------------------------------------
# Kernel B: GEMM over the concatenated weights, branch up-projections, bias
# --------------------------------------------------------------------------------------------
GEMM_CASES = [
    # case index (QUANT_CASES), w_bits, mask, bias, out_dtype
    (0, (4, 4, 4), "mixed", True, torch.float32),
    (1, (2, 3, 3), None, True, torch.bfloat16),
    (2, (3, 2, 4), "mixed", False, torch.float16),
    (3, (4, 4, 2), "vision", False, torch.float32),
    (4, (8, 4, 3), "text", True, torch.float32),
    (5, (8, 8, 8), None, False, torch.float32),
]


@pytest.mark.parametrize("gcase", GEMM_CASES)
def test_site_gemm(gcase) -> None:
    idx, w_bits, mask_kind, with_bias, out_dtype = gcase
    p, dtype = _case_site(QUANT_CASES[idx], with_bias, w_bits, seed=idx + 10)
    x = make_x(N_TOKENS, p.d_in, dtype)
    xt = site_transform_reference(x, p)
    acts = ref_quantize(p, xt)
    mask = make_mask(mask_kind, N_TOKENS)
    y = site_gemm_triton(acts, p, mask, out_dtype)
    ref = site_gemm_reference(acts, p, mask, out_dtype)
    assert y.dtype == out_dtype and y.shape == (N_TOKENS, p.d_out)
    tol = OUT_TOL[out_dtype]
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol * ref.float().abs().max().item())


@pytest.mark.parametrize("row", [r for r in range(4)])
def test_site_gemm_gpu_configs(row, monkeypatch) -> None:
    """Each GPU block configuration (decode GEMV-style tile included) under the interpreter,
    on a 3-linear site whose segments do not align with the tiles."""
    import splitq_modifier.kernels.site_gemm as sg

    _max_n, bo, bt, bk, _w, _s = sg.SITE_GEMM_GPU_CONFIGS[row]
    cfg = {"BLOCK_O": bo, "BLOCK_T": bt, "BLOCK_K": bk, "num_warps": 4}
    monkeypatch.setattr(sg, "site_gemm_config", lambda n: dict(cfg))
    p = make_site((70, 33, 33), (8, 8, 300), ((8,), (8,), (15, 20)), (4, 3, 2), (4, 4, 4),
                  (5, 2, 3), (6, 3, 1), bias=True, seed=8)  # fmt: skip
    x = make_x(N_TOKENS, p.d_in, torch.bfloat16)
    xt = site_transform_reference(x, p)
    acts = ref_quantize(p, xt)
    mask = make_mask("mixed", N_TOKENS)
    y = sg.site_gemm_triton(acts, p, mask, torch.float32)
    ref = site_gemm_reference(acts, p, mask, torch.float32)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


def test_mac_rows_follow_text_mask() -> None:
    """Vision rows get no MAC term: they equal the output of the same site without MAC."""
    case = QUANT_CASES[0]
    p, _ = _case_site(case)
    p_no_mac, _ = _case_site(case)
    p_no_mac.mac = None
    x = make_x(N_TOKENS, p.d_in, torch.float32)
    mask = make_mask("mixed", N_TOKENS)
    y = site_linear_triton(*op_args(p, x, mask))
    y0 = site_linear_triton(*op_args(p_no_mac, x, mask))
    assert torch.equal(y[~mask], y0[~mask])
    assert not torch.allclose(y[mask], y0[mask])


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
    p, dtype = _case_site(QUANT_CASES[idx], with_bias, w_bits, seed=idx + 20)
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
    # ... and the full reference but where a code flipped (rare, bounded).
    ref = site_linear_reference(*args).float()
    err = (y.float() - ref).abs()
    far = err > max(tol, 1e-5) * scale + max(tol, 1e-5) * ref.abs()
    assert far.float().mean().item() <= 0.05, far.float().mean().item()
    assert err.max().item() <= 5e-2 * scale


def test_op_dispatch_interpreter(monkeypatch) -> None:
    """``torch.ops.splitq.site_linear`` runs these kernels on CPU with SPLITQ_TRITON_INTERPRET=1
    (and the reference without it, or for weight-only sites)."""
    import splitq_modifier.kernels as kernels

    from splitq_modifier.runtime import site_linear

    p, _ = _case_site(QUANT_CASES[0], bias=True)
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
    p, _ = _case_site(QUANT_CASES[2], bias=True)
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
    (300, torch.bfloat16, (2048, 2048), (160, 160, 7872), ((10, 16), (10, 16), (64, 123))),
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
