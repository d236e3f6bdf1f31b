"""Per-decoder-layer calibration: learn transforms, clipping and gates on reconstruction loss.

FlatQuant's objective: for one decoder layer, minimise the MSE between its FP output and
its quantized output on the cached calibration inputs of that layer. Plain torch; the
modifier hands in the layer (with its linears already swapped for
:class:`~splitq_modifier.split_linear.SplitQLinear`) and the cached samples.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from splitq_modifier.distributed import (
    all_gather_objects,
    all_reduce_grads,
    all_reduce_sums,
    local_batch_size,
    rank_and_world,
)
from splitq_modifier.split_linear import cached_weights

__all__ = ["LayerSample", "TrainConfig", "layer_output", "train_layer", "layer_loss"]


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
