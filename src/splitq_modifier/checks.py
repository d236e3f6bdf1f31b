"""Guards of SplitQ calibration against bad data: non-finite samples, overflow, divergence.

Policy (``docs/robustness.md``): a calibration batch with a NaN or an infinity anywhere SplitQ
looks (a decoder layer's input, an activation site's input, a layer's output) is **skipped**,
with one warning naming the batch, the module and what to do; it stays out of the MOCD
statistics and the training of that layer and of every later one (when the first non-finite
value appears inside a layer, its finite activations at that layer's earlier sites are already
in those sites' statistics: maxima and sums cannot be taken back). Calibration **stops**
(:class:`SplitQCalibrationError`) only when a layer is left with no finite batch, or the
full-precision weights themselves are not finite. Nothing non-finite is ever frozen: the
learned parameters are checked after training (a diverged layer falls back to its initial
transforms, with a warning), and every frozen site's tensors are checked before it replaces
the calibration modules.

Why skip rather than stop: one corrupt image among 128 should not cost a whole calibration
run, and the sample is named, so it can be fixed. Why skip the whole batch, not its bad
tokens: a NaN spreads through attention to every later position, so the "finite" tokens of a
bad batch are not trustworthy either.

All checks are tensor reductions (``isfinite(x).all()`` per tensor), run on the device the
tensor is on; nothing loops over elements in Python.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from loguru import logger
from torch import nn

from splitq_modifier.format.validate import describe_problems, site_value_problems

__all__ = [
    "SplitQCalibrationError",
    "activation_bits",
    "check_device_available",
    "check_site_layouts",
    "device_name",
    "CalibrationGuard",
    "check_linear_weights",
    "check_frozen_site",
    "find_nonfinite_samples",
    "nonfinite_parameters",
    "nonfinite_summary",
    "restore_if_diverged",
    "trainable_snapshot",
]

_FIND_ROWS = (
    "`splitq_modifier.checks.find_nonfinite_samples(dataset)` lists the dataset rows with "
    "NaN or Inf values"
)


class SplitQCalibrationError(RuntimeError):
    """SplitQ calibration cannot produce a finite quantized layer from this model and data."""


def nonfinite_summary(x: torch.Tensor) -> str | None:
    """``"12 NaN, 3 inf"`` when ``x`` has non-finite values, else None (one reduction when it
    is finite)."""
    if not x.is_floating_point() or bool(torch.isfinite(x).all()):
        return None
    nan = int(torch.isnan(x).sum())
    inf = int(torch.isinf(x).sum())
    return f"{nan} NaN, {inf} inf"


def _overflow_hint(x: torch.Tensor) -> str:
    if x.dtype != torch.float16:
        return ""
    top = torch.finfo(x.dtype).max
    return (
        f" The model runs in float16, whose largest value is {top:.0f}: an overflow turns into "
        "Inf, then NaN. If the data is fine, load the model with dtype=torch.bfloat16 or "
        "torch.float32 for calibration."
    )


class CalibrationGuard:
    """Tracks which calibration batches are non-finite, warns once per batch, and tells the
    modifier which ones to leave out (keyed by ``state.current_batch_idx``)."""

    def __init__(self) -> None:
        self.bad: dict[int, str] = {}
        self._about: dict[int, str] = {}
        self._vision_ids: tuple[int, ...] = ()

    # ------------------------------------------------------------------ bookkeeping
    def record_batch(self, idx: int, input_ids: torch.Tensor, vision: torch.Tensor) -> None:
        """Remember what batch ``idx`` looks like (for the warnings: the pipeline's batch
        order is shuffled, so its index alone does not find the dataset row)."""
        ids = input_ids.reshape(-1, input_ids.shape[-1]) if input_ids.dim() else input_ids
        head = ids[0, :6].tolist() if ids.dim() == 2 and ids.shape[1] else []
        self._about[idx] = (
            f"{tuple(input_ids.shape)} tokens, {int(vision.sum())} vision; input_ids start {head}"
        )

    def describe(self, idx: int) -> str:
        """``calibration batch 3 ((1, 40) tokens, 16 vision; input_ids start [...])``."""
        about = self._about.get(idx)
        return f"calibration batch {idx}" + (f" ({about})" if about else "")

    def is_bad(self, idx: int) -> bool:
        """Whether batch ``idx`` was found non-finite (at this layer or an earlier one)."""
        return idx in self.bad

    def _mark(self, idx: int, where: str, x: torch.Tensor, why: str, detail: str = "") -> None:
        self.bad[idx] = where
        logger.warning(
            f"SplitQ: {self.describe(idx)} has non-finite values ({why}) in {where}{detail}; "
            "it is skipped: left out of SplitQ's statistics and training of this and every "
            f"later layer.{_overflow_hint(x)} {_FIND_ROWS}."
        )

    # ------------------------------------------------------------------ the checks
    def layer_input_ok(
        self, idx: int, layer: str, x: Any, vision: torch.Tensor | None = None
    ) -> bool:
        """Check a decoder layer's input hidden states; False if the batch is to be skipped."""
        if idx in self.bad:
            return False
        if not isinstance(x, torch.Tensor):
            return True
        why = nonfinite_summary(x)
        if why is None:
            return True
        detail = ""
        if vision is not None and vision.shape == x.shape[:-1]:
            bad_tok = ~torch.isfinite(x).all(dim=-1).cpu()
            v = int((bad_tok & vision.cpu()).sum())
            t = int((bad_tok & ~vision.cpu()).sum())
            detail = f" ({v} vision and {t} text positions)"
            if v and not t:
                detail += ": only image tokens are affected, so check this sample's pixel_values"
        self._mark(idx, f"the input of {layer}", x, why, detail)
        return False

    def _finite_ok(self, idx: int, where: str, t: torch.Tensor, detail: str) -> bool:
        """False (and the batch marked) if ``t`` has non-finite values or the batch already
        failed an earlier check."""
        if idx in self.bad:
            return False
        why = nonfinite_summary(t)
        if why is None:
            return True
        self._mark(idx, where, t, why, detail)
        return False

    def site_input_ok(self, idx: int, site: str, x: torch.Tensor) -> bool:
        """Check the input of an activation site (its first linear's input)."""
        return self._finite_ok(
            idx, f"the input of {site}", x, " although the layer's input is finite"
        )

    def layer_output_ok(self, idx: int, layer: str, y: torch.Tensor) -> bool:
        """Check a decoder layer's FP output (the training target)."""
        return self._finite_ok(idx, f"the output of {layer}", y, " although its input is finite")

    def require_samples(self, layer: str, kept: int, model: nn.Module | None = None) -> None:
        """Stop when a layer has no finite calibration batch left (naming the model's first
        non-finite parameter when that, not the data, is the cause)."""
        if kept:
            return
        if not self.bad:
            raise SplitQCalibrationError(
                f"SplitQ {layer}: no calibration batch reached this layer (check that the "
                "dataset is not empty and num_calibration_samples > 0)"
            )
        first = sorted(self.bad)[:5]
        head = (
            f"SplitQ {layer}: every calibration batch has NaN or Inf activations, nothing is "
            f"left to calibrate on ({len(self.bad)} skipped, e.g. batches {first}: "
            f"{self.bad[first[0]]})"
        )
        broken = [] if model is None else nonfinite_parameters(model, limit=3)
        if broken:
            raise SplitQCalibrationError(
                f"{head}. The model's own weights are not finite ("
                + ", ".join(f"{n}: {why}" for n, why in broken)
                + "): check the checkpoint it was loaded from"
            )
        raise SplitQCalibrationError(
            f"{head}. If the model runs in float16, load it with dtype=torch.bfloat16 or "
            f"torch.float32; otherwise fix the data: {_FIND_ROWS}."
        )


# ---------------------------------------------------------------------------- weights
def check_linear_weights(linears: Iterable[tuple[str, nn.Module]]) -> None:
    """Raise naming the module when a full-precision weight or bias is not finite."""
    for name, lin in linears:
        for attr in ("weight", "bias"):
            t = getattr(lin, attr, None)
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            why = nonfinite_summary(t.detach())
            if why is not None:
                raise SplitQCalibrationError(
                    f"SplitQ: {name}.{attr} has non-finite values ({why}) in the "
                    "full-precision model, which SplitQ cannot quantize: the model's own "
                    "weights are corrupt (check the checkpoint it was loaded from)"
                )


def nonfinite_parameters(model: nn.Module, limit: int = 3) -> list[tuple[str, str]]:
    """The first ``limit`` parameters or buffers of ``model`` with non-finite values, as
    ``(name, "n NaN, m inf")`` (one reduction per tensor; meta tensors skipped)."""
    out = []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":
            continue
        why = nonfinite_summary(t.detach())
        if why is not None:
            out.append((name, why))
            if len(out) >= limit:
                break
    return out


def trainable_snapshot(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the layer's trainable parameters (SplitQ's transforms, clipping, gates)."""
    return {n: p.detach().clone() for n, p in layer.named_parameters() if p.requires_grad}


def restore_if_diverged(
    layer: nn.Module,
    snapshot: dict[str, torch.Tensor],
    name: str,
    before: float,
    after: float,
) -> float:
    """After training: if a trainable parameter or the loss is not finite, put the snapshot
    back (the initial transforms) and warn; returns the loss of what is kept."""
    params = dict(layer.named_parameters())
    broken = [n for n in snapshot if not bool(torch.isfinite(params[n]).all())]
    if not broken and torch.isfinite(torch.tensor(after)):
        return after
    with torch.no_grad():
        for n, saved in snapshot.items():
            params[n].copy_(saved)
    what = f"non-finite parameters {broken[:3]}" if broken else f"relative output error {after}"
    logger.warning(
        f"SplitQ {name}: training diverged ({what}); kept the initial transforms (relative "
        f"output error {before:.4g}). Lower the recipe's `lr`, or calibrate in bfloat16 or "
        "float32 if the model runs in float16."
    )
    if not torch.isfinite(torch.tensor(before)):
        logger.warning(
            f"SplitQ {name}: the quantized layer's output is not finite on the calibration "
            "data even before training (an overflow of the model dtype?); its weights are "
            "finite, but check its outputs"
        )
    return before


def check_frozen_site(name: str, owner: nn.Module) -> None:
    """Raise naming the module and tensor if a frozen site holds a non-finite or invalid
    value (run before the frozen modules replace the calibration ones)."""
    problems = site_value_problems(owner)
    if problems:
        raise SplitQCalibrationError(
            f"SplitQ produced an invalid frozen site {name}: {describe_problems(name, problems)}."
            " Please report this with the recipe; lowering `lr` may avoid it."
        )


# ---------------------------------------------------------------------------- recipe fields
def activation_bits(value: int) -> int:
    """Recipe check of ``activation_bits``: 2 to 8 (quantized) or 16 (full precision)."""
    if not (2 <= value <= 8 or value == 16):
        raise ValueError(
            f"activation_bits must be 2 to 8 (per-token integer activations) or 16 "
            f"(activations kept in full precision), got {value}: the runtime has no {value}-bit "
            "activation quantizer"
        )
    return value


def device_name(value: str | None) -> str | None:
    """Recipe check of a device field: None or a name ``torch.device`` accepts."""
    if value is None:
        return None
    try:
        torch.device(value)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(
            f"{value!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1'): {e}"
        ) from e
    return value


def check_device_available(value: str | None, field: str) -> None:
    """Runtime check of a device field (at ``on_initialize``): the device exists here."""
    if value is None:
        return
    dev = torch.device(value)
    if dev.type in ("cpu", "meta"):
        if dev.type == "meta":
            raise SplitQCalibrationError(f"SplitQModifier.{field}={value!r}: 'meta' holds no data")
        return
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise SplitQCalibrationError(
            f"SplitQModifier.{field}={value!r} is not available on this machine ({e}); "
            "set it to 'cpu' or leave it unset"
        ) from e


def check_site_layouts(recipe: Any, layer: str, sites: dict[str, list]) -> None:
    """At ``on_initialize``: every site of ``layer`` can be laid out with the recipe's outlier
    ratios and channel multiple (a width-dependent rule, so not a parse-time one). Raises
    naming the site, its width and the recipe fields to change."""
    from splitq_modifier.layout import plan_site

    if recipe.channel_selection == "none":
        return
    v, t, m = recipe.vision_outlier_ratio, recipe.text_outlier_ratio, recipe.channel_multiple
    for site, linears in sites.items():
        d = linears[0][1].in_features
        try:
            plan_site(d, [lin.out_features for _, lin in linears], v, t, m)
        except ValueError as e:
            raise SplitQCalibrationError(
                f"SplitQModifier: site {layer}.{site} ({d} input channels, first linear "
                f"{linears[0][0]}) cannot be split with vision_outlier_ratio={v}, "
                f"text_outlier_ratio={t}, channel_multiple={m}: {e}. Lower the ratios or "
                "channel_multiple."
            ) from e


# ---------------------------------------------------------------------------- datasets
def _as_float_array(value: Any):
    """A numpy float array of a dataset value, or None if it holds no floats."""
    import numpy as np

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().numpy() if value.is_floating_point() else None
    try:
        arr = np.asarray(value)
    except ValueError:  # ragged nested lists
        arr = np.asarray(value, dtype=object)
    if arr.dtype == object:  # ragged: flatten each element
        parts = [_as_float_array(v) for v in arr.ravel()]
        parts = [p.ravel() for p in parts if p is not None]
        return np.concatenate(parts) if parts else None
    return arr if np.issubdtype(arr.dtype, np.floating) else None


def find_nonfinite_samples(
    dataset: Any, columns: Iterable[str] | None = None
) -> list[tuple[int, str, str]]:
    """Rows of a calibration dataset with NaN or Inf values: ``(row, column, "n NaN, m inf")``.

    Works on a ``datasets.Dataset`` (read as numpy, one row at a time) or any sequence of dicts
    of tensors / arrays / nested lists. Only floating-point values are checked; ``columns``
    restricts the check (default: all). Use it before ``oneshot`` to find the rows behind a
    skipped-batch warning.
    """
    import numpy as np

    rows = dataset.with_format("numpy") if hasattr(dataset, "with_format") else dataset
    wanted = None if columns is None else set(columns)
    found = []
    for i in range(len(rows)):
        for col, value in rows[i].items():
            if wanted is not None and col not in wanted:
                continue
            arr = _as_float_array(value)
            if arr is not None and not np.isfinite(arr).all():
                nan, inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
                found.append((i, col, f"{nan} NaN, {inf} inf"))
    return found
