"""``SplitQModifier``: SplitQ as an llm-compressor modifier.

The modifier only orchestrates llm-compressor's lifecycle; the method lives in plain torch
modules (:mod:`.mocd`, :mod:`.transforms`, :mod:`.acc`, :mod:`.split_linear`,
:mod:`.calibrate`). In oneshot's sequential pipeline, per decoder layer:

1. calibration pass (hooks): the input embedding's pre-hook records which tokens are vision
   or text; each site's first linear feeds MOCD statistics; the decoder layer's hooks cache
   its FP inputs and outputs;
2. ``SEQUENTIAL_EPOCH_END``: MOCD selects the channels of each site, the linears become
   :class:`SplitQLinear` (per-path transforms, clipping, CWS/MAC branches), the layer is
   trained on reconstruction loss, then frozen into :class:`FrozenSplitQLinear`;
3. the pipeline propagates the quantized layer's outputs to the next layer.

Sample recipe::

    splitq_stage:
      splitq_modifiers:
        SplitQModifier:
          weight_bits: 4
          activation_bits: 4
"""

from __future__ import annotations

from typing import Literal

import torch
from compressed_tensors.utils import match_named_modules
from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.utils.hooks import HooksMixin
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator

from splitq_modifier import checks
from splitq_modifier.acc import QuantBranch
from splitq_modifier.arch import ArchSpec, find_sites, get_arch, is_decoder_layer, vision_token_ids
from splitq_modifier.calibrate import LayerSample, TrainConfig, layer_output, train_layer
from splitq_modifier.layout import SitePlan, plan_for_sizes, plan_site
from splitq_modifier.mocd import SELECTION_RULES, ChannelStats, select_channels
from splitq_modifier.runtime import ModalityContext, attach_modality_context
from splitq_modifier.split_linear import ChannelSplit, SplitQLinear, SplitSite, freeze_site

__all__ = ["SplitQModifier"]

#: Decoder-layer kwargs holding a KV cache: replays must not append to (and backpropagate
#: through) a cache shared between samples.
_CACHE_KWARGS = ("past_key_values", "past_key_value")


class _Site:
    """Calibration bookkeeping of one activation site (not a module)."""

    def __init__(self, name: str, linears: list[tuple[str, torch.nn.Linear]], stats: ChannelStats):
        self.name = name
        self.linears = linears
        self.stats = stats


class SplitQModifier(Modifier):
    """Quantize a VLM's language model with SplitQ (MOCD channel split, per-path learned
    transforms, ACC low-rank branches), calibrated layer by layer.

    :param targets: module types or names to quantize (llm-compressor matching), within the
        language model's decoder layers
    :param ignore: modules to leave in full precision
    :param weight_bits: main-path weight bits
    :param activation_bits: main-path activation bits (16 = activations not quantized)
    :param aux_bits_floor: minimum bits of the outlier paths and low-rank branches (paper: 4)
    :param vision_outlier_ratio: fraction of channels on the vision-outlier path
    :param text_outlier_ratio: fraction of channels on the text-outlier path
    :param channel_multiple: outlier-path widths are multiples of this (kernel K tiles and
        int32 packing; see :mod:`splitq_modifier.layout`); 1 = exactly ``ceil(ratio * d)``
    :param channel_selection: channel selection rule (``mocd`` or an ablation baseline)
    :param num_clusters: K of MOCD's per-channel k-means
    :param max_text_tokens: text-token rows kept per site for MOCD's text score
    :param learn_transforms: learn the invertible factors (False: smoothing + clipping only)
    :param rotation_init: start the factors as random rotations (else the identity)
    :param smooth_alpha: SmoothQuant migration strength of the smoothing-scale init
    :param cws_rank_ratio: CWS branch rank as a fraction of full rank (0 disables)
    :param mac_rank_ratio: MAC branch rank as a fraction of full rank (0 disables)
    :param learn_gates: learn the branch gates (False: the fixed-SVD ablation)
    :param mac_input: what the MAC branch reads: activation quantization residual or Q(X~)
    :param epochs: training epochs per decoder layer (0: initial transforms, no training)
    :param lr: AdamW learning rate (clipping factors use ``lr * clip_lr_multiplier``)
    :param batch_size: calibration samples per optimiser step
    :param seed: seed of everything random (random selection, sample order)
    :param cache_device: where the cached layer inputs and FP targets live (e.g. ``"cpu"``,
        so that the GPU holds one batch at a time); None = where the layer runs
    """

    requires_calibration_data: bool = True

    targets: str | list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=list)
    weight_bits: int = Field(default=4, ge=2, le=8)
    activation_bits: int = Field(default=4, ge=2, le=16)
    aux_bits_floor: int = Field(default=4, ge=2, le=8)
    vision_outlier_ratio: float = Field(default=0.02, ge=0.0, le=0.5)
    text_outlier_ratio: float = Field(default=0.02, ge=0.0, le=0.5)
    channel_multiple: int = Field(default=32, ge=1, le=512)
    channel_selection: Literal[SELECTION_RULES] = "mocd"
    num_clusters: int = Field(default=3, ge=1, le=16)
    max_text_tokens: int = Field(default=4096, ge=16)
    learn_transforms: bool = True
    rotation_init: bool = True
    smooth_alpha: float = Field(default=0.3, ge=0.0, le=1.0)
    cws_rank_ratio: float = Field(default=0.02, ge=0.0, le=0.5)
    mac_rank_ratio: float = Field(default=0.03, ge=0.0, le=0.5)
    learn_gates: bool = True
    mac_input: Literal["residual", "act"] = "residual"
    epochs: int = Field(default=15, ge=0)
    lr: float = Field(default=5e-3, gt=0.0, allow_inf_nan=False)
    clip_lr_multiplier: float = Field(default=10.0, gt=0.0, allow_inf_nan=False)
    batch_size: int = Field(default=4, ge=1)
    seed: int = Field(default=0, ge=-(2**63), le=2**63 - 1)
    cache_device: str | None = None

    _arch: ArchSpec | None = PrivateAttr(default=None)
    _vision_ids: list[int] = PrivateAttr(default_factory=list)
    _context: ModalityContext = PrivateAttr(default_factory=ModalityContext)
    _masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = PrivateAttr(default_factory=dict)
    _layers: dict[torch.nn.Module, str] = PrivateAttr(default_factory=dict)
    _sites: dict[torch.nn.Module, list[_Site]] = PrivateAttr(default_factory=dict)
    _cache: dict[torch.nn.Module, list[LayerSample]] = PrivateAttr(default_factory=dict)
    _pending: dict[torch.nn.Module, tuple] = PrivateAttr(default_factory=dict)
    _report: dict[str, dict] = PrivateAttr(default_factory=dict)
    _guard: checks.CalibrationGuard = PrivateAttr(default_factory=checks.CalibrationGuard)

    _check_activation_bits = field_validator("activation_bits")(checks.activation_bits)
    _check_cache_device = field_validator("cache_device")(checks.device_name)

    @model_validator(mode="after")
    def _check_ratios(self) -> SplitQModifier:
        if self.vision_outlier_ratio + self.text_outlier_ratio >= 1.0:
            raise ValueError(
                "vision_outlier_ratio + text_outlier_ratio must leave channels for the main "
                f"path (got {self.vision_outlier_ratio} + {self.text_outlier_ratio})"
            )
        return self

    # ----------------------------------------------------------------- lifecycle
    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        checks.check_device_available(self.cache_device, "cache_device")
        self._arch = get_arch(model.config)
        self._vision_ids = vision_token_ids(model.config, self._arch)
        if not self._vision_ids:
            logger.warning("SplitQ: no vision token id found in the config; all tokens are text")
        targets = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        linears = {
            n: m
            for n, m in match_named_modules(model, targets, self.ignore)
            if isinstance(m, torch.nn.Linear)
        }
        for name, module in model.named_modules():
            if not is_decoder_layer(name, self._arch):
                continue
            sites = find_sites(name, linears, self._arch)
            if sites:
                checks.check_site_layouts(self, name, sites)
                self._layers[module] = name
                self._sites[module] = [
                    _Site(s, lins, ChannelStats(lins[0][1].in_features, self.max_text_tokens))
                    for s, lins in sites.items()
                ]
        if not self._layers:
            raise ValueError(
                "SplitQModifier found no language-model linears to quantize: check `targets`"
                f" ({targets}) and `ignore` ({self.ignore}), and that the model's decoder "
                f"layers match {self._arch.layers!r} (splitq_modifier.arch)"
            )
        n_lin = sum(len(s.linears) for sites in self._sites.values() for s in sites)
        logger.info(
            f"SplitQ: W{self.weight_bits}A{self.activation_bits}, {n_lin} linears in "
            f"{len(self._layers)} decoder layers, selection={self.channel_selection}, "
            f"vision token ids {self._vision_ids}"
        )
        attach_modality_context(model, self._vision_ids, self._context)
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs) -> None:
        embed = state.model.get_input_embeddings()
        self.register_hook(embed, self._record_masks, "forward_pre")
        for layer, sites in self._sites.items():
            self.register_hook(layer, self._capture_inputs, "forward_pre", with_kwargs=True)
            self.register_hook(layer, self._capture_output, "forward")
            for site in sites:
                hook = self._stats_hook(site)
                self.register_hook(site.linears[0][1], hook, "forward_pre")

    def on_sequential_epoch_end(
        self, state: State, event: Event, modules: list[torch.nn.Module] | None = None, **kwargs
    ) -> None:
        for module in modules or []:
            # layers whose batches were all skipped have no cache entry: _quantize_layer says so
            for layer in [m for m in module.modules() if m in self._cache or self._skipped(m)]:
                self._quantize_layer(layer)

    def on_calibration_end(self, state: State, event: Event, **kwargs) -> None:
        self.remove_hooks()
        for layer in list(self._cache):  # layers the pipeline did not end an epoch for
            self._quantize_layer(layer)

    def on_finalize(self, state: State, **kwargs) -> bool:
        if not self.ended_:
            self.on_end(state, None)
        missing = [self._layers[m] for m in self._sites if m not in self._done_layers()]
        if missing:
            raise RuntimeError(
                f"SplitQ did not calibrate {len(missing)} decoder layers (e.g. {missing[:3]}): "
                "they received no calibration data"
            )
        self._cache.clear()
        self._masks.clear()
        return True

    # ---------------------------------------------------------------- hooks
    def _record_masks(self, module: torch.nn.Module, args: tuple) -> None:
        ids = args[0] if args else None
        if not isinstance(ids, torch.Tensor):
            return
        vision = torch.isin(ids, torch.tensor(self._vision_ids, device=ids.device))
        idx = active_session().state.current_batch_idx
        self._masks[idx] = (vision.cpu(), (~vision).cpu())
        self._guard.record_batch(idx, ids, vision)

    def _current_masks(self, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        idx = active_session().state.current_batch_idx
        masks = self._masks.get(idx)
        if masks is None or masks[0].shape != shape:
            vision = torch.zeros(shape, dtype=torch.bool)
            return vision, ~vision  # no input ids seen: every token is text
        return masks

    def _capture_inputs(self, layer: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        idx = active_session().state.current_batch_idx
        vision = self._current_masks(x.shape[:-1])[0] if isinstance(x, torch.Tensor) else None
        self._guard.layer_input_ok(idx, self._layers[layer], x, vision)
        self._pending[layer] = (args, kwargs)

    def _capture_output(self, layer: torch.nn.Module, args: tuple, output) -> None:
        args, kwargs = self._pending.pop(layer)
        hidden = layer_output(output)
        idx = active_session().state.current_batch_idx
        if not self._guard.layer_output_ok(idx, self._layers[layer], hidden):
            return  # a non-finite batch (warned once): not cached
        _, text = self._current_masks(hidden.shape[:-1])
        detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
        sample = LayerSample(
            args=tuple(detach(a) for a in args),
            kwargs={k: None if k in _CACHE_KWARGS else detach(v) for k, v in kwargs.items()},
            target=hidden.detach().clone(),
            text_mask=text,
        )
        if self.cache_device is not None:
            sample = sample.to(self.cache_device)
        self._cache.setdefault(layer, []).append(sample)

    def _stats_hook(self, site: _Site):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            idx = active_session().state.current_batch_idx
            if not self._guard.site_input_ok(idx, f"{site.linears[0][0]} (site {site.name})", x):
                return
            vision, text = self._current_masks(x.shape[:-1])
            site.stats.update(x.detach(), vision.to(x.device), text.to(x.device))

        return hook

    # ---------------------------------------------------------------- the method
    def _bits(self) -> tuple[tuple[int, int, int], tuple[int | None, int | None, int | None]]:
        floor = self.aux_bits_floor
        wb = (max(self.weight_bits, floor), max(self.weight_bits, floor), self.weight_bits)
        ab = None if self.activation_bits >= 16 else self.activation_bits
        aux = None if ab is None else max(ab, floor)
        return wb, (aux, aux, ab)

    def _plan(self, site: _Site) -> tuple[ChannelSplit, SitePlan]:
        """The site's channel split and path layout (aligned counts, balanced factors)."""
        site.stats.all_reduce()
        d = site.stats.dim
        outs = [lin.out_features for _, lin in site.linears]
        if self.channel_selection == "none":
            return ChannelSplit.none(d), plan_site(d, outs, 0.0, 0.0, self.channel_multiple)
        plan = plan_site(
            d, outs, self.vision_outlier_ratio, self.text_outlier_ratio, self.channel_multiple
        )
        v, t, m = select_channels(
            site.stats,
            self.channel_selection,
            self.vision_outlier_ratio,
            self.text_outlier_ratio,
            num_clusters=self.num_clusters,
            seed=self.seed,
            counts=plan.sizes[:2],
        )
        split = ChannelSplit(v.cpu(), t.cpu(), m.cpu())
        if split.sizes != plan.sizes:  # a modality was missing: fewer outlier channels
            plan = plan_for_sizes(split.sizes, outs)
        return split, plan

    def _smoothing(self, site: _Site) -> torch.Tensor:
        """SmoothQuant-style init of ``c``: ``w_max^(1-a) / x_max^a`` per input channel."""
        x_max = torch.maximum(site.stats.vision_max, site.stats.text_max).float().cpu()
        w_max = torch.stack(
            [lin.weight.detach().abs().amax(dim=0).float().cpu() for _, lin in site.linears]
        ).amax(dim=0)
        a = self.smooth_alpha
        c = w_max.clamp(min=1e-5).pow(1 - a) / x_max.clamp(min=1e-5).pow(a)
        return c.clamp(min=1e-4, max=1e4)

    def _branch(self, ratio: float, **kw) -> QuantBranch | None:
        if ratio <= 0:
            return None
        return QuantBranch(ratio, max(self.aux_bits_floor, 4), self.learn_gates, **kw)

    def _quantize_layer(self, layer: torch.nn.Module) -> None:
        name = self._layers[layer]
        samples = self._cache.pop(layer, [])
        checks.check_linear_weights(lin for site in self._sites[layer] for lin in site.linears)
        self._guard.require_samples(name, len(samples), active_session().state.model)
        wbits, abits = self._bits()
        device = next(layer.parameters()).device
        for p in layer.parameters():
            p.requires_grad_(False)
        swapped: list[tuple[SplitSite, torch.nn.Module, list[str], list[SplitQLinear]]] = []
        layouts = []
        for site in self._sites[layer]:
            split, plan = self._plan(site)
            smooth = self._smoothing(site)
            self._report[f"{name}.{site.name}"] = {
                "vision": split.vision.tolist(),
                "text": split.text.tolist(),
                "dim": sum(split.sizes),
                **plan.to_dict(),
            }
            layouts.append(f"{site.name} {'/'.join(map(str, plan.sizes))}")
            seed = self.seed + 3 * len(self._report) if self.rotation_init else None
            ss = SplitSite(split, abits, smooth, self.learn_transforms, seed, plan.dims).to(device)
            parents, attrs, qs = [], [], []
            for lin_name, lin in site.linears:
                q = SplitQLinear(
                    lin,
                    ss,
                    wbits,
                    cws=self._branch(self.cws_rank_ratio),
                    mac=self._branch(self.mac_rank_ratio, input=self.mac_input),
                    context=self._context,
                ).to(device)
                parent, attr = _parent(layer, lin_name[len(name) + 1 :])
                setattr(parent, attr, q)
                parents.append(parent)
                attrs.append(attr)
                qs.append(q)
            if any(p is not parents[0] for p in parents):
                raise ValueError(
                    f"SplitQ site {name}.{site.name}: its linears {attrs} must share one parent "
                    "module (fix the site table in splitq_modifier.arch)"
                )
            swapped.append((ss, parents[0], attrs, qs))
            site.stats = None  # free the statistics
        cfg = TrainConfig(self.epochs, self.lr, self.clip_lr_multiplier, self.batch_size, self.seed)
        snapshot = checks.trainable_snapshot(layer)
        with HooksMixin.disable_hooks():
            before, after = train_layer(layer, samples, cfg, self._set_mask, desc=f"SplitQ {name}")
        after = checks.restore_if_diverged(layer, snapshot, name, before, after)
        for ss, parent, attrs, qs in swapped:
            frozen_site = freeze_site(ss, qs, attrs, self._context)
            checks.check_frozen_site(f"{name}.{_relative(layer, parent)}{attrs[0]}", frozen_site[0])
            for attr, frozen in zip(attrs, frozen_site):
                setattr(parent, attr, frozen)
        self._context.text_mask = None
        self._report[name] = {"loss_before": before, "loss_after": after}
        logger.info(
            f"SplitQ {name}: paths v/t/m {', '.join(layouts)}; relative output error "
            f"{before:.4g} -> {after:.4g}"
        )

    def _set_mask(self, mask: torch.Tensor | None) -> None:
        self._context.text_mask = mask

    def _skipped(self, layer: torch.nn.Module) -> bool:
        """A decoder layer the pipeline ran, not calibrated, with no cached batch."""
        return (
            layer in self._sites
            and self._layers[layer] not in self._report
            and bool(self._guard.bad)
        )

    def _done_layers(self) -> set[torch.nn.Module]:
        return {m for m, n in self._layers.items() if n in self._report}

    @property
    def report(self) -> dict[str, dict]:
        """Per site: selected vision/text channels; per layer: output error before/after."""
        return dict(self._report)


def _relative(root: torch.nn.Module, module: torch.nn.Module) -> str:
    """``"self_attn."``: the path of ``module`` inside ``root`` with a trailing dot."""
    return next((f"{n}." if n else "" for n, m in root.named_modules() if m is module), "")


def _parent(root: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), attr


# registered here too: when this module is what first imports llmcompressor, the import hook
# of ``splitq_modifier`` runs before the class exists
from splitq_modifier import _register_modifier  # noqa: E402

_register_modifier()
