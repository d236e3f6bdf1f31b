"""The per-decoder-layer calibration loop: one call takes a layer from FP to runtime modules.

:func:`calibrate_layer` is SplitQ on one decoder layer, given its activation sites (with their
channel statistics), its cached calibration samples and the recipe's :class:`SplitQSettings`:

1. **plan** each site: MOCD channel selection (:mod:`.mocd`) and the path layout
   (:mod:`.layout`), and the SmoothQuant-style initial smoothing scales;
2. **build**: the site's linears become :class:`~splitq_modifier.split_linear.SplitQLinear`
   s sharing one :class:`~splitq_modifier.split_linear.SplitSite` (per-path transforms,
   :mod:`.transforms`; CWS and MAC branches, :mod:`.acc`);
3. **train** the transforms, clipping and gates on FlatQuant's objective: the MSE between
   the layer's FP output and its quantized output on the cached inputs (:func:`train_layer`);
4. **freeze**: GPTQ rounding of the trained path weights (:mod:`.rounding`) and the runtime
   modules (:class:`~splitq_modifier.runtime.SplitQSiteLinear`) swapped into the layer.

Plain torch: the modifier (:mod:`.modifier`) only collects the inputs during llm-compressor's
calibration pass and hands them in once.
"""

from __future__ import annotations

import math
import random
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from splitq_modifier import checks
from splitq_modifier.acc import QuantBranch
from splitq_modifier.allocation import SiteCandidates, allocate, candidate_widths, proxy_errors
from splitq_modifier.distributed import (
    all_gather_objects,
    all_reduce_grads,
    all_reduce_sums,
    local_batch_size,
    rank_and_world,
)
from splitq_modifier.layout import SitePlan, plan_for_sizes, plan_site
from splitq_modifier.mocd import ChannelStats, rank_channels, select_channels
from splitq_modifier.rounding import collect_hessians
from splitq_modifier.runtime import ModalityContext
from splitq_modifier.split_linear import (
    ChannelSplit,
    SplitQLinear,
    SplitSite,
    cached_weights,
    freeze_site,
)

__all__ = [
    "LayerResult",
    "LayerSample",
    "Site",
    "SitePlanResult",
    "SplitQSettings",
    "TrainConfig",
    "calibrate_layer",
    "layer_loss",
    "layer_output",
    "site_seed",
    "train_layer",
]


@dataclass
class LayerSample:
    """One cached calibration batch of a decoder layer: its inputs, FP output, text mask.

    The tensors may live on an offload device (CPU) while the layer is on the GPU:
    :meth:`to` moves one sample at the time it is used.
    """

    args: tuple
    kwargs: dict
    target: torch.Tensor
    text_mask: torch.Tensor | None = None

    def to(self, device: torch.device | str | None) -> LayerSample:
        """This sample with every tensor on ``device`` (itself when None or already there)."""
        if device is None or self.target.device == torch.device(device):
            return self
        mv = lambda v: _move(v, device)  # noqa: E731
        return LayerSample(
            args=tuple(mv(a) for a in self.args),
            kwargs={k: mv(v) for k, v in self.kwargs.items()},
            target=self.target.to(device, non_blocking=True),
            text_mask=None if self.text_mask is None else self.text_mask.to(device),
        )


def _move(v, device):
    if isinstance(v, torch.Tensor):
        return v.to(device, non_blocking=True)
    if isinstance(v, (tuple, list)):
        return type(v)(_move(x, device) for x in v)
    if isinstance(v, dict):
        return {k: _move(x, device) for k, x in v.items()}
    return v


@dataclass
class TrainConfig:
    """Optimiser settings (FlatQuant's defaults): AdamW, cosine schedule, clipping lr x10."""

    epochs: int = 15
    lr: float = 5e-3
    clip_lr_multiplier: float = 10.0
    batch_size: int = 4
    seed: int = 0


def layer_output(out) -> torch.Tensor:
    """The hidden states returned by a decoder layer (a tensor or the first of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _device(layer: nn.Module) -> torch.device | None:
    p = next(layer.parameters(), None)
    return None if p is None else p.device


def _run(layer: nn.Module, s: LayerSample, set_mask: Callable[[torch.Tensor | None], None]):
    set_mask(s.text_mask)
    return layer_output(layer(*s.args, **s.kwargs))


def _layer_input(s: LayerSample) -> torch.Tensor | None:
    x = s.args[0] if s.args else s.kwargs.get("hidden_states")
    return x if isinstance(x, torch.Tensor) and x.shape == s.target.shape else None


def layer_loss(
    layer: nn.Module,
    samples: list[LayerSample],
    set_mask: Callable[[torch.Tensor | None], None] = lambda m: None,
) -> float:
    """Mean relative squared error of the layer over samples.

    Relative to the layer's own contribution ``||Y_q - Y||^2 / ||Y - X||^2`` when the output
    has the shape of the input (a residual block: the residual stream itself, often carrying
    massive activations, is not what the layer computes), else to ``||Y||^2``. Under data
    parallelism the mean is over every rank's samples (the same value on every rank).
    """
    total = 0.0
    device = _device(layer)
    with torch.no_grad(), parametrize.cached(), cached_weights():
        for s in samples:
            s = s.to(device)
            out = _run(layer, s, set_mask).float()
            t = s.target.float()
            x = _layer_input(s)
            ref = t if x is None else t - x.float()
            total += float((out - t).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-12))
    total, count = all_reduce_sums([total, float(len(samples))])
    return total / max(count, 1.0)


def train_layer(
    layer: nn.Module,
    samples: list[LayerSample],
    cfg: TrainConfig,
    set_mask: Callable[[torch.Tensor | None], None] = lambda m: None,
    desc: str = "SplitQ",
) -> tuple[float, float]:
    """Train the layer's learnable SplitQ parameters; returns (loss before, loss after).

    Only parameters with ``requires_grad`` are trained (the caller freezes the model's own
    weights). Each step accumulates ``cfg.batch_size`` samples; each sample's MSE is divided
    by its own detached value, so that every sample weighs the same whatever its scale.

    Data parallel (:mod:`splitq_modifier.distributed`): each rank holds its own samples; a
    step takes ``ceil(batch_size / world)`` of them on every rank and all-reduces the
    gradients, so the global batch, the number of steps and the schedule are those of one
    process with all the samples, and every rank makes the same update. Each rank shuffles
    its own samples with ``seed`` and its rank.
    """
    params = [p for p in layer.parameters() if p.requires_grad]
    before = layer_loss(layer, samples, set_mask)
    rank, world = rank_and_world()
    counts = [int(n) for n in all_gather_objects(len(samples))]
    if not params or cfg.epochs <= 0 or not sum(counts):
        return before, before
    names = {id(p): n for n, p in layer.named_parameters()}
    clip = [p for p in params if "clip_logit" in names[id(p)]]
    rest = [p for p in params if "clip_logit" not in names[id(p)]]
    opt = torch.optim.AdamW(
        [
            {"params": rest, "lr": cfg.lr},
            {"params": clip, "lr": cfg.lr * cfg.clip_lr_multiplier},
        ],
        weight_decay=0.0,
    )
    local_bs = local_batch_size(cfg.batch_size)
    steps_per_epoch = math.ceil(max(counts) / local_bs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    rng = random.Random(cfg.seed + 1_000_003 * rank)
    order = list(range(len(samples)))
    device = _device(layer)
    with torch.enable_grad():
        for _ in tqdm(range(cfg.epochs), desc=desc, leave=False, disable=rank > 0):
            rng.shuffle(order)
            for step in range(steps_per_epoch):
                lo = step * local_bs
                batch = order[lo : lo + local_bs]
                global_count = sum(min(local_bs, max(0, n - lo)) for n in counts)
                opt.zero_grad(set_to_none=True)
                # orthogonal factors and quantized weights computed once per step
                with parametrize.cached(), cached_weights():
                    loss = 0.0
                    for i in batch:
                        s = samples[i].to(device)
                        out = _run(layer, s, set_mask).float()
                        mse = (out - s.target.float()).pow(2).mean()
                        loss = loss + mse / mse.detach().clamp(min=1e-12) / global_count
                    if batch:
                        loss.backward()
                if world > 1:
                    all_reduce_grads(params)
                opt.step()
                sched.step()
    after = layer_loss(layer, samples, set_mask)
    return before, after


# --------------------------------------------------------------------------------------------
# The per-layer loop
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitQSettings:
    """The method's settings: a SplitQ recipe's fields (see ``SplitQModifier`` for each)."""

    weight_bits: int = 4
    activation_bits: int = 4
    aux_bits_floor: int = 4
    vision_outlier_ratio: float = 0.02
    text_outlier_ratio: float = 0.02
    channel_multiple: int = 32
    outlier_widths: str = "fixed"
    channel_selection: str = "mocd"
    num_clusters: int = 3
    learn_transforms: bool = True
    rotation_init: bool = True
    smooth_alpha: float | None = 0.3
    outlier_transforms: bool = True
    cws_rank_ratio: float = 0.02
    mac_rank_ratio: float = 0.03
    learn_gates: bool = True
    mac_input: str = "residual"
    epochs: int = 15
    lr: float = 5e-3
    clip_lr_multiplier: float = 10.0
    batch_size: int = 4
    seed: int = 0
    weight_rounding: str = "gptq"

    @property
    def path_bits(self) -> tuple[tuple[int, int, int], tuple[int | None, int | None, int | None]]:
        """``(weight bits, activation bits)`` per path: the outlier paths at
        ``max(nominal, aux_bits_floor)``, the main path at the nominal bits; activation bits
        None when activations are not quantized (16)."""
        floor = self.aux_bits_floor
        wb = max(self.weight_bits, floor)
        ab = None if self.activation_bits >= 16 else self.activation_bits
        aux = None if ab is None else max(ab, floor)
        return (wb, wb, self.weight_bits), (aux, aux, ab)

    @property
    def branch_bits(self) -> int:
        """Bits of the low-rank branches (factors and hidden activations):
        ``max(aux_bits_floor, min(weight_bits, activation_bits))``."""
        return max(self.aux_bits_floor, min(self.weight_bits, self.activation_bits))

    @property
    def train(self) -> TrainConfig:
        """The optimiser settings."""
        return TrainConfig(
            self.epochs, self.lr, self.clip_lr_multiplier, self.batch_size, self.seed
        )


@dataclass
class Site:
    """One activation site of a layer as calibration sees it: the linears reading one input
    (module names, in the order the site stores them), the channel statistics of that input,
    and whether it is in the vision encoder (every token vision: no text path, no MAC)."""

    name: str
    linears: list[tuple[str, nn.Linear]]
    stats: ChannelStats
    vision: bool = False


@dataclass
class SitePlanResult:
    """What calibration chose for one site (the report's per-site entry)."""

    name: str
    split: ChannelSplit
    plan: SitePlan
    linears: list[str]
    num_vision_tokens: int
    num_text_tokens: int
    vision_max: torch.Tensor
    text_max: torch.Tensor
    adaptive: dict | None = None  # the proxy errors of the chosen and the fixed widths


@dataclass
class LayerResult:
    """What calibrating one layer chose and achieved."""

    sites: list[SitePlanResult]
    loss_before: float
    loss_after: float
    seconds: dict[str, float] = field(default_factory=dict)


def site_seed(seed: int, name: str) -> int:
    """The seed of a site's random initial rotations: derived from the recipe's seed and the
    site's module name only (not from what else was calibrated before it)."""
    return (int(seed) + zlib.crc32(name.encode())) % (2**31)


def _fixed_plan(site: Site, settings: SplitQSettings) -> SitePlan:
    """The layout of the recipe's fixed ratios (aligned counts, balanced factors)."""
    outs = [lin.out_features for _, lin in site.linears]
    text_ratio = 0.0 if site.vision else settings.text_outlier_ratio
    return plan_site(site.stats.dim, outs, settings.vision_outlier_ratio, text_ratio,
                     settings.channel_multiple)  # fmt: skip


def _adaptive_widths(
    name: str, sites: Sequence[Site], settings: SplitQSettings
) -> list[SiteCandidates] | None:
    """Per site, the proxy errors of its candidate widths (:mod:`.allocation`); None when
    activations are not quantized or no channels are selected (then the widths are fixed)."""
    _, abits = settings.path_bits
    if abits[2] is None or settings.channel_selection == "none":
        return None
    tables = []
    for site in sites:
        site.stats.all_reduce()
        d, outs = site.stats.dim, [lin.out_features for _, lin in site.linears]
        fixed = _fixed_plan(site, settings).sizes[:2]
        m = settings.channel_multiple
        step = m if m > 1 and all(k % m == 0 for k in fixed) else 1
        caps = tuple(max(candidate_widths(k, d, step)) if k else 0 for k in fixed)
        text_ratio = 0.0 if site.vision else settings.text_outlier_ratio
        vis, txt = rank_channels(site.stats, settings.channel_selection,
                                 settings.vision_outlier_ratio, text_ratio,
                                 settings.num_clusters, settings.seed, counts=caps)  # fmt: skip
        tables.append(
            proxy_errors(
                f"{name}.{site.name}",
                site.stats.vision_rows,
                site.stats.text_rows,
                _smoothing(site, settings.smooth_alpha),
                vis,
                txt,
                fixed,
                step,
                outs,
                (abits[0], abits[2]),
                site_seed(settings.seed, site.name),
            )  # fmt: skip
        )
    return tables


def _plan(
    site: Site, settings: SplitQSettings, counts: tuple[int, int] | None = None
) -> tuple[ChannelSplit, SitePlan]:
    """The site's channel split and path layout: the fixed ratios' (aligned counts, balanced
    factors), or the given ``counts`` (adaptive widths, whose factors are balanced)."""
    site.stats.all_reduce()
    d = site.stats.dim
    outs = [lin.out_features for _, lin in site.linears]
    if settings.channel_selection == "none":
        return ChannelSplit.none(d), plan_site(d, outs, 0.0, 0.0, settings.channel_multiple)
    text_ratio = 0.0 if site.vision else settings.text_outlier_ratio
    plan = _fixed_plan(site, settings)
    if counts is not None:
        plan = plan_for_sizes((*counts, d - sum(counts)), outs)
    v, t, m = select_channels(
        site.stats,
        settings.channel_selection,
        settings.vision_outlier_ratio,
        text_ratio,
        num_clusters=settings.num_clusters,
        seed=settings.seed,
        counts=plan.sizes[:2],
    )
    split = ChannelSplit(v.cpu(), t.cpu(), m.cpu())
    if split.sizes != plan.sizes:  # a modality was missing: fewer outlier channels
        plan = plan_for_sizes(split.sizes, outs)
    return split, plan


def _smoothing(site: Site, alpha: float | None) -> torch.Tensor:
    """SmoothQuant-style init of ``c``: ``w_max^(1-a) / x_max^a`` per input channel (ones
    when ``alpha`` is None)."""
    if alpha is None:
        return torch.ones(site.stats.dim)
    x_max = torch.maximum(site.stats.vision_max, site.stats.text_max).float().cpu()
    w_max = torch.stack(
        [lin.weight.detach().abs().amax(dim=0).float().cpu() for _, lin in site.linears]
    ).amax(dim=0)
    c = w_max.clamp(min=1e-5).pow(1 - alpha) / x_max.clamp(min=1e-5).pow(alpha)
    return c.clamp(min=1e-4, max=1e4)


def _local(layer_name: str, name: str) -> str:
    """``name`` relative to the layer ``layer_name`` (unchanged if not inside it)."""
    return name[len(layer_name) + 1 :] if name.startswith(layer_name + ".") else name


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), attr


@dataclass
class _Built:
    site: SplitSite
    parent: nn.Module
    attrs: list[str]
    linears: list[SplitQLinear]
    originals: list[nn.Linear]


def _build(
    layer: nn.Module,
    name: str,
    site: Site,
    split: ChannelSplit,
    plan: SitePlan,
    settings: SplitQSettings,
    context: ModalityContext,
    device: torch.device,
) -> _Built:
    """Swap the site's linears for SplitQLinears sharing one SplitSite."""
    wbits, abits = settings.path_bits
    smooth = _smoothing(site, settings.smooth_alpha)
    seed = site_seed(settings.seed, f"{name}.{site.name}") if settings.rotation_init else None
    plain = (not settings.outlier_transforms,) * 2 + (False,)
    ss = SplitSite(split, abits, smooth, settings.learn_transforms, seed, plan.dims, plain)
    ss = ss.to(device)

    def branch(ratio: float, **kw) -> QuantBranch | None:
        if ratio <= 0:
            return None
        return QuantBranch(ratio, settings.branch_bits, settings.learn_gates, **kw)

    parents, attrs, qs = [], [], []
    for lin_name, lin in site.linears:
        q = SplitQLinear(
            lin,
            ss,
            wbits,
            cws=branch(settings.cws_rank_ratio),
            # MAC corrects text tokens only
            mac=None if site.vision else branch(settings.mac_rank_ratio, input=settings.mac_input),
            context=context,
        ).to(device)
        parent, attr = _parent(layer, _local(name, lin_name))
        setattr(parent, attr, q)
        parents.append(parent)
        attrs.append(attr)
        qs.append(q)
    if any(p is not parents[0] for p in parents):
        raise ValueError(
            f"SplitQ site {name}.{site.name}: its linears {attrs} must share one parent "
            "module (fix the site table in splitq_modifier.arch)"
        )
    return _Built(ss, parents[0], attrs, qs, [lin for _, lin in site.linears])


def _relative(root: nn.Module, module: nn.Module) -> str:
    return next((f"{n}." if n else "" for n, m in root.named_modules() if m is module), "")


def calibrate_layer(
    layer: nn.Module,
    name: str,
    sites: Sequence[Site],
    samples: list[LayerSample],
    settings: SplitQSettings,
    context: ModalityContext,
    on_frozen: Callable[[nn.Module, nn.Module], None] | None = None,
) -> LayerResult:
    """SplitQ on one decoder layer: plan, build, train and freeze its sites (module doc).

    :param layer: the decoder layer (its own parameters are frozen here)
    :param name: its module name (for seeds, messages and the report)
    :param sites: its activation sites with their accumulated channel statistics
    :param samples: its cached calibration inputs and FP outputs
    :param context: the model's modality context (the MAC branch's text mask)
    :param on_frozen: called as ``on_frozen(runtime_module, original_linear)`` for each
        runtime module before it replaces its linear (e.g. to offload it like the original)
    :returns: what was chosen per site and the layer's relative output error before/after
    """
    device = next(layer.parameters()).device
    for p in layer.parameters():
        p.requires_grad_(False)

    def set_mask(mask: torch.Tensor | None) -> None:
        context.text_mask = mask

    clock = {"select": 0.0, "build": 0.0}
    t0 = time.perf_counter()
    adaptive = settings.outlier_widths == "adaptive"
    tables = _adaptive_widths(name, sites, settings) if adaptive else None
    widths = None
    if tables is not None:
        budget = sum(sum(_fixed_plan(s, settings).sizes[:2]) for s in sites)
        widths = allocate(tables, budget)
    clock["select"] += time.perf_counter() - t0
    built, chosen = [], []
    for i, site in enumerate(sites):
        t0 = time.perf_counter()
        split, plan = _plan(site, settings, None if widths is None else widths[i])
        t1 = time.perf_counter()
        stats = site.stats
        chosen.append(
            SitePlanResult(
                name=site.name,
                split=split,
                plan=plan,
                linears=[_local(name, n) for n, _ in site.linears],
                num_vision_tokens=stats.num_vision_tokens,
                num_text_tokens=stats.num_text_tokens,
                vision_max=stats.vision_max.detach().float().cpu(),
                text_max=stats.text_max.detach().float().cpu(),
                adaptive=None
                if tables is None
                else {
                    "fixed_widths": list(tables[i].fixed),
                    "proxy_error": tables[i].errors.get(tuple(widths[i])),
                    "fixed_proxy_error": tables[i].errors.get(tables[i].fixed),
                },
            )
        )
        built.append(_build(layer, name, site, split, plan, settings, context, device))
        site.stats = None  # free the statistics
        clock["select"] += t1 - t0
        clock["build"] += time.perf_counter() - t1

    snapshot = checks.trainable_snapshot(layer)
    t0 = time.perf_counter()
    before, after = train_layer(layer, samples, settings.train, set_mask, desc=f"SplitQ {name}")
    after = checks.restore_if_diverged(layer, snapshot, name, before, after)
    t1 = time.perf_counter()
    hessians: list = [None] * len(built)
    if settings.weight_rounding == "gptq":
        hessians = collect_hessians(layer, samples, [(b.site, b.linears[0]) for b in built],
                                    set_mask)  # fmt: skip
    for b, hs in zip(built, hessians):
        frozen_site = freeze_site(b.site, b.linears, b.attrs, context, hs)
        checks.check_frozen_site(f"{name}.{_relative(layer, b.parent)}{b.attrs[0]}", frozen_site[0])
        for attr, frozen in zip(b.attrs, frozen_site):
            if on_frozen is not None:
                on_frozen(frozen, b.originals[0])
            setattr(b.parent, attr, frozen)
    context.text_mask = None
    clock.update(train=t1 - t0, freeze=time.perf_counter() - t1)
    return LayerResult(chosen, before, after, clock)
