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

__all__ = ["LayerSample", "TrainConfig", "layer_output", "train_layer", "layer_loss"]


@dataclass
class LayerSample:
    """One cached calibration batch of a decoder layer: its inputs, FP output, text mask."""

    args: tuple
    kwargs: dict
    target: torch.Tensor
    text_mask: torch.Tensor | None = None


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
    massive activations, is not what the layer computes), else to ``||Y||^2``.
    """
    total = 0.0
    with torch.no_grad(), parametrize.cached():
        for s in samples:
            out = _run(layer, s, set_mask).float()
            t = s.target.float()
            x = _layer_input(s)
            ref = t if x is None else t - x.float()
            total += float((out - t).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-12))
    return total / max(len(samples), 1)


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
    """
    params = [p for p in layer.parameters() if p.requires_grad]
    before = layer_loss(layer, samples, set_mask)
    if not params or cfg.epochs <= 0 or not samples:
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
    steps_per_epoch = math.ceil(len(samples) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    rng = random.Random(cfg.seed)
    order = list(range(len(samples)))
    with torch.enable_grad():
        for _ in tqdm(range(cfg.epochs), desc=desc, leave=False):
            rng.shuffle(order)
            for start in range(0, len(order), cfg.batch_size):
                batch = order[start : start + cfg.batch_size]
                opt.zero_grad(set_to_none=True)
                with parametrize.cached():  # orthogonal factors computed once per step
                    loss = 0.0
                    for i in batch:
                        s = samples[i]
                        out = _run(layer, s, set_mask).float()
                        mse = (out - s.target.float()).pow(2).mean()
                        loss = loss + mse / mse.detach().clamp(min=1e-12) / len(batch)
                    loss.backward()
                opt.step()
                sched.step()
    after = layer_loss(layer, samples, set_mask)
    return before, after
