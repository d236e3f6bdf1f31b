"""Data-parallel calibration helpers (``torchrun``, NCCL on GPUs, gloo on CPU).

Each rank calibrates on its share of the data. SplitQ keeps every rank's learned parameters
bit-identical, so every rank freezes the same layer and any rank can save:

- MOCD statistics are all-reduced (:meth:`splitq_modifier.mocd.ChannelStats.all_reduce`), so
  every rank selects the same channels and starts from the same smoothing scales;
- the per-layer training all-reduces its gradients every optimiser step
  (:func:`all_reduce_grads`): identical starting points (same seeds) + identical updates =
  identical parameters. The global batch is the recipe's ``batch_size``, split across ranks,
  so the number of steps and the learning-rate schedule match a single process;
- losses are reduced for reporting (:func:`all_reduce_sums`).

Plain torch; everything is a no-op without an initialised process group.
"""

from __future__ import annotations

import hashlib
import math

import torch
from loguru import logger
from torch import Tensor

__all__ = [
    "all_gather_objects",
    "all_reduce_grads",
    "all_reduce_sums",
    "all_reduce_tensor",
    "is_distributed",
    "rank_and_world",
    "sample_digest",
    "warn_on_overlap",
]


def is_distributed() -> bool:
    """Whether a default process group is initialised with more than one rank."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` in a single process."""
    if not is_distributed():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _comm_device(like: Tensor | None = None) -> torch.device:
    backend = str(torch.distributed.get_backend()).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sums(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def all_reduce_tensor(t: Tensor) -> Tensor:
    """``t`` summed over all ranks (a new tensor on ``t``'s device; ``t`` itself alone)."""
    if not is_distributed():
        return t
    buf = t.to(_comm_device()).clone()
    torch.distributed.all_reduce(buf)
    return buf.to(t.device)


def all_gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def all_reduce_grads(params: list[torch.nn.Parameter], divide_by: float = 1.0) -> None:
    """Sum every parameter's gradient over the ranks (one flat buffer), then divide.

    A parameter without a gradient on this rank (e.g. a MAC gate when this rank's batch had
    no text token) contributes zeros, so every rank ends with the same gradient for every
    parameter and the optimiser steps stay identical.
    """
    if not params:
        return
    if not is_distributed():
        if divide_by != 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(divide_by)
        return
    dev = _comm_device()
    flat = torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p))
            .reshape(-1)
            .to(dev, torch.float32)
            for p in params
        ]
    )
    torch.distributed.all_reduce(flat)
    flat.div_(divide_by)
    off = 0
    for p in params:
        n = p.numel()
        g = flat[off : off + n].view_as(p).to(p.device, p.dtype)
        p.grad = g.clone() if p.grad is None else p.grad.copy_(g)
        off += n


def sample_digest(t: Tensor) -> str:
    """A short content digest of a tensor (identifies a calibration sample across ranks)."""
    data = t.detach().cpu().contiguous()
    return hashlib.sha1(data.numpy().tobytes() + str(tuple(data.shape)).encode()).hexdigest()[:16]


def warn_on_overlap(digests: list[str]) -> int:
    """Warn when calibration samples of this rank were also seen by another rank; returns the
    number of samples shared by two or more ranks."""
    if not is_distributed():
        return 0
    everyone = all_gather_objects(sorted(set(digests)))
    seen: dict[str, int] = {}
    for ranks_digests in everyone:
        for d in ranks_digests:
            seen[d] = seen.get(d, 0) + 1
    shared = sum(1 for c in seen.values() if c > 1)
    if shared:
        logger.warning(
            f"SplitQ: {shared} calibration samples were seen by more than one rank, so the "
            "ranks do not calibrate on disjoint shares of the data. Give each rank its own "
            "shard: `dataset.shard(num_shards=world_size, index=rank)` or "
            "`llmcompressor.datasets.get_rank_partition(split, num_samples)`."
        )
    return shared


def local_batch_size(batch_size: int) -> int:
    """Samples per optimiser step on each rank, so that all ranks together make ``batch_size``."""
    return max(1, math.ceil(batch_size / rank_and_world()[1]))
