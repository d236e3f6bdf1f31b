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

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from splitq_modifier.acc import FrozenLowRankBranch, LowRankBranch, QuantBranch
from splitq_modifier.quant import fake_quant, quantize_sym
from splitq_modifier.runtime.ops import (
    SplitQLinearParams,
    pack_path_weight,
    packed_words,
    splitq_linear,
    unpack_path_weight,
)
from splitq_modifier.transforms import PathTransform, apply_kron

__all__ = [
    "PATHS",
    "ChannelSplit",
    "SplitSite",
    "SplitQLinear",
    "FrozenSplitQLinear",
    "ModalityContext",
    "cached_weights",
]

#: Path order everywhere: vision-outlier, text-outlier, main.
PATHS = ("vision", "text", "main")
#: Initial logit of every learnable clipping factor (sigmoid(4) ~= 0.982).
CLIP_INIT = 4.0

#: Quantized path weights of each SplitQLinear, kept while :func:`cached_weights` is active.
_WEIGHT_CACHE: dict[int, list[torch.Tensor]] | None = None


@contextlib.contextmanager
def cached_weights() -> Iterator[None]:
    """Compute each :class:`SplitQLinear`'s quantized path weights once inside the block.

    One optimiser step runs several samples through a layer with the same parameters; the
    weight side (gather, transform, CWS residual, fake quantization of every full-size weight)
    is the same for all of them, so it is computed on the first sample and reused (one graph,
    one backward through it). Used like ``torch.nn.utils.parametrize.cached()``; nesting is
    allowed (the outermost block owns the cache).
    """
    global _WEIGHT_CACHE
    if _WEIGHT_CACHE is not None:
        yield
        return
    _WEIGHT_CACHE = {}
    try:
        yield
    finally:
        _WEIGHT_CACHE = None


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
    :param rotation_seed: start the factors as seeded random rotations (None: identity)
    :param dims: Kronecker factor sizes per path (:mod:`splitq_modifier.layout`); default:
        the most balanced divisor pair of each path's width
    """

    def __init__(
        self,
        split: ChannelSplit,
        act_bits: tuple[int | None, int | None, int | None],
        smooth: torch.Tensor | None = None,
        learn_factors: bool = True,
        rotation_seed: int | None = None,
        dims: tuple[tuple[int, ...], ...] | None = None,
    ):
        super().__init__()
        self.sizes = split.sizes
        self.act_bits = tuple(act_bits)
        self.register_buffer("perm", split.perm, persistent=False)
        self.transforms = nn.ModuleList()
        for p, idx in enumerate((split.vision, split.text, split.main)):
            s = None if smooth is None else smooth[idx]
            seed = None if rotation_seed is None else rotation_seed + p
            pd = None if dims is None else dims[p]
            self.transforms.append(PathTransform(len(idx), s, learn_factors, seed, pd))
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
        cache = _WEIGHT_CACHE
        if cache is not None and id(self) in cache:
            return cache[id(self)]
        ws = self.path_weights(quantize=self.site.quantize)
        if cache is not None:
            cache[id(self)] = ws
        return ws

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
        for w, b, c in zip(self.path_weights(False), self.weight_bits, self.w_clip_logit):
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
    """A calibrated split linear: packed integer weights per path, fixed transforms.

    This is what the model holds after ``oneshot`` and after loading a ``splitq-packed``
    checkpoint; its persistent buffers are exactly the tensors the format stores (see
    ``docs/format.md``). The forward pass runs the site transform in torch (gather the
    channels by ``perm``, multiply each path by its smoothing scale ``smooth_{p}``, apply its
    Kronecker factors ``factor_{p}_{i}``) and then the ``splitq::linear`` op on the packed
    weights (:func:`splitq_modifier.runtime.splitq_linear`: exact torch reference on CPU,
    Triton kernels on CUDA). :meth:`dense_forward` is the dense fake-quant reference of the
    same computation (dequantized weights, fp32 matmuls).

    Buffers (``p`` = 0, 1, 2 for the vision-outlier, text-outlier and main path):

    - ``weight_packed_{p}`` int32 ``(d_out, ceil(k_p * weight_bits[p] / 32))``: int codes packed
      along the input dim by compressed-tensors' ``pack_to_int32``;
      ``weight_scale_{p}`` fp32 ``(d_out,)`` (weight clipping folded in);
    - site tensors, shared by the linears of one activation site: ``perm`` int32 ``(d,)``,
      ``act_clip`` fp32 ``(3,)``, ``smooth_{p}`` fp32 ``(k_p,)``, ``factor_{p}_{i}`` fp32;
    - ``bias`` (or None); ``cws`` / ``mac``: optional :class:`FrozenLowRankBranch`.

    Tensors of an empty path (``k_p = 0``) are kept as non-persistent placeholders. A linear
    whose site tensors are those of a sibling (:meth:`link_site`, e.g. ``k_proj`` -> ``q_proj``)
    holds them as non-persistent aliases, so they are stored once per site.
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
        packed = [pack_path_weight(w.to(torch.int8), b) for w, b in zip(weight_int, weight_bits)]
        self._setup(
            sizes=sizes,
            act_bits=act_bits,
            weight_bits=weight_bits,
            out_features=weight_int[0].shape[0],
            perm=perm,
            act_clip=act_clip,
            smooth=[s for s, _ in transforms],
            factors=[list(m) for _, m in transforms],
            weight_packed=packed,
            weight_scale=weight_scale,
            bias=bias,
            cws=cws,
            mac=mac,
            context=context,
        )

    # ------------------------------------------------------------------ construction
    def _setup(
        self,
        *,
        sizes,
        act_bits,
        weight_bits,
        out_features: int,
        perm: torch.Tensor,
        act_clip: torch.Tensor,
        smooth: list[torch.Tensor],
        factors: list[list[torch.Tensor]],
        weight_packed: list[torch.Tensor],
        weight_scale: list[torch.Tensor],
        bias: torch.Tensor | None,
        cws: FrozenLowRankBranch | None,
        mac: FrozenLowRankBranch | None,
        context: ModalityContext | None,
    ) -> None:
        self.sizes = tuple(int(k) for k in sizes)
        self.act_bits = tuple(None if b is None else int(b) for b in act_bits)
        self.weight_bits = tuple(int(b) for b in weight_bits)
        if len(self.sizes) != 3 or len(self.act_bits) != 3 or len(self.weight_bits) != 3:
            raise ValueError("sizes, act_bits and weight_bits need one entry per path (3)")
        self.in_features = sum(self.sizes)
        self.out_features = int(out_features)
        self.context = context
        #: attribute name of the sibling linear whose site tensors this one aliases (or None)
        self.site_ref: str | None = None
        self.register_buffer("perm", perm.to(torch.int32))
        self.register_buffer("act_clip", act_clip.float().reshape(3))
        self.num_factors = []
        for p in range(3):
            keep = self.sizes[p] > 0
            self.register_buffer(f"smooth_{p}", smooth[p].float().reshape(-1), persistent=keep)
            for i, m in enumerate(factors[p]):
                self.register_buffer(f"factor_{p}_{i}", m.float(), persistent=keep)
            self.num_factors.append(len(factors[p]))
            self.register_buffer(f"weight_packed_{p}", weight_packed[p], persistent=keep)
            self.register_buffer(
                f"weight_scale_{p}", weight_scale[p].float().reshape(-1), persistent=keep
            )
        self.register_buffer("bias", bias)
        self.cws = cws
        self.mac = mac

    @classmethod
    def from_packed(
        cls,
        tensors: dict[str, torch.Tensor],
        *,
        sizes: tuple[int, int, int],
        act_bits: tuple[int | None, ...],
        weight_bits: tuple[int, ...],
        out_features: int,
        num_factors: tuple[int, ...],
        bias: torch.Tensor | None = None,
        cws: FrozenLowRankBranch | None = None,
        mac: FrozenLowRankBranch | None = None,
        context: ModalityContext | None = None,
        site_owner: FrozenSplitQLinear | None = None,
        site_ref: str | None = None,
    ) -> FrozenSplitQLinear:
        """A linear from already packed tensors (the load path: no repacking, no dense weight).

        :param tensors: local buffer name -> tensor, as stored by the format (tensors of empty
            paths may be absent; site tensors are taken from ``site_owner`` when given)
        :param site_owner: the linear holding this one's site tensors, or None
        :param site_ref: the attribute name of ``site_owner`` (recorded for saving)
        """
        src = dict(tensors)
        if site_owner is not None:
            src.update({n: getattr(site_owner, n) for n in site_owner.site_tensor_names()})
        device = src["act_clip"].device
        for p in range(3):
            if int(sizes[p]) == 0:
                src.setdefault(f"smooth_{p}", torch.ones(0, device=device))
                src.setdefault(
                    f"weight_packed_{p}",
                    torch.zeros(out_features, 0, dtype=torch.int32, device=device),
                )
                src.setdefault(f"weight_scale_{p}", torch.ones(out_features, device=device))
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(
            sizes=sizes,
            act_bits=act_bits,
            weight_bits=weight_bits,
            out_features=out_features,
            perm=src["perm"],
            act_clip=src["act_clip"],
            smooth=[src[f"smooth_{p}"] for p in range(3)],
            factors=[[src[f"factor_{p}_{i}"] for i in range(num_factors[p])] for p in range(3)],
            weight_packed=[src[f"weight_packed_{p}"] for p in range(3)],
            weight_scale=[src[f"weight_scale_{p}"] for p in range(3)],
            bias=bias,
            cws=cws,
            mac=mac,
            context=context,
        )
        if site_owner is not None:
            self.link_site(site_owner, site_ref)
        return self

    @staticmethod
    def tensor_shapes(
        sizes: tuple[int, int, int],
        weight_bits: tuple[int, ...],
        out_features: int,
        factor_dims: tuple[tuple[int, ...], ...],
        site_tensors: bool = True,
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Local name -> (shape, dtype) of the persistent path and site buffers (no bias or
        branches) of a linear of these dimensions; ``site_tensors=False`` for a linear that
        aliases its site's tensors."""
        out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        if site_tensors:
            out["perm"] = ((int(sum(sizes)),), torch.int32)
            out["act_clip"] = ((3,), torch.float32)
        for p in range(3):
            k = int(sizes[p])
            if k == 0:
                continue
            if site_tensors:
                out[f"smooth_{p}"] = ((k,), torch.float32)
                for i, n in enumerate(factor_dims[p]):
                    out[f"factor_{p}_{i}"] = ((int(n), int(n)), torch.float32)
            out[f"weight_packed_{p}"] = (
                (int(out_features), packed_words(k, int(weight_bits[p]))),
                torch.int32,
            )
            out[f"weight_scale_{p}"] = ((int(out_features),), torch.float32)
        return out

    # ------------------------------------------------------------------ sites
    def site_tensor_names(self) -> list[str]:
        """Names of the buffers shared by the linears of one activation site."""
        names = ["perm", "act_clip"]
        for p in range(3):
            names.append(f"smooth_{p}")
            names += [f"factor_{p}_{i}" for i in range(self.num_factors[p])]
        return names

    def factor_dims(self) -> tuple[tuple[int, ...], ...]:
        """Side length of each Kronecker factor, per path."""
        return tuple(tuple(int(m.shape[0]) for m in self._mats(p)) for p in range(3))

    def shares_site_with(self, other: FrozenSplitQLinear) -> bool:
        """Whether ``other`` has the same split and bit-identical site tensors."""
        if (
            self.sizes != other.sizes
            or self.act_bits != other.act_bits
            or self.num_factors != other.num_factors
        ):
            return False
        return all(
            getattr(self, n).shape == getattr(other, n).shape
            and torch.equal(getattr(self, n), getattr(other, n))
            for n in self.site_tensor_names()
        )

    def link_site(self, owner: FrozenSplitQLinear, name: str | None) -> None:
        """Alias ``owner``'s site tensors (non-persistent here: stored once, on the owner).

        :param owner: the linear that stores the site tensors
        :param name: ``owner``'s attribute name in the common parent (recorded in the format)
        """
        if (
            owner.sizes != self.sizes
            or owner.act_bits != self.act_bits
            or owner.num_factors != self.num_factors
        ):
            raise ValueError(
                f"cannot share the site of a linear with sizes {owner.sizes}, act_bits "
                f"{owner.act_bits}, factors {owner.num_factors} (this one: {self.sizes}, "
                f"{self.act_bits}, {self.num_factors})"
            )
        for n in self.site_tensor_names():
            self.register_buffer(n, getattr(owner, n), persistent=False)
        self.site_ref = name

    def unlink_site(self) -> None:
        """Store the site tensors on this linear again (copies of the current values)."""
        for n in self.site_tensor_names():
            t = getattr(self, n).clone()
            keep = n in ("perm", "act_clip") or self.sizes[int(n.split("_")[1])] > 0
            self.register_buffer(n, t, persistent=keep)
        self.site_ref = None

    # ------------------------------------------------------------------ compute
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

    def weight_int(self, p: int) -> torch.Tensor:
        """Unpacked int8 codes of path ``p`` (``d_out x k_p``)."""
        packed = getattr(self, f"weight_packed_{p}")
        return unpack_path_weight(packed, self.weight_bits[p], self.sizes[p])

    def dequantized_weight(self, p: int) -> torch.Tensor:
        """Dequantized transformed weight of path ``p``."""
        w = self.weight_int(p).float()
        return w * getattr(self, f"weight_scale_{p}")[:, None]

    def runtime_params(self):
        """The packed parameters as :class:`splitq_modifier.runtime.SplitQLinearParams`
        (sharing this module's tensors)."""
        if None in self.act_bits:
            raise ValueError("splitq::linear needs quantized activations (act_bits has None)")
        return SplitQLinearParams(
            sizes=self.sizes,
            w_packed=tuple(getattr(self, f"weight_packed_{p}") for p in range(3)),
            w_scale=tuple(getattr(self, f"weight_scale_{p}") for p in range(3)),
            w_bits=self.weight_bits,
            a_bits=self.act_bits,
            act_clip=self.act_clip,
            cws=None if self.cws is None else self.cws.runtime_branch(),
            mac=None if self.mac is None else self.mac.runtime_branch(),
            mac_input=0 if self.mac is None or self.mac.input == "residual" else 1,
        )

    def _mask(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.context is None else self.context.mask_for(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Site transform in torch, then ``torch.ops.splitq.linear`` on the packed weights.

        Linears with unquantized activations (``act_bits`` None, weight-only SplitQ) have no
        runtime op and use :meth:`dense_forward`.
        """
        if None in self.act_bits:
            return self.dense_forward(x)
        xt = torch.cat(self.transform_input(x), dim=-1)
        return splitq_linear(xt, self.runtime_params(), self._mask(x), self.bias, x.dtype)

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dense fake-quant reference: dequantized weights, fake-quantized activations, fp32."""
        xs = self.transform_input(x)
        xq = [fake_quant(a, b, self.act_clip[p]) for p, (a, b) in enumerate(zip(xs, self.act_bits))]
        y = sum(a @ self.dequantized_weight(p).T for p, a in enumerate(xq) if a.shape[-1])
        if self.cws is not None:
            y = y + self.cws(xq[2])
        if self.mac is not None:
            y = y + self.mac.text_compensation(xs[2], xq[2], self._mask(x))
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def _apply(self, fn, recurse: bool = True):
        """``.to(dtype)`` / ``.half()`` leave the fp32 scales and transforms fp32 (the op
        contract); devices move as usual."""
        keep = {
            n: b
            for n, b in self._buffers.items()
            if n != "bias" and b is not None and b.dtype == torch.float32
        }
        super()._apply(fn, recurse)
        for n, old in keep.items():
            new = self._buffers[n]
            if new is not None and new.dtype != torch.float32:
                self._buffers[n] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        site = "" if self.site_ref is None else f", site_ref={self.site_ref!r}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"sizes={self.sizes}, weight_bits={self.weight_bits}, act_bits={self.act_bits}"
            f"{site}"
        )
