"""Symmetric integer fake quantizers used during SplitQ calibration.

Calibration needs gradients through the quantizer (straight-through rounding, as in
FlatQuant and LSQ), which compressed-tensors' ``fake_quantize`` does not provide, so the few
lines live here. All quantizers are symmetric: ``q = clamp(round(v / s), -2^(b-1), 2^(b-1)-1)``
with ``s = clip * absmax / (2^(b-1)-1)``. Activations are quantized per token (last dim),
weights per output channel (rows).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator

import torch

__all__ = [
    "qmax",
    "round_ste",
    "fake_quant",
    "quantize_sym",
    "step_cache",
    "step_cached",
]

#: Smallest scale; keeps all-zero rows (padding, dead channels) finite.
MIN_SCALE = 1e-8


def qmax(bits: int) -> int:
    """Largest positive integer of a symmetric ``bits``-bit quantizer."""
    return 2 ** (bits - 1) - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even) with a straight-through gradient."""
    return (x.round() - x).detach() + x


def quantize_sym(
    v: torch.Tensor, bits: int, clip: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of ``v`` (last dim reduced) to ``bits``-bit symmetric integers.

    Returns the integers (as float, with straight-through gradient) and the per-row scale
    (shape ``v.shape[:-1] + (1,)``). ``clip`` multiplies the row's absolute maximum; it is a
    ratio in (0, 1], either a scalar or broadcastable to the scale.
    """
    if bits < 2 or bits > 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    if v.shape[-1] == 0:  # an empty path: nothing to quantize
        return v, torch.ones(*v.shape[:-1], 1, dtype=v.dtype, device=v.device)
    amax = v.abs().amax(dim=-1, keepdim=True)
    if clip is not None:
        amax = amax * clip
    scale = amax.clamp(min=MIN_SCALE) / qmax(bits)
    q = torch.clamp(round_ste(v / scale), -qmax(bits) - 1, qmax(bits))
    return q, scale


def fake_quant(
    v: torch.Tensor, bits: int | None, clip: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Quantize-dequantize the rows of ``v``; ``bits=None`` (or >= 16) returns ``v``."""
    if bits is None or bits >= 16 or v.shape[-1] == 0:
        return v
    q, scale = quantize_sym(v, bits, clip)
    return q * scale


_STEP_CACHE: dict | None = None


@contextlib.contextmanager
def step_cache() -> Iterator[None]:
    """Within the block, :func:`step_cached` computes each key once.

    One optimiser step runs several samples through a layer with the same parameters: the
    quantized weights and branch factors are the same for all of them, so they are computed
    on the first sample and reused (one graph, one backward through it). Nesting is allowed
    (the outermost block owns the cache).
    """
    global _STEP_CACHE
    if _STEP_CACHE is not None:
        yield
        return
    _STEP_CACHE = {}
    try:
        yield
    finally:
        _STEP_CACHE = None


def step_cached(key: Hashable, fn: Callable[[], object]):
    """``fn()``, computed once per :func:`step_cache` block (every call outside one)."""
    cache = _STEP_CACHE
    if cache is None:
        return fn()
    if key not in cache:
        cache[key] = fn()
    return cache[key]
