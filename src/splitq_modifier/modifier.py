"""``SplitQModifier``: SplitQ as an llm-compressor modifier.

The modifier only orchestrates llm-compressor's lifecycle; the method lives in plain torch
modules (:mod:`.mocd`, :mod:`.transforms`, :mod:`.acc`, :mod:`.split_linear`,
:mod:`.calibrate`). In oneshot's sequential pipeline, per decoder layer:

1. calibration pass (hooks): the input embedding's pre-hook records which tokens are vision
   or text; each site's first linear feeds MOCD statistics; the decoder layer's hooks cache
   its FP inputs and outputs;
2. ``SEQUENTIAL_EPOCH_END``: the layer, its sites (with their statistics), its cached
   samples and the recipe's settings go to :func:`splitq_modifier.calibrate.calibrate_layer`
   once, which selects the channels, trains and freezes the layer into runtime modules;
   the result is recorded in the report (:class:`splitq_modifier.report.CalibrationReport`);
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
from splitq_modifier.allocation import ROWS_PER_MODALITY
from splitq_modifier.arch import (
    ArchSpec,
    find_sites,
    get_arch,
    is_decoder_layer,
    is_vision_layer,
    vision_token_ids,
)
from splitq_modifier.calibrate import (
    LayerSample,
    Site,
    SplitQSettings,
    calibrate_layer,
    layer_output,
)
from splitq_modifier.distributed import sample_digest, warn_on_overlap
from splitq_modifier.mocd import SELECTION_RULES, ChannelStats
from splitq_modifier.report import CalibrationReport
from splitq_modifier.runtime import ModalityContext, attach_modality_context

__all__ = ["SplitQModifier"]

#: Decoder-layer kwargs holding a KV cache: replays must not append to (and backpropagate
#: through) a cache shared between samples.
_CACHE_KWARGS = ("past_key_values", "past_key_value")


class SplitQModifier(Modifier):
    """Quantize a VLM's language model with SplitQ (MOCD channel split, per-path learned
    transforms, ACC low-rank branches), calibrated layer by layer.

    :param targets: module types or names to quantize (llm-compressor matching), within the
        language model's decoder layers
    :param ignore: modules to leave in full precision
    :param weight_bits: main-path weight bits
    :param activation_bits: main-path activation bits (16 = activations not quantized)
    :param aux_bits_floor: minimum bits of the outlier paths (``max(nominal, floor)``) and of
        the low-rank branches (``max(floor, min(weight_bits, activation_bits))``); paper: 4
    :param vision_outlier_ratio: fraction of channels on the vision-outlier path
    :param text_outlier_ratio: fraction of channels on the text-outlier path
    :param channel_multiple: outlier-path widths are multiples of this (kernel K tiles and
        int32 packing; see :mod:`splitq_modifier.layout`); 1 = exactly ``ceil(ratio * d)``
    :param outlier_widths: ``fixed``: every site's outlier paths at the ratios; ``adaptive``:
        each site's widths chosen from the calibration data within the same outlier-channel
        budget per layer (:mod:`splitq_modifier.allocation`)
    :param channel_selection: channel selection rule: the paper's ``mocd`` (the default),
        ``mocd_error`` (MOCD's vision path, the text path chosen to lower the main path's
        quantization error; the 2-3-bit-activation recipes' choice, ``docs/design.md``), or
        an ablation baseline
    :param num_clusters: K of MOCD's per-channel k-means
    :param max_text_tokens: text-token rows kept per site for MOCD's text score
    :param learn_transforms: learn the invertible factors (False: smoothing + clipping only)
    :param rotation_init: start the factors as random rotations (else the identity)
    :param smooth_alpha: SmoothQuant migration strength of the smoothing-scale init (None: no
        smoothing at the start, ``c = 1``)
    :param outlier_transforms: give the outlier paths their own transforms (False: they are
        quantized as they are: the mixed-precision ablation, without the split's transforms)
    :param cws_rank_ratio: CWS branch rank as a fraction of full rank (0 disables)
    :param mac_rank_ratio: MAC branch rank as a fraction of full rank (0 disables)
    :param learn_gates: learn the branch gates (False: the fixed-SVD ablation)
    :param mac_input: what the MAC branch reads: activation quantization residual or Q(X~)
    :param epochs: training epochs per decoder layer (0: initial transforms, no training)
    :param lr: AdamW learning rate (clipping factors use ``lr * clip_lr_multiplier``)
    :param batch_size: calibration samples per optimiser step
    :param seed: seed of everything random (random selection, sample order)
    :param weight_rounding: how the trained path weights are rounded when the layer is
        frozen: ``rtn`` (to nearest) or ``gptq`` (error feedback with the Hessian of each
        path's quantized transformed activations, :mod:`splitq_modifier.rounding`)
    :param cache_device: where the cached layer inputs and FP targets live (e.g. ``"cpu"``,
        so that the GPU holds one batch at a time); None = where the layer runs
    :param quantize_vision: also quantize the vision encoder's blocks (paper appendix A.4).
        Every token there is vision, so a vision site splits into the vision-outlier path
        and the main path only (no text path, no MAC branch; CWS as configured)
    :param report_plots: draw the PNG plots of the report that ``save_pretrained`` writes
        next to the model (``splitq_report/``; the JSON is always written)
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
    outlier_widths: Literal["fixed", "adaptive"] = "fixed"
    channel_selection: Literal[SELECTION_RULES] = "mocd"
    num_clusters: int = Field(default=3, ge=1, le=16)
    max_text_tokens: int = Field(default=4096, ge=16)
    learn_transforms: bool = True
    rotation_init: bool = True
    smooth_alpha: float | None = Field(default=0.3, ge=0.0, le=1.0)
    outlier_transforms: bool = True
    cws_rank_ratio: float = Field(default=0.02, ge=0.0, le=0.5)
    mac_rank_ratio: float = Field(default=0.03, ge=0.0, le=0.5)
    learn_gates: bool = True
    mac_input: Literal["residual", "act"] = "residual"
    epochs: int = Field(default=15, ge=0)
    lr: float = Field(default=5e-3, gt=0.0, allow_inf_nan=False)
    clip_lr_multiplier: float = Field(default=10.0, gt=0.0, allow_inf_nan=False)
    batch_size: int = Field(default=4, ge=1)
    seed: int = Field(default=0, ge=-(2**63), le=2**63 - 1)
    weight_rounding: Literal["rtn", "gptq"] = "gptq"
    cache_device: str | None = None
    quantize_vision: bool = False
    report_plots: bool = True

    _arch: ArchSpec | None = PrivateAttr(default=None)
    _vision_ids: list[int] = PrivateAttr(default_factory=list)
    _context: ModalityContext = PrivateAttr(default_factory=ModalityContext)
    _masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = PrivateAttr(default_factory=dict)
    _layers: dict[torch.nn.Module, str] = PrivateAttr(default_factory=dict)
    _sites: dict[torch.nn.Module, list[Site]] = PrivateAttr(default_factory=dict)
    _cache: dict[torch.nn.Module, list[LayerSample]] = PrivateAttr(default_factory=dict)
    _pending: dict[torch.nn.Module, tuple] = PrivateAttr(default_factory=dict)
    _report: CalibrationReport = PrivateAttr(default_factory=CalibrationReport)
    _digests: list[str] | None = PrivateAttr(default_factory=list)
    _vision_layers: set[torch.nn.Module] = PrivateAttr(default_factory=set)
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
        adaptive = self.outlier_widths == "adaptive"
        for name, module in model.named_modules():
            vision = self.quantize_vision and is_vision_layer(name, self._arch)
            if not (vision or is_decoder_layer(name, self._arch)):
                continue
            sites = find_sites(name, linears, self._arch, vision=vision)
            if sites:
                checks.check_site_layouts(self, name, sites)
                self._layers[module] = name
                if vision:
                    self._vision_layers.add(module)
                self._sites[module] = [
                    Site(
                        s,
                        lins,
                        ChannelStats(
                            lins[0][1].in_features,
                            self.max_text_tokens,
                            max_vision_tokens=ROWS_PER_MODALITY if adaptive else 0,
                        ),
                        vision,
                    )
                    for s, lins in sites.items()
                ]
        if not self._layers:
            raise ValueError(
                "SplitQModifier found no language-model linears to quantize: check `targets`"
                f" ({targets}) and `ignore` ({self.ignore}), and that the model's decoder "
                f"layers match {self._arch.layers!r} (splitq_modifier.arch)"
            )
        if self.quantize_vision and not self._vision_layers:
            raise ValueError(
                "SplitQModifier(quantize_vision=True) found no vision-encoder linears to "
                f"quantize: check `ignore` ({self.ignore}) and that the vision blocks match "
                f"{self._arch.vision_layers!r} (splitq_modifier.arch)"
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
        # vision blocks first: they run inside the first subgraph's wrapped (untraced)
        # code, which names no modules, and the next subgraphs must see them quantized
        for layer in [m for m in self._layers if m in self._vision_layers and m in self._cache]:
            self._quantize_layer(layer)
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
        from splitq_modifier.report import attach_report

        attach_report(state.model, self)  # save_pretrained(dir) also writes dir/splitq_report
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
        if self._digests is not None:  # first calibration pass: which samples this rank sees
            self._digests.append(sample_digest(ids))

    def _current_masks(
        self, shape: torch.Size, vision_layer: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if vision_layer:  # inside the vision encoder every token is vision
            vision = torch.ones(shape, dtype=torch.bool)
            return vision, ~vision
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
        _, text = self._current_masks(hidden.shape[:-1], layer in self._vision_layers)
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

    def _stats_hook(self, site: Site):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            idx = active_session().state.current_batch_idx
            if not self._guard.site_input_ok(idx, f"{site.linears[0][0]} (site {site.name})", x):
                return
            vision, text = self._current_masks(x.shape[:-1], site.vision)
            site.stats.update(x.detach(), vision.to(x.device), text.to(x.device))

        return hook

    # ---------------------------------------------------------------- the method
    def settings(self) -> SplitQSettings:
        """The recipe's method settings, as the calibration module takes them."""
        return SplitQSettings(**{f: getattr(self, f) for f in SplitQSettings.__dataclass_fields__})

    def _quantize_layer(self, layer: torch.nn.Module) -> None:
        """Hand the layer, its sites and cached samples to :func:`calibrate_layer` once."""
        if self._digests is not None:
            warn_on_overlap(self._digests)  # data parallel: are the ranks' shares disjoint?
            self._digests = None
        name = self._layers[layer]
        samples = self._cache.pop(layer, [])
        sites = self._sites[layer]
        checks.check_linear_weights(lin for site in sites for lin in site.linears)
        self._guard.require_samples(name, len(samples), active_session().state.model)
        with HooksMixin.disable_hooks():
            result = calibrate_layer(
                layer, name, sites, samples, self.settings(), self._context, _offload_like
            )
        kind = "vision" if layer in self._vision_layers else "language"
        self._report.add_layer(name, kind, result)
        layouts = ", ".join(f"{s.name} {'/'.join(map(str, s.plan.sizes))}" for s in result.sites)
        logger.info(
            f"SplitQ {name}: paths v/t/m {layouts}; relative output error "
            f"{result.loss_before:.4g} -> {result.loss_after:.4g}; "
            + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
        )

    def _skipped(self, layer: torch.nn.Module) -> bool:
        """A decoder layer the pipeline ran, not calibrated, with no cached batch."""
        return (
            layer in self._sites
            and self._layers[layer] not in self._report.layers
            and bool(self._guard.bad)
        )

    def _done_layers(self) -> set[torch.nn.Module]:
        return {m for m, n in self._layers.items() if n in self._report.layers}

    @property
    def report(self) -> dict[str, dict]:
        """Per site: selected vision/text channels, realised path widths and factors, token
        counts; per layer: output error before/after (:class:`CalibrationReport`)."""
        return self._report.entries()

    @property
    def channel_max(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per site: per-channel max ``|x|`` over vision and over text tokens (CPU)."""
        return dict(self._report.channel_max)

    def write_report(self, directory: str, plots: bool = True) -> str:
        """Write the diagnostics report (JSON, channel maxima, PNG plots with matplotlib)
        to ``directory`` (see :mod:`splitq_modifier.report`). Returns ``directory``."""
        from splitq_modifier.report import collect, write_report

        return write_report(directory, *collect(self), plots=plots)


def _offload_like(module: torch.nn.Module, original: torch.nn.Module) -> None:
    """Offload ``module`` (and its branch children) as compressed-tensors offloads
    ``original`` (the linear it replaces), so a frozen SplitQ layer of a CPU- or
    disk-offloaded model goes back off the GPU like the rest of the model."""
    from compressed_tensors.offload import get_cache_init_kwargs, offload_module
    from compressed_tensors.offload.cache import OffloadCache

    if not isinstance(original._parameters, OffloadCache):
        return
    kwargs = get_cache_init_kwargs(original)
    for m in module.modules():
        if not isinstance(m._buffers, OffloadCache) and (m._buffers or m._parameters):
            offload_module(m, **kwargs)


# registered here too: when this module is what first imports llmcompressor, the import hook
# of ``splitq_modifier.integrations`` runs before the class exists
from splitq_modifier.integrations.llmcompressor import register_modifier  # noqa: E402

register_modifier()
