"""Kernel A (transform + quantize + branch down-projections) under Triton's interpreter; see
``tests/test_kernels.py`` for the tolerances."""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl
from _kernel_sites import (
    N_TOKENS,
    QUANT_CASES,
    case_site,
    check_codes_close,
    make_site,
    make_x,
    ref_quantize,
)
from splitq_modifier.kernels import (
    plan_stages,
    site_quantize_triton,
)
from splitq_modifier.kernels.common import round_half_even

from splitq_modifier.layout import plan_site
from splitq_modifier.runtime import (
    site_transform_reference,
)
from splitq_modifier.widths import REAL_MODELS, site_widths


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
@pytest.mark.parametrize("case", QUANT_CASES)
def test_site_quantize(case) -> None:
    p, dtype = case_site(case)
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
            check_codes_close(got[key], full[key], key, [])
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
                check_codes_close(got[key], full[key], f"{key} a_bits={a_bits}", stats)
    flips, total = sum(s[1] for s in stats), sum(s[2] for s in stats)
    print(f"\nkernel A vs reference: {flips} of {total} codes differ ({flips / total:.2e})")
    assert flips / total <= 1e-3


def test_site_quantize_empty_and_decode() -> None:
    p, _ = case_site(QUANT_CASES[0])
    x = make_x(1, p.d_in, torch.float32)
    got = site_quantize_triton(x, p)
    want = ref_quantize(p, got["xt"])
    assert torch.equal(got["qx"], want["qx"]) and torch.equal(got["gq"], want["gq"])
    empty = site_quantize_triton(x[:0], p)
    assert empty["qx"].shape == (0, p.d_in) and empty["sh"].shape == (0, 2)
