"""Kernel A (transform + quantize + branch down-projections) under Triton's interpreter.

The contract follows the numerics of ``kernels/site_quant.py`` (its module doc):

* **fast main path** (<= 4 activation bits, >= 2 Kronecker factors; fp16 operands): codes
  within +-1 of the fp32 reference, at most 1e-3 of them different (measured over a larger
  sample in :func:`test_code_agreement`), the quantization MSE within 1 % of the reference's;
* **exact paths** (outlier paths, 8-bit paths, paths with fewer than two factors): the
  reference's codes up to rare +-1 flips from fp32 summation order, scales within fp32
  rounding;
* ``qsum``: the exact per-path sums of the kernel's own codes;
* branches: ``hq``/``sh`` *equal* the reference's per-segment quantization of
  ``(qx_m @ L2^T) * s_m * l2_scale`` with the kernel's own main codes and scale, ``gq``/``sg``
  the same from the kernel's own ``uq``/``su``; ``uq`` within +-1 of the reference's
  quantization of ``xt - q * s`` (``xt`` the fp32 reference transform, ``q``, ``s``, ``su`` the
  kernel's), differing on at most 3 % of the entries of a fast path (its fp16 transform moves
  ``u`` by ~2^-11 of the token's absmax, which is ~1 % of a MAC code step at 4 bits);
* the decode configuration (one token per K1 program, split-K atomics in K2) gives the
  prefill configuration's codes.

The interpreter rounds fp16 operands as a GPU does (the kernel casts them explicitly) but
accumulates dots in numpy fp32. Only a GPU checks: the MMA's own accumulation order, the
inline PTX (nibble split, ``mul.rn``), the ``acq_rel`` counter and integer atomics of K2 under
real concurrency, and the register/shared-memory budgets (compiled in ``tests/test_kernels.py``).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from _kernel_sites import N_TOKENS, QUANT_CASES, case_site, make_site, make_x
from splitq_modifier.kernels import plan_paths, site_quantize_triton
from splitq_modifier.kernels import site_quant as sq
from splitq_modifier.kernels.common import round_half_even

from splitq_modifier.layout import plan_site
from splitq_modifier.runtime import (
    SiteParams,
    flatten_factor_dims,
    site_quantize_reference,
    site_transform_reference,
)
from splitq_modifier.runtime.quant import imatmul, unpack_path_weight
from splitq_modifier.runtime.reference import _segment_quantize
from splitq_modifier.widths import REAL_MODELS, site_widths

DECODE = {"BRANCH": 2, "ROWS": False, "BK": 64, "num_warps": 4, "num_stages": 1}


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
def _codes_kernel(y_ptr, s_ptr, q_ptr, c_ptr, p_ptr, BLOCK: tl.constexpr, QMAX: tl.constexpr,
                  FAST: tl.constexpr):  # fmt: skip
    offs = tl.arange(0, BLOCK)
    s = tl.load(s_ptr)
    inv = tl.div_rn(tl.full([], 1.0, tl.float32), s)
    q, code = sq._codes(tl.load(y_ptr + offs), inv, s, QMAX, FAST)
    tl.store(q_ptr + offs, q)
    tl.store(c_ptr + offs, code)
    sc, inv_sc = sq._pow2_scale(tl.load(y_ptr + offs))
    tl.store(p_ptr + offs, sc * inv_sc)


@pytest.mark.parametrize("fast", [False, True])
def test_codes_round_clamp_and_int8(fast) -> None:
    """``_codes``: clamp(round_half_even(y / s)) as the reference (ties, both clamps, the
    low byte of ``y + 1.5 * 2^23`` as the int8 code); ``_pow2_scale`` is an exact pair."""
    s = torch.tensor([0.25])
    y = torch.cat([torch.tensor([0.125, -0.125, 0.375, -0.375, 1.875, -1.875, 100.0, -100.0,
                                 0.0, -0.0]), torch.randn(54) * 3])  # fmt: skip
    q, code, prod = torch.empty(64), torch.empty(64, dtype=torch.int8), torch.empty(64)
    _codes_kernel[(1,)](y, s, q, code, prod, BLOCK=64, QMAX=7, FAST=fast)
    want = torch.clamp(torch.round(y / s), -8, 7)
    if fast:  # y * (1 / 0.25) is exact here too
        assert torch.equal(q, want)
    else:
        assert torch.equal(q, want)
    assert torch.equal(code, want.to(torch.int8))
    assert torch.equal(prod, torch.ones(64))


# --------------------------------------------------------------------------------------------
# Path plans and launch geometry
# --------------------------------------------------------------------------------------------
def _real_sites() -> dict:
    seen = {}
    for m in REAL_MODELS.values():
        for name, (d, outs) in site_widths(m).items():
            plan = plan_site(d, outs, 0.02, 0.02)
            seen.setdefault((plan.sizes, plan.dims), f"{m.name}:{name}")
    return seen


@pytest.mark.parametrize("rows", [False, True])
def test_plan_paths_real_models(rows) -> None:
    """Every real-model site plans within the tile budgets: one mode per factor count, fast
    only on the main path at <= 4 bits with >= 2 factors, whole-token tiles for pairs, mode-3
    stages within ``TILE_MAX`` with column chunks padding by at most 1/8 (or the least), and
    token tiles for the outlier paths when ``rows``."""
    sites = _real_sites()
    assert len(sites) > 10
    for (sizes, dims), label in sites.items():
        fd = flatten_factor_dims(dims)
        for bits in ((4, 4, 4), (4, 4, 3), (8, 8, 8)):
            plans = plan_paths(sizes, fd, bits, rows=rows)
            start = 0
            for p, pl in enumerate(plans):
                assert pl.start == start and pl.k == sizes[p], label
                start += pl.k
                assert pl.mode == len(dims[p]), label
                assert pl.fast == int(p == 2 and bits[p] <= 4 and pl.mode >= 2), label
                assert all(n == 0 or (n >= 16 and n & (n - 1) == 0) for n in pl.padded[1:])
                if pl.mode == 2:
                    assert pl.padded[0] * pl.padded[1] <= sq.PAIR_MAX and pl.chunks == 1
                if pl.mode == 3:
                    c = pl.sides[1] * pl.sides[2]
                    assert pl.sa * pl.padded[1] * pl.padded[2] <= sq.TILE_MAX
                    assert pl.padded[0] * pl.cb <= sq.TILE_MAX
                    assert pl.chunks * pl.cb >= c and (pl.chunks - 1) * pl.cb < c
                    assert pl.chunks * pl.cb <= c * 9 / 8 or pl.cb == 16, (label, pl.cb)
                tile = pl.padded[0] * max(pl.padded[1], 1) * max(pl.rows, 1)
                assert pl.rows == 0 or (p < 2 and rows and tile <= sq.TILE_MAX), label
                if rows and p < 2 and pl.mode in (1, 2):
                    assert pl.rows >= 1


def test_grid_fills_the_gpu() -> None:
    """At prefill (2048+ tokens) K1 runs one contiguous token range per SM (132 programs, the
    busiest with ``cdiv(N, 132)`` tokens); at decode one program per token, and K2 splits the
    branch channels over programs, covering them."""
    for n in (2048, 8192):
        cfg = sq.site_quant_config(n, interpret=False)
        g = sq.site_quant_grid(n, cfg, 18144, 132)
        assert cfg["BRANCH"] == 1 and g["G"] == 132 and g["T"] == 16
        assert g["per_program"] == -(-n // 132)
    for n, km in ((1, 3456), (16, 18144), (300, 3456)):
        cfg = sq.site_quant_config(n, interpret=False)
        g = sq.site_quant_grid(n, cfg, km, 132)
        assert cfg["BRANCH"] == 2 and g["G"] == min(n, 264) and g["per_program"] <= 2
        assert g["S"] * g["k_split"] >= km > (g["S"] - 1) * g["k_split"]
        assert g["k_split"] % cfg["BK"] == 0 and g["S"] * g["tiles"] <= 264
        assert g["S"] > 1


# --------------------------------------------------------------------------------------------
# Kernel A against the reference
# --------------------------------------------------------------------------------------------
def _fast(p: SiteParams) -> bool:
    return int(p.a_bits[2]) <= 4 and len(p.dims[2]) >= 2


def _code_stats(got: torch.Tensor, want: torch.Tensor) -> tuple[int, int, int]:
    d = (got.int() - want.int()).abs()
    return int(d.max()) if d.numel() else 0, int((d != 0).sum()), d.numel()


def check_site(p: SiteParams, x: torch.Tensor, got: dict, stats: dict | None = None) -> None:
    """Assert the contract of the module doc for one site's kernel outputs."""
    b = p.bounds
    xt = site_transform_reference(x, p)
    ref = site_quantize_reference(xt, p)
    # exact code sums of the kernel's own codes
    qs = torch.stack([got["qx"][:, b[i] : b[i + 1]].sum(1, dtype=torch.int32) for i in range(3)],
                     dim=1)  # fmt: skip
    assert got["qsum"].dtype == torch.int32 and torch.equal(got["qsum"], qs)
    for i in range(3):
        g, w = got["qx"][:, b[i] : b[i + 1]], ref["qx"][:, b[i] : b[i + 1]]
        mx, n, tot = _code_stats(g, w)
        assert mx <= 1, (i, mx)
        fast = i == 2 and _fast(p)
        if stats is not None:
            stats.setdefault("fast" if fast else "exact", []).append((n, tot))
        if fast:
            xm = xt[:, b[2] :]
            mse = ((g.float() * got["sx"][:, 2:] - xm) ** 2).mean()
            mse_ref = ((w.float() * ref["sx"][:, 2:] - xm) ** 2).mean()
            assert abs(mse / mse_ref - 1) <= 0.01, (mse, mse_ref)
            torch.testing.assert_close(got["sx"][:, 2], ref["sx"][:, 2], rtol=2e-3, atol=0)
        else:
            assert n <= max(1, tot // 1000), (i, n, tot)
            torch.testing.assert_close(got["sx"][:, i], ref["sx"][:, i], rtol=1e-5, atol=0)
    km = b[3] - b[2]
    q_m, s_m = got["qx"][:, b[2] :], got["sx"][:, 2]
    if p.cws is None:
        assert got["hq"] is None and got["sh"] is None
    else:
        l2 = unpack_path_weight(p.cws.down, p.cws.w_bits, km)
        h = imatmul(q_m, l2) * s_m[:, None] * p.cws.down_scale[None, :]
        hq, sh = _segment_quantize(h, p.cws.ranks, p.cws.act_bits)
        assert torch.equal(got["hq"], hq) and torch.equal(got["sh"], sh)
    if p.mac is None:
        assert got["gq"] is None and got["su"] is None
    else:
        qmax_u = (1 << (p.mac.act_bits - 1)) - 1
        dq = q_m.float() * s_m[:, None]
        u = xt[:, b[2] :] - dq if p.mac_input == 0 else dq
        su = got["su"]
        uq = torch.clamp(torch.round(u / su[:, None]), -qmax_u - 1, qmax_u)
        mx, n, tot = _code_stats(got["uq"], uq)
        assert mx <= 1 and n <= (0.03 * tot if _fast(p) else max(1, tot // 1000)), (mx, n, tot)
        su_ref = u.abs().amax(1).clamp_min(1e-8) / qmax_u
        rtol = 0.05 if _fast(p) and p.mac_input == 0 else 1e-5
        torch.testing.assert_close(su, su_ref, rtol=rtol, atol=0)
        l4 = unpack_path_weight(p.mac.down, p.mac.w_bits, km)
        g = imatmul(got["uq"], l4) * su[:, None] * p.mac.down_scale[None, :]
        gq, sg = _segment_quantize(g, p.mac.ranks, p.mac.act_bits)
        assert torch.equal(got["gq"], gq) and torch.equal(got["sg"], sg)
    assert got["xt"] is None


@pytest.mark.parametrize("case", QUANT_CASES)
def test_site_quantize(case) -> None:
    p, dtype = case_site(case)
    x = make_x(N_TOKENS, p.d_in, dtype)
    got = site_quantize_triton(x, p, store_uq=True)
    assert got["qx"].dtype == torch.int8 and got["qx"].shape == (N_TOKENS, p.d_in)
    assert got["sx"].shape == (N_TOKENS, 3) and got["qsum"].shape == (N_TOKENS, 3)
    check_site(p, x, got)


@pytest.mark.parametrize("idx", [0, 2, 3])
def test_decode_configuration(idx) -> None:
    """One token per K1 program and the split-K K2 (integer atomics, the last program's
    epilogue) give the prefill configuration's codes; scales agree to fp32 order."""
    p, dtype = case_site(QUANT_CASES[idx])
    x = make_x(N_TOKENS, p.d_in, dtype)
    pre = site_quantize_triton(x, p, store_uq=True)
    dec = site_quantize_triton(x, p, store_uq=True, config=DECODE)
    geo = sq.site_quant_grid(N_TOKENS, DECODE, p.sizes[2])
    assert geo["S"] > 1 and geo["G"] == N_TOKENS and geo["per_program"] == 1  # really split
    for key in ("qx", "qsum", "hq", "uq", "gq"):
        if pre[key] is not None:
            assert torch.equal(pre[key], dec[key]), key
    for key in ("sx", "sh", "su", "sg"):
        if pre[key] is not None:
            torch.testing.assert_close(pre[key], dec[key], rtol=3e-7, atol=0)


def test_chunked_passes(monkeypatch) -> None:
    """Small tile budgets: a mode-3 main path in several column chunks (absmax, codes, MAC
    passes; the MAC input through the scratch slot) and several slice steps, a mode-0 main
    path in chunks read again from x, outlier token tiles of few rows."""
    monkeypatch.setattr(sq, "TILE_MAX", 512)
    monkeypatch.setattr(sq, "COPY_CHUNK", 32)
    p = make_site((20,), (24, 0, 120), ((24,), (), (2, 3, 20)), (4, 4, 4), (4, 4, 4), (3,), (4,),
                  seed=4)  # fmt: skip
    pm = plan_paths(p.sizes, flatten_factor_dims(p.dims), p.a_bits, rows=True)[2]
    assert pm.mode == 3 and pm.chunks > 1 and pm.sa < 2
    x = make_x(N_TOKENS, p.d_in, torch.float32)
    check_site(p, x, site_quantize_triton(x, p, store_uq=True))
    p0 = make_site((16,), (0, 8, 80), ((), (8,), ()), (4, 4, 4), (4, 4, 4), (2,), (3,), seed=5)
    assert plan_paths(p0.sizes, flatten_factor_dims(p0.dims), p0.a_bits)[2].chunks == 3
    x0 = make_x(N_TOKENS, p0.d_in, torch.bfloat16)
    check_site(p0, x0, site_quantize_triton(x0, p0, store_uq=True))


def test_code_agreement() -> None:
    """Code agreement over larger inputs at reduced widths of the real shape families: a
    balanced pair on the main path (128 tokens) and three factors (32 tokens: the
    interpreter's cost is per token there); prints the measured rates."""
    stats: dict = {}
    for dims, sizes, n, bit_sets in (
        (((16,), (8, 4), (16, 16)), (16, 32, 256), 128, ((4, 4, 4), (4, 4, 3), (8, 8, 8))),
        (((32,), (32,), (4, 6, 8)), (32, 32, 192), 32, ((4, 4, 4), (8, 8, 8))),
    ):
        for a_bits in bit_sets:
            p = make_site((48,), sizes, dims, (4, 4, 4), a_bits, (6,), (8,), seed=3)
            x = make_x(n, p.d_in, torch.bfloat16, seed=9)
            check_site(p, x, site_quantize_triton(x, p, store_uq=True), stats)
    rates = {k: (sum(a for a, _ in v), sum(b for _, b in v)) for k, v in stats.items()}
    print("\nkernel A vs reference, codes that differ: "
          + ", ".join(f"{k} {a} of {b} ({a / b:.1e})" for k, (a, b) in rates.items()))  # fmt: skip
    assert rates["fast"][0] <= 1e-3 * rates["fast"][1]
    assert rates["exact"][0] <= 1e-4 * rates["exact"][1]


def test_site_quantize_empty_and_decode() -> None:
    p, _ = case_site(QUANT_CASES[0])
    x = make_x(1, p.d_in, torch.float32)
    check_site(p, x, site_quantize_triton(x, p, store_uq=True, config=DECODE))
    empty = site_quantize_triton(x[:0], p)
    assert empty["qx"].shape == (0, p.d_in) and empty["sh"].shape == (0, 2)
    assert empty["qsum"].shape == (0, 3)
