"""Transforms, split linear and ACC branches: exactness without quantization, training."""

import pytest
import torch

from splitq_modifier.acc import LowRankBranch, QuantBranch
from splitq_modifier.calibrate import LayerSample, TrainConfig, layer_loss, train_layer
from splitq_modifier.layout import kron_dims
from splitq_modifier.quant import fake_quant, quantize_sym
from splitq_modifier.runtime import ModalityContext
from splitq_modifier.split_linear import ChannelSplit, SplitQLinear, SplitSite, freeze_site
from splitq_modifier.transforms import PathTransform, apply_kron


def _split(d: int, v: list[int], t: list[int]) -> ChannelSplit:
    main = [i for i in range(d) if i not in v + t]
    return ChannelSplit(torch.tensor(v), torch.tensor(t), torch.tensor(main))


def _perturb(module: torch.nn.Module, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("n", [1, 7, 64, 100, 97])
@pytest.mark.parametrize("rotation_seed", [None, 3])
def test_path_transform_is_exactly_invertible(n, rotation_seed):
    t = PathTransform(n, torch.rand(n) + 0.5, rotation_seed=rotation_seed)
    _perturb(t)
    x, w = torch.randn(9, n, dtype=torch.float64), torch.randn(5, n, dtype=torch.float64)
    t = t.double()
    got = t.transform_act(x) @ t.transform_weight(w).T
    # a rotation start is orthogonal to fp32 precision (it is drawn in fp32)
    tol = 1e-9 if rotation_seed is None else 1e-5
    torch.testing.assert_close(got, x @ w.T, rtol=tol, atol=tol)


def test_rotation_init_is_a_seeded_rotation():
    a = PathTransform(100, rotation_seed=5)
    b = PathTransform(100, rotation_seed=5)
    mats = [m.detach() for m in a.act_mats()]
    for m, m2 in zip(mats, b.act_mats()):
        torch.testing.assert_close(m @ m.T, torch.eye(m.shape[0]), atol=1e-5, rtol=0)
        assert torch.equal(m, m2.detach())
    assert not torch.allclose(mats[0], torch.eye(mats[0].shape[0]))
    ident = PathTransform(100).act_mats()[0].detach()
    torch.testing.assert_close(ident, torch.eye(ident.shape[0]))


def test_apply_kron_matches_dense_kronecker():
    a, b = torch.randn(4, 4, dtype=torch.float64), torch.randn(6, 6, dtype=torch.float64)
    x = torch.randn(3, 24, dtype=torch.float64)
    torch.testing.assert_close(apply_kron(x, [a, b]), x @ torch.kron(a, b))
    c = torch.randn(5, 5, dtype=torch.float64)
    x3 = torch.randn(2, 7, 120, dtype=torch.float64)
    torch.testing.assert_close(apply_kron(x3, [a, b, c]), x3 @ torch.kron(torch.kron(a, b), c))
    assert kron_dims(3440, 2, balanced_only=False) == (43, 80)
    assert kron_dims(97, 2, balanced_only=False) == (97,)


def test_quantizer_levels_and_empty_path():
    x = torch.randn(5, 33)
    q, s = quantize_sym(x, 4)
    assert q.min() >= -8 and q.max() <= 7
    assert torch.equal(q, q.round())
    torch.testing.assert_close(q * s, fake_quant(x, 4))
    assert fake_quant(torch.zeros(5, 0), 4).shape == (5, 0)
    with pytest.raises(ValueError, match="bits"):
        quantize_sym(x, 1)


def _make(d=48, d_out=40, cws=0.1, mac=0.1, ctx=None):
    torch.manual_seed(0)
    lin = torch.nn.Linear(d, d_out)
    site = SplitSite(_split(d, [1, 5], [7, 9, 11]), (4, 4, 4), smooth=torch.rand(d) + 0.5)
    cws_cfg = QuantBranch(cws) if cws else None
    mac_cfg = QuantBranch(mac) if mac else None
    return lin, site, SplitQLinear(lin, site, (4, 4, 4), cws_cfg, mac_cfg, ctx)


def test_split_linear_without_quantization_equals_original():
    lin, site, m = _make(ctx=ModalityContext())
    _perturb(m)  # learned transforms, clipping and gates: still exact
    m.mac.gate.data.fill_(0.7)
    site.quantize = False
    x = torch.randn(2, 6, 48)
    torch.testing.assert_close(m(x), lin(x), rtol=1e-4, atol=1e-5)


def test_cws_residual_plus_branch_equals_transformed_weight():
    _, site, m = _make()
    _perturb(m)
    w_main = site.split_weight(m.weight)[2]
    torch.testing.assert_close(m.path_weights()[2] + m.cws.weight(), w_main, atol=1e-5, rtol=1e-5)


def test_mac_changes_text_rows_only():
    ctx = ModalityContext()
    lin, site, with_mac = _make(cws=0, ctx=ctx)
    _, _, without = _make(cws=0, mac=0, ctx=ctx)
    without.load_state_dict(with_mac.state_dict(), strict=False)
    x = torch.randn(1, 10, 48)
    ctx.text_mask = torch.tensor([[True] * 4 + [False] * 6])
    a, b = with_mac(x), without(x)
    assert torch.equal(a[0, 4:], b[0, 4:])  # vision rows bit-identical
    assert not torch.allclose(a[0, :4], b[0, :4])  # text rows compensated


def test_only_gates_are_new_branch_parameters():
    _, _, plain = _make(cws=0, mac=0)
    _, _, full = _make()
    new = {n for n, p in full.named_parameters() if p.requires_grad} - {
        n for n, p in plain.named_parameters() if p.requires_grad
    }
    assert new == {"cws.gate", "mac.gate"}
    fixed = LowRankBranch(torch.randn(8, 8), QuantBranch(0.5, learn_gate=False))
    assert not fixed.gate.requires_grad


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_branch_factors_quantized_at_its_bits(bits):
    """The recipe's floor reaches the branches: a 3-bit branch has 3-bit codes (4 is not
    forced), and widths outside 2..8 are refused."""
    br = LowRankBranch(torch.randn(16, 24), QuantBranch(0.5, bits=bits))
    frozen = br.freeze()
    qmax = 2 ** (bits - 1) - 1
    assert frozen.bits == bits
    for codes in (frozen.down_int, frozen.up_int):
        assert codes.dtype == torch.int8
        assert codes.min() >= -qmax - 1 and codes.max() <= qmax
        assert codes.max() == qmax or codes.min() == -qmax - 1  # the full range is used
    for bad in (1, 9):
        with pytest.raises(ValueError, match="2 to 8 bits"):
            LowRankBranch(torch.randn(8, 8), QuantBranch(0.5, bits=bad))


def test_settings_bits_follow_the_floor():
    from splitq_modifier.calibrate import SplitQSettings

    cases = {  # (w, a, floor): (path weight bits, path act bits, branch bits)
        (4, 4, 4): ((4, 4, 4), (4, 4, 4), 4),
        (3, 2, 4): ((4, 4, 3), (4, 4, 2), 4),
        (3, 3, 3): ((3, 3, 3), (3, 3, 3), 3),
        (3, 2, 2): ((3, 3, 3), (2, 2, 2), 2),
        (4, 8, 4): ((4, 4, 4), (8, 8, 8), 4),
        (4, 16, 4): ((4, 4, 4), (None, None, None), 4),
    }
    for (w, a, f), (wb, ab, bb) in cases.items():
        st = SplitQSettings(weight_bits=w, activation_bits=a, aux_bits_floor=f)
        assert st.path_bits == (wb, ab) and st.branch_bits == bb, (w, a, f)


def test_frozen_matches_calibration_forward():
    ctx = ModalityContext()
    _, site, m = _make(ctx=ctx)
    _perturb(m, 0.05)
    x = torch.randn(2, 5, 48)
    ctx.text_mask = torch.rand(2, 5) > 0.5
    with torch.no_grad():
        (frozen,) = freeze_site(site, [m], ["m"], ctx)
        torch.testing.assert_close(frozen(x), m(x), rtol=1e-4, atol=1e-4)


class _Block(torch.nn.Module):
    """A residual MLP block standing in for a decoder layer."""

    def __init__(self, d=32):
        super().__init__()
        self.up = torch.nn.Linear(d, 2 * d)
        self.down = torch.nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def test_training_reduces_layer_error():
    torch.manual_seed(0)
    d = 32
    block = _Block(d)
    xs = [torch.randn(1, 16, d) * torch.linspace(0.1, 3.0, d) for _ in range(8)]
    for x in xs:
        x[..., 3] *= 20  # an outlier channel
    samples = [LayerSample((x,), {}, block(x).detach()) for x in xs]
    for p in block.parameters():
        p.requires_grad_(False)
    for name in ("up", "down"):
        lin = getattr(block, name)
        site = SplitSite(_split(lin.in_features, [3], []), (4, 4, 3))
        setattr(block, name, SplitQLinear(lin, site, (4, 4, 3), QuantBranch(0.1)))
    before, after = train_layer(block, samples, TrainConfig(epochs=15, lr=5e-3, batch_size=2))
    assert after < 0.7 * before
    assert after == pytest.approx(layer_loss(block, samples))
