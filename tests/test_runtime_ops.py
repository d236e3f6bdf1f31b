"""The torch reference of the SplitQ linear and the ``splitq::linear`` op (CPU).

The reference is checked against a straightforward dense float computation (dequantized weights,
fake-quantized activations, float64 matmuls): they agree within fp32 tolerance
(``rtol = 1e-5``, ``atol = 1e-5 * max|y|``), since both take the same quantization decisions and
differ only in the order of fp32/fp64 roundings.
"""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

from splitq_modifier.runtime import (
    SplitQLinearParams,
    build_splitq_params,
    pack_path_weight,
    packed_words,
    quantize_weight_per_channel,
    random_splitq_params,
    splitq_linear,
    unpack_path_weight,
)

RTOL = 1e-5
ATOL_REL = 1e-5


# --------------------------------------------------------------------------------------------
# Dense float oracle
# --------------------------------------------------------------------------------------------
def _fake_quant_rows(v: torch.Tensor, bits: int, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Per-row symmetric fake quantization, written out from the contract (fp32)."""
    v = v.float()
    qmax = 2 ** (bits - 1) - 1
    amax = v.abs().amax(dim=1, keepdim=True) if v.shape[1] else v.new_zeros(v.shape[0], 1)
    s = torch.clamp(amax * clip, min=1e-8) / torch.tensor(float(qmax))
    return torch.clamp(torch.round(v / s), -qmax - 1, qmax) * s


def _dequant(packed: torch.Tensor, scale: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    codes = unpack_from_int32(packed, bits, torch.Size([packed.shape[0], k]), packed_dim=1)
    return codes.double() * scale.double()[:, None]


def dense_splitq(
    x: torch.Tensor,
    p: SplitQLinearParams,
    text_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense float64 computation of the SplitQ linear from dequantized weights."""
    kv, kt, km = p.sizes
    xf = x.float()
    bounds = (0, kv, kv + kt, kv + kt + km)
    y = torch.zeros(x.shape[0], p.d_out, dtype=torch.float64)
    fq = []
    for i in range(3):
        xp = _fake_quant_rows(xf[:, bounds[i] : bounds[i + 1]], p.a_bits[i], p.act_clip[i])
        fq.append(xp)
        w = _dequant(p.w_packed[i], p.w_scale[i], p.w_bits[i], p.sizes[i])
        y += xp.double() @ w.T
    if p.cws is not None:
        b = p.cws
        h = fq[2].double() @ _dequant(b.down, b.down_scale, b.w_bits, km).T
        hq = _fake_quant_rows(h.float(), b.act_bits)
        y += hq.double() @ _dequant(b.up, b.up_scale, b.w_bits, b.rank).T
    if p.mac is not None:
        b = p.mac
        u = xf[:, bounds[2] :] - fq[2] if p.mac_input == 0 else fq[2]
        g = (
            _fake_quant_rows(u, b.act_bits).double()
            @ _dequant(b.down, b.down_scale, b.w_bits, km).T
        )
        dy = (
            _fake_quant_rows(g.float(), b.act_bits).double()
            @ _dequant(b.up, b.up_scale, b.w_bits, b.rank).T
        )
        if text_mask is not None:
            dy = dy * text_mask.double()[:, None]
        y += dy
    if bias is not None:
        y += bias.double()[None, :]
    return y


def _close(y: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL, atol_rel: float = ATOL_REL):
    atol = atol_rel * ref.abs().max().item()
    torch.testing.assert_close(y.double(), ref.double(), rtol=rtol, atol=atol)


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


def test_validate_rejects_bad_shapes() -> None:
    p = random_splitq_params(16, (4, 4, 40), cws_rank=3)
    p.validate()
    bad = SplitQLinearParams(p.sizes, (p.w_packed[0], p.w_packed[1], p.w_packed[2][:, :-1]),
                             p.w_scale)  # fmt: skip
    with pytest.raises(ValueError):
        bad.validate()
    with pytest.raises(ValueError):
        build_splitq_params([torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 8)], (4, 4, 9))


# --------------------------------------------------------------------------------------------
# Reference vs dense
# --------------------------------------------------------------------------------------------
CASES = [
    # sizes, w_bits, a_bits, cws_rank, mac_rank, mac_input, mask
    ((5, 7, 52), (4, 4, 4), (4, 4, 4), 0, 0, 0, None),
    ((0, 9, 60), (4, 4, 3), (8, 4, 4), 4, 0, 0, "mixed"),
    ((6, 0, 45), (3, 4, 2), (4, 4, 3), 0, 5, 0, "mixed"),
    ((3, 5, 77), (2, 3, 4), (4, 8, 2), 3, 4, 1, "mixed"),
    ((3, 5, 77), (4, 4, 4), (4, 4, 4), 3, 4, 0, "vision"),
    ((3, 5, 77), (4, 4, 4), (4, 4, 4), 3, 4, 0, "text"),
]


def _mask(kind: str | None, n: int, seed: int = 0) -> torch.Tensor | None:
    if kind is None:
        return None
    if kind == "text":
        return torch.ones(n, dtype=torch.bool)
    if kind == "vision":
        return torch.zeros(n, dtype=torch.bool)
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) > 0.5


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_dense(case) -> None:
    sizes, w_bits, a_bits, r1, r2, mac_input, mask_kind = case
    torch.manual_seed(1)
    p = random_splitq_params(
        24, sizes, w_bits, a_bits, r1, r2, mac_input=mac_input, act_clip=(0.9, 0.95, 0.8)
    )
    n = 13
    x = torch.randn(n, sum(sizes)) * torch.linspace(0.2, 4.0, sum(sizes))
    mask = _mask(mask_kind, n)
    bias = torch.randn(24)
    y = splitq_linear(x, p, text_mask=mask, bias=bias)
    assert y.dtype == torch.float32 and y.shape == (n, 24)
    _close(y, dense_splitq(x, p, mask, bias))


def test_mac_masked_rows_equal_no_mac() -> None:
    """Vision rows ignore the MAC branch entirely; text rows do not."""
    p = random_splitq_params(16, (4, 4, 56), cws_rank=3, mac_rank=4)
    p_no_mac = SplitQLinearParams(**{**p.__dict__, "mac": None})
    x = torch.randn(10, 64)
    mask = torch.tensor([True, False] * 5)
    y = splitq_linear(x, p, mask)
    y0 = splitq_linear(x, p_no_mac)
    assert torch.equal(y[~mask], y0[~mask])
    assert not torch.equal(y[mask], y0[mask])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_and_leading_dims(dtype: torch.dtype) -> None:
    p = random_splitq_params(20, (3, 4, 41), cws_rank=2, mac_rank=3)
    x = torch.randn(2, 5, 48).to(dtype)
    mask = torch.rand(2, 5) > 0.3
    y = splitq_linear(x, p, text_mask=mask)
    assert y.dtype == dtype and y.shape == (2, 5, 20)
    ref = dense_splitq(x.reshape(10, 48), p, mask.reshape(10)).to(dtype)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3  # one output ulp
    _close(y.reshape(10, 20), ref, rtol=tol, atol_rel=tol)
    y32 = splitq_linear(x, p, text_mask=mask, out_dtype=torch.float32)
    assert y32.dtype == torch.float32
    _close(y32.reshape(10, 20), dense_splitq(x.reshape(10, 48), p, mask.reshape(10)))


# --------------------------------------------------------------------------------------------
# The op: opcheck, torch.compile
# --------------------------------------------------------------------------------------------
def _op_args(p: SplitQLinearParams, x, mask, bias, out_dtype=None) -> tuple:
    sizes, a_bits, w_bits, branch_bits, mac_input = p.int_args()
    return (x, *p.op_args(), mask, bias, sizes, a_bits, w_bits, branch_bits, mac_input, out_dtype)


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
    p = random_splitq_params(16, (2, 3, 43), cws_rank=r1, mac_rank=r2, mac_input=1)
    x = torch.randn(6, 48).to(dtype)
    mask = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool) if with_mask else None
    bias = torch.randn(16) if with_bias else None
    torch.library.opcheck(torch.ops.splitq.linear.default, _op_args(p, x, mask, bias, out_dtype))


def test_torch_compile() -> None:
    torch._dynamo.reset()
    p = random_splitq_params(24, (3, 5, 56), w_bits=(4, 4, 3), cws_rank=3, mac_rank=4)
    x = torch.randn(9, 64)
    mask = torch.rand(9) > 0.5
    bias = torch.randn(24)

    def f(x: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.relu(splitq_linear(x * 2.0, p, mask, bias)) + 1.0

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x, mask, bias), f(x, mask, bias), rtol=0, atol=0)
    x2 = torch.randn(9, 64)
    torch.testing.assert_close(compiled(x2, mask, bias), f(x2, mask, bias), rtol=0, atol=0)
