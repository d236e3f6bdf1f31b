"""The split linear: a linear layer whose input channels are routed into three paths.

``Y = X_v W_v^T + X_t W_t^T + X_m W_m^T`` with ``X_p = X[:, C_p]`` is exact. SplitQ gives
each path its own transform and per-token activation quantizer:
``Y ~= sum_p Q(X_p P_p) Q(W_p P_p^-T)^T``.

Two modules live here:

- :class:`SplitSite` holds what the linears reading one activation share: the channel split,
  the per-path transforms and the activation clipping (one site = q/k/v, or gate/up, ...).
- :class:`SplitQLinear` is one linear during calibration (learnable, fake-quantized).
  :func:`freeze_site` turns a site's linears into the runtime's
  :class:`~splitq_modifier.runtime.SplitQSiteLinear` modules (integer weights of all the
  site's linears concatenated, fixed transforms), which is what the saved format stores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from splitq_modifier.acc import (
    FrozenBranch,
    LowRankBranch,
    QuantBranch,
    branch_rank,
    top_singular,
)
from splitq_modifier.quant import fake_quant, quantize_sym, step_cache, step_cached
from splitq_modifier.rounding import gptq_round
from splitq_modifier.runtime import (
    ModalityContext,
    SiteBranch,
    SplitQSiteLinear,
    apply_kron,
    pack_mma_weight,
    pack_path_weight,
)
from splitq_modifier.transforms import PathTransform

__all__ = [
    "PATHS",
    "ChannelSplit",
    "SplitSite",
    "SplitQLinear",
    "FrozenLinear",
    "ModalityContext",
    "cached_weights",
    "freeze_site",
]

#: Path order everywhere: vision-outlier, text-outlier, main.
PATHS = ("vision", "text", "main")
#: Initial logit of every learnable clipping factor (sigmoid(4) ~= 0.982).
CLIP_INIT = 4.0


def cached_weights():
    """Compute each :class:`SplitQLinear`'s quantized weights (and branch factors) once per
    optimiser step inside the block (:func:`splitq_modifier.quant.step_cache`)."""
    return step_cache()


def _quantized_weights(
    weight: torch.Tensor,
    perm: torch.Tensor,
    sizes: tuple[int, int, int],
    inv_scales: list[torch.Tensor],
    mats: list[list[torch.Tensor]],
    branch: tuple[torch.Tensor, torch.Tensor] | None,
    bits: tuple[int, int, int],
    clips: list[torch.Tensor] | None,
) -> list[torch.Tensor]:
    """Transformed (and, with ``clips``, fake-quantized) path weights of one linear.

    ``W[:, C_p] / c_p`` times the inverse-transposed factors of path ``p``; the main path minus
    the CWS branch ``up @ down``. Pure function of its arguments, so it can run under
    activation checkpointing (:meth:`SplitQLinear.path_weights`).
    """
    parts = weight.float()[:, perm].split(sizes, dim=1)
    out = []
    for p, w in enumerate(parts):
        if w.shape[1]:
            w = w * inv_scales[p]
            if mats[p]:
                w = apply_kron(w, mats[p])
        if p == 2 and branch is not None:
            w = w - branch[0] @ branch[1]
        if clips is not None:
            w = fake_quant(w, bits[p], clips[p])
        out.append(w)
    return out


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
    :param rotation_seed: start the factors as seeded random rotations (None: identity)
    :param dims: Kronecker factor sizes per path (:mod:`splitq_modifier.layout`); default:
        the most balanced divisor pair of each path's width
    :param plain: per path, whether it is quantized as it is (no factors, smoothing fixed at
        1: the mixed-precision ablation of the outlier paths)
    """

    def __init__(
        self,
        split: ChannelSplit,
        act_bits: tuple[int | None, int | None, int | None],
        smooth: torch.Tensor | None = None,
        learn_factors: bool = True,
        rotation_seed: int | None = None,
        dims: tuple[tuple[int, ...], ...] | None = None,
        plain: tuple[bool, bool, bool] = (False, False, False),
    ):
        super().__init__()
        self.sizes = split.sizes
        self.act_bits = tuple(act_bits)
        self.register_buffer("perm", split.perm, persistent=False)
        self.transforms = nn.ModuleList()
        for p, idx in enumerate((split.vision, split.text, split.main)):
            s = None if smooth is None or plain[p] else smooth[idx]
            seed = None if rotation_seed is None else rotation_seed + p
            pd = None if dims is None else dims[p]
            t = PathTransform(len(idx), s, learn_factors and not plain[p], seed, pd)
            t.log_c.requires_grad_(not plain[p])
            self.transforms.append(t)
        self.act_clip_logit = nn.Parameter(torch.full((3,), CLIP_INIT))
        self.quantize = True
        self._memo: tuple | None = None
        self._params: list[nn.Parameter] | None = None

    def weight_transforms(self) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """Per path: the inverse smoothing scale ``1 / c`` and the factors of ``P^-T``."""
        inv = [(-t.log_c).exp() for t in self.transforms]
        return inv, [t.weight_mats() for t in self.transforms]

    def split_weight(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """The transformed weight of each path: ``W[:, C_p] P_p^-T``."""
        inv, mats = self.weight_transforms()
        return _quantized_weights(weight, self.perm, self.sizes, inv, mats, None, (0, 0, 0), None)

    def split_act(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The transformed activation of each path: ``X[:, C_p] P_p`` (fp32).

        The linears of a site read the same tensor one after the other (q, k, v), so the
        result for the last input is kept and reused while the same tensor comes back and
        no parameter changed (optimiser steps bump the parameters' versions).
        """
        if self._params is None:
            self._params = list(self.parameters())
        key = (x, x._version, tuple(p._version for p in self._params))
        memo = self._memo
        if memo is not None and memo[0][0] is x and memo[0][1:] == key[1:]:
            return memo[1]
        parts = x.float()[..., self.perm].split(self.sizes, dim=-1)
        out = [t.transform_act(xp) for t, xp in zip(self.transforms, parts)]
        self._memo = (key, out, {})
        return out

    def shared(self, x: torch.Tensor, name, fn):
        """``fn()`` computed once per input ``x`` for all the site's linears (e.g. the
        quantized activations, the MAC input); call after :meth:`split_act` on ``x``."""
        memo = self._memo
        if memo is None or memo[0][0] is not x:
            return fn()
        if name not in memo[2]:
            memo[2][name] = fn()
        return memo[2][name]

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
                r = max(branch_rank(b.rank_ratio, *w_main.shape) for b in (cws, mac) if b)
                svd = top_singular(w_main, r)  # one decomposition for both branches
            if cws is not None:
                self.cws = LowRankBranch(w_main, cws, svd)
            if mac is not None:
                self.mac = LowRankBranch(w_main, mac, svd)

    def path_weights(self, quantize: bool = False) -> list[torch.Tensor]:
        """Transformed per-path weights, with the CWS branch taken out of the main path;
        fake-quantized (per output channel, learnable clipping) when ``quantize``.

        With gradients on, the full-size intermediates (gathered, scaled, transformed,
        rounded copies of the weight) are not kept for the backward pass but recomputed
        there (activation checkpointing): only the result is kept, so training holds about
        one extra copy of each weight instead of a dozen. The small transform matrices are
        computed outside the checkpointed function, once.
        """
        site = self.site
        inv, mats = site.weight_transforms()
        branch = None if self.cws is None else (self.cws.up(), self.cws.down)
        clips = [torch.sigmoid(c) for c in self.w_clip_logit] if quantize else None
        args = (self.weight, site.perm, site.sizes, inv, mats, branch, self.weight_bits, clips)
        if torch.is_grad_enabled():
            return checkpoint(_quantized_weights, *args, use_reentrant=False)
        return _quantized_weights(*args)

    def quantized_path_weights(self) -> list[torch.Tensor]:
        """Fake-quantized per-path weights, computed once per :func:`cached_weights` block."""
        q = self.site.quantize
        return step_cached((id(self), "weights", q), lambda: self.path_weights(quantize=q))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        site = self.site
        xs = site.split_act(x)
        xq = site.shared(x, "xq", lambda: site.quantize_act(xs))
        ws = self.quantized_path_weights()
        y = sum(a @ w.T for a, w in zip(xq, ws) if a.shape[-1])
        if self.cws is not None:
            y = y + self.cws(xq[2], quantize=site.quantize)
        if self.mac is not None:
            mac, q = self.mac, site.quantize
            u_q = site.shared(
                x, ("mac", mac.cfg.input, mac.cfg.bits, q), lambda: mac.mac_input(xs[2], xq[2], q)
            )
            y = y + mac.text_compensation(xs[2], xq[2], self.context, quantize=q, u_q=u_q)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    @torch.no_grad()
    def freeze(self, hessians: list[torch.Tensor | None] | None = None) -> FrozenLinear:
        """This linear's integer weights per path, scales, bias and frozen branches.

        :param hessians: per path, the Hessian of the quantized transformed activations the
            path's weight multiplies; a path with one is rounded with GPTQ
            (:mod:`splitq_modifier.rounding`), the others to nearest
        """
        ints, scales = [], []
        hs = hessians or [None, None, None]
        for w, b, c, h in zip(self.path_weights(False), self.weight_bits, self.w_clip_logit, hs):
            if h is not None and w.shape[1]:
                q, s = gptq_round(w, h, b, torch.sigmoid(c))
            else:
                q, s = quantize_sym(w, b, torch.sigmoid(c))
                s = s.squeeze(1)
            ints.append(q.to(torch.int8))
            scales.append(s.float())
        return FrozenLinear(
            weight_int=ints,
            weight_scale=scales,
            bias=None if self.bias is None else self.bias.detach().float(),
            cws=None if self.cws is None else self.cws.freeze(),
            mac=None if self.mac is None else self.mac.freeze(),
        )


@dataclass
class FrozenLinear:
    """One calibrated linear before its site is assembled: int8 codes and fp32 per-row
    scales per path, bias, frozen branches."""

    weight_int: list[torch.Tensor]
    weight_scale: list[torch.Tensor]
    bias: torch.Tensor | None
    cws: FrozenBranch | None
    mac: FrozenBranch | None


def _site_branch(branches: list[FrozenBranch | None]) -> SiteBranch | None:
    if all(b is None for b in branches):
        return None
    if any(b is None for b in branches):
        raise ValueError("either every linear of a site has a given branch or none has")
    bits, rmax = branches[0].bits, max(b.up_int.shape[1] for b in branches)
    ups = [torch.nn.functional.pad(b.up_int, (0, rmax - b.up_int.shape[1])) for b in branches]
    return SiteBranch(
        down_packed=pack_path_weight(torch.cat([b.down_int for b in branches]), bits),
        down_scale=torch.cat([b.down_scale for b in branches]),
        up_packed=pack_path_weight(torch.cat(ups), bits),
        up_scale=torch.cat([b.up_scale for b in branches]),
        ranks=tuple(int(b.down_int.shape[0]) for b in branches),
        bits=bits,
        input=branches[0].input,
    )


@torch.no_grad()
def freeze_site(
    site: SplitSite,
    linears: list[SplitQLinear],
    names: list[str],
    context: ModalityContext | None = None,
    hessians: list[torch.Tensor | None] | None = None,
) -> list[SplitQSiteLinear]:
    """The runtime modules of a calibrated site: its owner (``names[0]``, storing every
    tensor) and the other members, in the order of ``linears``.

    :param names: attribute names of the linears in their common parent
    :param hessians: per path, the Hessian for GPTQ rounding (see :meth:`SplitQLinear.freeze`)
    """
    frozen = [q.freeze(hessians) for q in linears]
    tensors: dict[str, torch.Tensor] = {
        "perm": site.perm.to(torch.int32),
        "act_clip": site.act_clip().detach().float(),
        "smooth": torch.cat([t.log_c.exp().detach().float() for t in site.transforms]),
    }
    mats = [m.detach().float().reshape(-1) for t in site.transforms for m in t.act_mats()]
    if mats:
        tensors["factors"] = torch.cat(mats)
    for p in range(3):
        ints = torch.cat([f.weight_int[p] for f in frozen])
        tensors[f"weight_packed_{p}"] = pack_mma_weight(ints, linears[0].weight_bits[p])
        tensors[f"weight_scale_{p}"] = torch.cat([f.weight_scale[p] for f in frozen])
    if any(f.bias is not None for f in frozen):
        tensors["site_bias"] = torch.cat(
            [
                torch.zeros(q.out_features, device=site.perm.device) if f.bias is None else f.bias
                for q, f in zip(linears, frozen)
            ]
        )
    owner = SplitQSiteLinear.owner_from_tensors(
        tensors,
        sizes=site.sizes,
        dims=tuple(t.dims for t in site.transforms),
        out_splits=tuple(q.out_features for q in linears),
        w_bits=linears[0].weight_bits,
        a_bits=site.act_bits,
        members=tuple(names),
        cws=_site_branch([f.cws for f in frozen]),
        mac=_site_branch([f.mac for f in frozen]),
        context=context,
    )
    return [owner] + [SplitQSiteLinear.member(owner, j, names[0]) for j in range(1, len(names))]
