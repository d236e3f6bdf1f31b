"""The torch reference of a SplitQ site and the ``splitq::site_linear`` op (CPU).

The integer reference is checked against an independently written dense float computation
(``tests/_dense.py``: dequantized weights, fake-quantized activations, fp32 matmuls): they
agree within fp32 tolerance (``rtol = 1e-5``, ``atol = 1e-5 * max|y|``), since both take the
same quantization decisions and differ only in the order of roundings. Then the runtime
modules: one op call per site (the members reuse it), ``torch.compile`` of a whole decoder
layer, the op count of a profiled forward, and a serving import without llm-compressor.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _dense import dense_site_forward

from splitq_modifier.runtime import (
    ModalityContext,
    SiteParams,
    SplitQSiteLinear,
    pack_path_weight,
    packed_words,
    quantize_weight_per_channel,
    site_linear,
    unpack_path_weight,
)
from splitq_modifier.testing.sites import random_site_params

RTOL = 1e-5
ATOL_REL = 1e-5


def _close(got: torch.Tensor, ref: torch.Tensor, rtol=RTOL, atol_rel=ATOL_REL) -> None:
    torch.testing.assert_close(
        got.float(), ref.float(), rtol=rtol, atol=atol_rel * float(ref.abs().max())
    )


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("k", [0, 1, 31, 33, 70])
def test_pack_roundtrip(bits: int, k: int) -> None:
    w = torch.randn(7, k)
    q, s = quantize_weight_per_channel(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert bool(((q >= -qmax - 1) & (q <= qmax)).all())
    packed = pack_path_weight(q, bits)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (7, packed_words(k, bits))
    assert torch.equal(unpack_path_weight(packed, bits, k), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_packing_is_compressed_tensors_019_layout(bits: int) -> None:
    """The runtime owns its packing (0.17 packs 3-bit codes differently); the bit layout is
    the one compressed-tensors 0.19's packer writes, which older checkpoints hold."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(bits)
    for k in (1, 10, 11, 32, 96, 101):
        q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, k), generator=g)
        q = q.to(torch.int8)
        assert torch.equal(pack_path_weight(q, bits), pack_to_int32(q, bits, packed_dim=1))


def test_weight_rounding_is_compressed_tensors_quantize() -> None:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize

    w = torch.randn(9, 50) * torch.linspace(0.1, 3, 50)
    for bits in (2, 3, 4, 8):
        q, s = quantize_weight_per_channel(w, bits)
        args = QuantizationArgs(num_bits=bits, symmetric=True, strategy="channel", type="int")
        assert torch.equal(q, quantize(w, s[:, None], None, args, dtype=torch.int8))


def test_quantize_weight_per_channel_formula() -> None:
    w = torch.randn(5, 40)
    clip = torch.tensor([1.0, 0.9, 0.5, 0.75, 1.0])
    q, s = quantize_weight_per_channel(w, 4, clip)
    expect_s = torch.clamp(w.abs().amax(1) * clip, min=1e-8) / 7
    torch.testing.assert_close(s, expect_s, rtol=0, atol=0)
    assert torch.equal(q, torch.clamp(torch.round(w / s[:, None]), -8, 7).to(torch.int8))
    # All-zero rows get the 1e-8 floor, not a division by zero.
    q0, s0 = quantize_weight_per_channel(torch.zeros(2, 8), 4)
    assert torch.all(s0 > 0) and torch.all(q0 == 0)


def test_op_encoding_round_trips() -> None:
    """SiteParams -> (tensors, meta) -> SiteParams is the identity, branches and bias
    present or absent, ranks differing per linear."""
    for r1, r2, bias in ((0, 0, False), ((2, 5), 0, True), (0, (4, 1), False), (3, 4, True)):
        p = random_site_params((16, 8), (4, 4, 40), ((4,), (2, 2), (5, 8)), (4, 3, 2),
                               (8, 4, 4), r1, r2, 1, bias=bias)  # fmt: skip
        tensors, meta = p.to_op()
        q = SiteParams.from_op(tensors, meta)
        assert q.to_op()[1] == meta
        assert all(a is b for a, b in zip(q.tensors(), tensors))
        for f in ("sizes", "dims", "out_splits", "w_bits", "a_bits", "mac_input"):
            assert getattr(q, f) == getattr(p, f), f
        for a, b in ((p.cws, q.cws), (p.mac, q.mac)):
            assert (a is None) == (b is None)
            if a is not None:
                assert (a.ranks, a.w_bits, a.act_bits) == (b.ranks, b.w_bits, b.act_bits)
    with pytest.raises(ValueError, match="meta version"):
        SiteParams.from_op(tensors, [99, *meta[1:]])


def test_validate_rejects_bad_shapes() -> None:
    p = random_site_params((16, 8), (4, 4, 40), cws_rank=3)
    p.validate()
    cut = dataclasses.replace(p, w_packed=(p.w_packed[0], p.w_packed[1], p.w_packed[2][:, :-1]))
    with pytest.raises(ValueError, match=r"w_packed\[2\]"):
        cut.validate()
    with pytest.raises(ValueError, match="factors"):
        dataclasses.replace(p, factors=p.factors[:-1]).validate()
    with pytest.raises(ValueError, match="perm"):
        dataclasses.replace(p, perm=p.perm.long()).validate()
    with pytest.raises(ValueError, match="all be quantized or all 16"):
        dataclasses.replace(p, a_bits=(4, 16, 4)).validate()


# --------------------------------------------------------------------------------------------
# Reference vs dense
# --------------------------------------------------------------------------------------------
CASES = [
    # out_splits, sizes, dims, w_bits, a_bits, cws_rank, mac_rank, mac_input, mask
    ((24,), (5, 7, 52), None, (4, 4, 4), (4, 4, 4), 0, 0, 0, None),
    ((24, 8, 8), (0, 9, 60), ((), (9,), (6, 10)), (4, 4, 3), (8, 4, 4), 4, 0, 0, "mixed"),
    ((16, 16), (6, 0, 45), ((6,), (), (3, 3, 5)), (3, 4, 2), (4, 4, 3), 0, 5, 0, "mixed"),
    ((24, 8, 8), (3, 5, 72), ((3,), (5,), (2, 4, 9)), (2, 3, 4), (4, 8, 2), 3, 4, 1, "mixed"),
    ((12, 20), (3, 5, 77), None, (4, 4, 4), (4, 4, 4), 3, 4, 0, "vision"),
    ((12, 20), (3, 5, 77), None, (8, 4, 4), (4, 4, 4), 3, 4, 0, "text"),
    ((20,), (0, 0, 64), ((), (), ()), (4, 4, 4), (4, 4, 4), 2, 2, 0, "mixed"),  # no factors
    ((20, 4), (4, 4, 56), None, (4, 4, 4), (16, 16, 16), 3, 4, 1, "mixed"),  # weight-only
]


def _mask(kind: str | None, n: int, seed: int = 0) -> torch.Tensor | None:
    if kind is None:
        return None
    if kind == "text":
        return torch.ones(n, dtype=torch.bool)
    if kind == "vision":
        return torch.zeros(n, dtype=torch.bool)
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) > 0.5


def _site(p: SiteParams) -> list[SplitQSiteLinear]:
    return SplitQSiteLinear.from_params(p, context=ModalityContext())


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_dense(case) -> None:
    outs, sizes, dims, w_bits, a_bits, r1, r2, mac_input, mask_kind = case
    p = random_site_params(outs, sizes, dims, w_bits, a_bits, r1, r2, mac_input, bias=True,
                           seed=1)  # fmt: skip
    n = 13
    x = torch.randn(n, sum(sizes)) * torch.linspace(0.2, 4.0, sum(sizes))
    mask = _mask(mask_kind, n)
    y = site_linear(x, p, text_mask=mask)
    assert y.dtype == torch.float32 and y.shape == (n, sum(outs))
    _close(y, dense_site_forward(_site(p)[0], x, mask))


def test_mac_masked_rows_equal_no_mac() -> None:
    """Vision rows ignore the MAC branch entirely; text rows do not."""
    p = random_site_params((16, 8), (4, 4, 56), cws_rank=3, mac_rank=4)
    x = torch.randn(10, 64)
    mask = torch.tensor([True, False] * 5)
    y = site_linear(x, p, mask)
    y0 = site_linear(x, dataclasses.replace(p, mac=None))
    assert torch.equal(y[~mask], y0[~mask])
    assert not torch.equal(y[mask], y0[mask])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_and_leading_dims(dtype: torch.dtype) -> None:
    p = random_site_params((20,), (3, 4, 41), cws_rank=2, mac_rank=3)
    x = torch.randn(2, 5, 48).to(dtype)
    mask = torch.rand(2, 5) > 0.3
    y = site_linear(x, p, text_mask=mask)
    assert y.dtype == dtype and y.shape == (2, 5, 20)
    ref = dense_site_forward(_site(p)[0], x.float(), mask).to(dtype)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3  # one output ulp
    _close(y, ref, rtol=tol, atol_rel=tol)
    y32 = site_linear(x, p, text_mask=mask, out_dtype=torch.float32)
    assert y32.dtype == torch.float32
    _close(y32, dense_site_forward(_site(p)[0], x.float(), mask))


# --------------------------------------------------------------------------------------------
# The op: opcheck, torch.compile
# --------------------------------------------------------------------------------------------
def _op_args(p: SiteParams, x, mask, out_dtype=None) -> tuple:
    tensors, meta = p.to_op()
    return (x, tensors, mask, meta, out_dtype)


@pytest.mark.parametrize(
    "r1,r2,with_mask,with_bias,dtype,out_dtype",
    [
        (0, 0, False, False, torch.float32, None),
        (3, 4, True, True, torch.float32, None),
        (3, 0, False, True, torch.bfloat16, torch.float32),
        (0, 4, True, False, torch.float16, None),
    ],
)
def test_opcheck(r1, r2, with_mask, with_bias, dtype, out_dtype) -> None:
    p = random_site_params((16, 8), (2, 3, 43), cws_rank=r1, mac_rank=r2, mac_input=1,
                           bias=with_bias)  # fmt: skip
    x = torch.randn(6, 48).to(dtype)
    mask = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool) if with_mask else None
    torch.library.opcheck(torch.ops.splitq.site_linear.default, _op_args(p, x, mask, out_dtype))


def test_torch_compile_of_a_site() -> None:
    torch._dynamo.reset()
    p = random_site_params((24, 8), (3, 5, 56), w_bits=(4, 4, 3), cws_rank=3, mac_rank=4)
    x = torch.randn(9, 64)
    mask = torch.rand(9) > 0.5

    def f(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.relu(site_linear(x * 2.0, p, mask)) + 1.0

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x, mask), f(x, mask), rtol=0, atol=0)
    x2 = torch.randn(9, 64)
    torch.testing.assert_close(compiled(x2, mask), f(x2, mask), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Runtime modules
# --------------------------------------------------------------------------------------------
def _count_site_ops(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == "splitq::site_linear")


def test_members_share_one_op_call() -> None:
    p = random_site_params((16, 8, 8), (4, 4, 56), cws_rank=2, mac_rank=2, bias=True)
    q, k, v = _site(p)
    x = torch.randn(2, 3, 64)
    full = q.site_forward(x)
    outs = {}
    n = _count_site_ops(lambda: outs.update(q=q(x), k=k(x), v=v(x)))
    assert n == 1 and q._memo is None  # computed once, memo dropped after the last member
    torch.testing.assert_close(torch.cat([outs["q"], outs["k"], outs["v"]], -1), full)
    outs["q"].view(2, 3, 4, 4)  # column views still reshape like a linear's output
    # a new input (or the same member twice) recomputes
    y = x + 1
    assert _count_site_ops(lambda: (q(x), q(x), k(y), v(y))) == 3
