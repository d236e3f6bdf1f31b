"""The split linear: a linear layer whose input channels are routed into three paths.

``Y = X_v W_v^T + X_t W_t^T + X_m W_m^T`` with ``X_p = X[:, C_p]`` is exact. SplitQ gives
each path its own transform and per-token activation quantizer:
``Y ~= sum_p Q(X_p P_p) Q(W_p P_p^-T)^T``.

Two modules live here:

- :class:`SplitSite` holds what the linears reading one activation share: the channel split,
  the per-path transforms and the activation clipping (one site = q/k/v, or gate/up, ...).
- :class:`SplitQLinear` is one linear during calibration (learnable, fake-quantized).
  :meth:`SplitQLinear.freeze` turns it into a :class:`FrozenSplitQLinear` that holds integer
  weights, scales and fixed transforms, which is what the saved format and the runtime use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from splitq_modifier.acc import FrozenLowRankBranch, LowRankBranch, QuantBranch
from splitq_modifier.quant import fake_quant, quantize_sym
from splitq_modifier.transforms import PathTransform, apply_kron

__all__ = [
    "PATHS",
    "ChannelSplit",
    "SplitSite",
    "SplitQLinear",
    "FrozenSplitQLinear",
    "ModalityContext",
]

#: Path order everywhere: vision-outlier, text-outlier, main.
PATHS = ("vision", "text", "main")
#: Initial logit of every learnable clipping factor (sigmoid(4) ~= 0.982).
CLIP_INIT = 4.0


class ModalityContext:
    """Which tokens of the batch being run are text, shared by the split linears of a model.

    ``text_mask`` is a bool tensor over the leading (batch, sequence) dims of the hidden
    states, or None when unknown (then every token counts as text, as at decode time).
    """

    def __init__(self) -> None:
        self.text_mask: torch.Tensor | None = None

    def mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The text mask broadcastable to ``x[..., 0]``, or None if it does not fit ``x``."""
        m = self.text_mask
        if m is None or m.shape != x.shape[:-1]:
            return None
        return m.to(x.device)


@dataclass
class ChannelSplit:
    """Sorted, disjoint input-channel index sets of the three paths (union = all channels)."""

    vision: torch.Tensor
    text: torch.Tensor
    main: torch.Tensor

    def __post_init__(self) -> None:
        idx = torch.cat([self.vision, self.text, self.main])
        if idx.numel() and not torch.equal(idx.sort().values, torch.arange(idx.numel())):
            raise ValueError("channel split must partition range(d) into disjoint sets")

    @property
    def perm(self) -> torch.Tensor:
        """Permutation putting channels in path order ``[vision | text | main]``."""
        return torch.cat([self.vision, self.text, self.main]).long()

    @property
    def sizes(self) -> tuple[int, int, int]:
        """Widths of the three paths."""
        return (len(self.vision), len(self.text), len(self.main))

    @classmethod
    def none(cls, d: int) -> ChannelSplit:
        """Every channel on the main path (the FlatQuant-style base)."""
        empty = torch.zeros(0, dtype=torch.long)
        return cls(empty, empty.clone(), torch.arange(d))


class SplitSite(nn.Module):
    """Channel split, per-path transforms and activation clipping of one activation site.

    :param split: the channel split
    :param act_bits: activation bits per path (None = not quantized)
    :param smooth: initial smoothing scale per channel (full width ``d``), or None
    :param learn_factors: learn the invertible factors (else smoothing scale only)
    """

    def __init__(
        self,
        split: ChannelSplit,
        act_bits: tuple[int | None, int | None, int | None],
        smooth: torch.Tensor | None = None,
        learn_factors: bool = True,
    ):
        super().__init__()
        self.sizes = split.sizes
        self.act_bits = tuple(act_bits)
        self.register_buffer("perm", split.perm, persistent=False)
        self.transforms = nn.ModuleList()
        for idx in (split.vision, split.text, split.main):
            s = None if smooth is None else smooth[idx]
            self.transforms.append(PathTransform(len(idx), s, learn_factors))
        self.act_clip_logit = nn.Parameter(torch.full((3,), CLIP_INIT))
        self.quantize = True
        self._memo: tuple | None = None

    def split_weight(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """The transformed weight of each path: ``W[:, C_p] P_p^-T``."""
        parts = weight.float()[:, self.perm].split(self.sizes, dim=1)
        return [t.transform_weight(w) for t, w in zip(self.transforms, parts)]

    def split_act(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The transformed activation of each path: ``X[:, C_p] P_p`` (fp32).

        The linears of a site read the same tensor one after the other (q, k, v), so the
        result for the last input is kept and reused while the same tensor comes back and
        no parameter changed (optimiser steps bump the parameters' versions).
        """
        key = (x, x._version, tuple(p._version for p in self.parameters()))
        memo = self._memo
        if memo is not None and memo[0][0] is x and memo[0][1:] == key[1:]:
            return memo[1]
        parts = x.float()[..., self.perm].split(self.sizes, dim=-1)
        out = [t.transform_act(xp) for t, xp in zip(self.transforms, parts)]
        self._memo = (key, out)
        return out

    def act_clip(self) -> torch.Tensor:
        """Clipping ratio per path, in (0, 1)."""
        return torch.sigmoid(self.act_clip_logit)

    def quantize_act(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Fake-quantize each transformed path per token (identity when quantization is off)."""
        if not self.quantize:
            return xs
        clip = self.act_clip()
        return [fake_quant(x, b, clip[i]) for i, (x, b) in enumerate(zip(xs, self.act_bits))]


class SplitQLinear(nn.Module):
    """One linear of a site during calibration: frozen FP weight, learnable clipping/branches.

    The forward pass computes the simulated quantized output; with ``site.quantize`` False
    it computes the original linear exactly (up to float rounding of the transforms).

    :param linear: the original linear (its weight and bias are kept, frozen)
    :param site: the shared site of this linear
    :param weight_bits: weight bits per path
    :param cws: optional CWS branch config (rank, bits, learn gate), see :mod:`.acc`
    :param mac: optional MAC branch config
    :param context: modality context (text mask) for the MAC branch
    """

    def __init__(
        self,
        linear: nn.Linear,
        site: SplitSite,
        weight_bits: tuple[int, int, int],
        cws: QuantBranch | None = None,
        mac: QuantBranch | None = None,
        context: ModalityContext | None = None,
    ):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        )
        self.site = site
        self.weight_bits = tuple(weight_bits)
        self.w_clip_logit = nn.ParameterList(
            [nn.Parameter(torch.full((self.out_features, 1), CLIP_INIT)) for _ in PATHS]
        )
        self.context = context
        self.cws: LowRankBranch | None = None
        self.mac: LowRankBranch | None = None
        if cws is not None or mac is not None:
            with torch.no_grad():
                w_main = site.split_weight(self.weight)[2]
            if cws is not None:
                self.cws = LowRankBranch(w_main, cws)
            if mac is not None:
                self.mac = LowRankBranch(w_main, mac)

    def path_weights(self) -> list[torch.Tensor]:
        """Transformed per-path weights, with the CWS branch taken out of the main path."""
        ws = self.site.split_weight(self.weight)
        if self.cws is not None:
            ws[2] = ws[2] - self.cws.weight()
        return ws

    def quantized_path_weights(self) -> list[torch.Tensor]:
        """Fake-quantized per-path weights (per output channel, learnable clipping)."""
        ws = self.path_weights()
        if not self.site.quantize:
            return ws
        return [
            fake_quant(w, b, torch.sigmoid(c))
            for w, b, c in zip(ws, self.weight_bits, self.w_clip_logit)
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = self.site.split_act(x)
        xq = self.site.quantize_act(xs)
        ws = self.quantized_path_weights()
        y = sum(a @ w.T for a, w in zip(xq, ws) if a.shape[-1])
        if self.cws is not None:
            y = y + self.cws(xq[2], quantize=self.site.quantize)
        if self.mac is not None:
            y = y + self.mac.text_compensation(
                xs[2], xq[2], self.context, quantize=self.site.quantize
            )
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    @torch.no_grad()
    def freeze(self) -> FrozenSplitQLinear:
        """The inference form: integer weights and scales, fixed transforms and clipping."""
        site = self.site
        ints, scales = [], []
        for w, b, c in zip(self.path_weights(), self.weight_bits, self.w_clip_logit):
            q, s = quantize_sym(w, b, torch.sigmoid(c))
            ints.append(q.to(torch.int8))
            scales.append(s.squeeze(1).float())
        transforms = [
            (t.log_c.exp().detach().clone(), [m.detach().clone() for m in t.act_mats()])
            for t in site.transforms
        ]
        return FrozenSplitQLinear(
            perm=site.perm.clone(),
            sizes=site.sizes,
            transforms=transforms,
            act_bits=site.act_bits,
            act_clip=site.act_clip().detach().clone(),
            weight_bits=self.weight_bits,
            weight_int=ints,
            weight_scale=scales,
            bias=None if self.bias is None else self.bias.detach().clone(),
            cws=None if self.cws is None else self.cws.freeze(),
            mac=None if self.mac is None else self.mac.freeze(),
            context=self.context,
        )


class FrozenSplitQLinear(nn.Module):
    """A calibrated split linear: integer weights per path, fixed transforms.

    This is what the model holds after ``oneshot``; its tensors are what the saved format
    stores. The forward pass dequantizes on the fly (simulated quantization).
    """

    def __init__(
        self,
        perm: torch.Tensor,
        sizes: tuple[int, int, int],
        transforms: list[tuple[torch.Tensor, list[torch.Tensor]]],
        act_bits: tuple[int | None, ...],
        act_clip: torch.Tensor,
        weight_bits: tuple[int, ...],
        weight_int: list[torch.Tensor],
        weight_scale: list[torch.Tensor],
        bias: torch.Tensor | None,
        cws: FrozenLowRankBranch | None = None,
        mac: FrozenLowRankBranch | None = None,
        context: ModalityContext | None = None,
    ):
        super().__init__()
        self.sizes = tuple(sizes)
        self.act_bits = tuple(act_bits)
        self.weight_bits = tuple(weight_bits)
        self.in_features = sum(self.sizes)
        self.out_features = weight_int[0].shape[0]
        self.context = context
        self.register_buffer("perm", perm)
        self.register_buffer("act_clip", act_clip.float())
        self.num_factors = []
        for p, (smooth, mats) in enumerate(transforms):
            self.register_buffer(f"smooth_{p}", smooth.float())
            for i, m in enumerate(mats):
                self.register_buffer(f"factor_{p}_{i}", m.float())
            self.num_factors.append(len(mats))
        for p in range(3):
            self.register_buffer(f"weight_int_{p}", weight_int[p])
            self.register_buffer(f"weight_scale_{p}", weight_scale[p])
        self.register_buffer("bias", bias)
        self.cws = cws
        self.mac = mac

    def _mats(self, p: int) -> list[torch.Tensor]:
        return [getattr(self, f"factor_{p}_{i}") for i in range(self.num_factors[p])]

    def transform_input(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Gather and transform the input into the three path activations (fp32)."""
        parts = x.float()[..., self.perm].split(self.sizes, dim=-1)
        out = []
        for p, xp in enumerate(parts):
            if xp.shape[-1]:
                xp = xp * getattr(self, f"smooth_{p}")
                mats = self._mats(p)
                if mats:
                    xp = apply_kron(xp, mats)
            out.append(xp)
        return out

    def dequantized_weight(self, p: int) -> torch.Tensor:
        """Dequantized transformed weight of path ``p``."""
        w = getattr(self, f"weight_int_{p}").float()
        return w * getattr(self, f"weight_scale_{p}")[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = self.transform_input(x)
        xq = [fake_quant(a, b, self.act_clip[p]) for p, (a, b) in enumerate(zip(xs, self.act_bits))]
        y = sum(a @ self.dequantized_weight(p).T for p, a in enumerate(xq) if a.shape[-1])
        if self.cws is not None:
            y = y + self.cws(xq[2])
        if self.mac is not None:
            mask = None if self.context is None else self.context.mask_for(x)
            y = y + self.mac.text_compensation(xs[2], xq[2], mask)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)
