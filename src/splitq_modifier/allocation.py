"""Adaptive outlier-path widths: how many channels each site's vision and text paths get.

The paper fixes the outlier paths at 2% + 2% of every site's width and names that as a
limitation. With ``outlier_widths: adaptive`` the widths come from the calibration data
instead, one decoder layer at a time:

1. **Candidates.** For each site, vision and text widths from 0 up to a cap (four times the
   fixed width, at most a quarter of the site), in steps of the fixed layout's alignment
   (``channel_multiple`` at real widths, 1 at toy widths), on a grid that thins out
   geometrically; a candidate whose main path has no balanced Kronecker factorisation within
   the layout's cost budget is skipped (:func:`splitq_modifier.layout.balanced_plan`), and
   so is one that would store more weight blocks than the fixed widths
   (:func:`stores_no_more_blocks`: the packed format pads each path to whole blocks).
2. **Proxy error.** For each candidate, the channels are the selection rule's first picks
   (:func:`splitq_modifier.mocd.rank_channels`: prefixes of each modality's order of
   priority), and the proxy is the per-token quantization error the split leaves on sampled
   activation rows: smoothed (the SmoothQuant init the transforms start from), each path
   rotated by seeded random orthogonal Kronecker factors of its layout (what the transforms
   start as), quantized per token at the path's bits; the error energy relative to the rows'
   energy, averaged over the modalities present (vision rows, text rows).
3. **Budget.** The layer may spend as many outlier channels as the fixed widths would
   (``sum`` over its sites of the fixed vision + text widths): an exact allocation over the
   layer's sites minimises the sum of their proxy errors within that budget
   (:func:`allocate`). A width is only raised where it lowers the site's error by at least
   :data:`MIN_GAIN` of it, and by as much against the same widths filled with random
   channels: splitting off any channels gains something (more scale groups: measured up to
   ~12% on Gaussian rows at toy widths), and only what the selected channels gain beyond that
   is theirs. So a site without outliers keeps empty paths (one path, no outlier work in the
   kernels) and unspent channels are not spent elsewhere for nothing.

The budget is per layer because the sequential pipeline calibrates one layer at a time (a
layer's inputs exist only once the layers before it are quantized); the total over the model
is then at most the fixed widths' total. Everything here reads reduced statistics, so under
data parallelism every rank chooses the same widths. Plain torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from splitq_modifier.layout import balanced_plan, kron_dims
from splitq_modifier.runtime.quant import MMA_BLOCK, apply_kron

__all__ = [
    "MIN_GAIN",
    "ROWS_PER_MODALITY",
    "SiteCandidates",
    "allocate",
    "candidate_widths",
    "proxy_errors",
    "stores_no_more_blocks",
]

#: A wider outlier path must lower its site's proxy error by at least this fraction.
MIN_GAIN = 0.1
#: Activation rows per modality the proxy reads (a uniform sample of the site's tokens).
ROWS_PER_MODALITY = 128
#: Most candidate widths per modality (the grid thins out geometrically beyond).
MAX_CANDIDATES = 12


def candidate_widths(fixed: int, d: int, step: int) -> list[int]:
    """Widths ``0, step, 2 step, ...`` up to ``min(4 fixed, d / 4)`` (at least one step when
    ``fixed > 0``), thinned to at most :data:`MAX_CANDIDATES` by geometric spacing (the
    fixed width itself is always a candidate too: :func:`proxy_errors` adds it)."""
    if fixed <= 0:
        return [0]
    step = max(int(step), 1)
    cap = max(min(4 * fixed, d // 4), step)
    n = cap // step
    if n <= MAX_CANDIDATES - 1:
        mults = list(range(n + 1))
    else:
        ratio = n ** (1 / (MAX_CANDIDATES - 2))
        mults = sorted({0, 1, *(round(ratio**i) for i in range(1, MAX_CANDIDATES - 1)), n})
    return [m * step for m in mults]


def stores_no_more_blocks(widths: tuple[int, int], fixed: tuple[int, int], d: int) -> bool:
    """Whether paths ``widths`` (and the main path, the rest of ``d``) store no more weight
    blocks than the fixed widths' paths: each path's weights are packed in whole blocks of
    :data:`~splitq_modifier.runtime.quant.MMA_BLOCK` input channels, so a candidate that
    splits a site into more partial blocks would grow its codes beyond the fixed layout's."""

    def blocks(kv: int, kt: int) -> int:
        return sum(-(-k // MMA_BLOCK) for k in (kv, kt, d - kv - kt))

    return blocks(*widths) <= blocks(*fixed)


def _orthogonal(n: int, gen: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def _path_error(x: Tensor, dims: tuple[int, ...], bits: int, gen: torch.Generator) -> Tensor:
    """Per-row squared error of per-token absmax quantization of ``x`` rotated by random
    orthogonal Kronecker factors of sides ``dims``."""
    if x.shape[1] == 0:
        return x.new_zeros(x.shape[0])
    y = apply_kron(x, [_orthogonal(n, gen) for n in dims])
    qmax = (1 << (bits - 1)) - 1
    scale = y.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
    err = torch.clamp(torch.round(y / scale), -qmax - 1, qmax) * scale - y
    return err.square().sum(dim=1)


@dataclass
class SiteCandidates:
    """The proxy errors of one site's candidate widths.

    :param errors: ``(k_v, k_t) -> relative error`` with the rule's channels
    :param fixed: the fixed widths ``(k_v, k_t)``
    :param null_errors: ``(k_v, k_t) -> relative error`` with random channels (None: no
        such control)
    """

    name: str
    errors: dict[tuple[int, int], float]
    fixed: tuple[int, int]
    null_errors: dict[tuple[int, int], float] | None = None

    def pruned(self, min_gain: float = MIN_GAIN) -> list[tuple[int, tuple[int, int], float]]:
        """``(channels, widths, error)`` of the candidates worth their channels: by growing
        width, each one's error below ``(1 - min_gain)`` times every narrower kept one's and
        times the same widths' error with random channels."""
        out: list[tuple[int, tuple[int, int], float]] = []
        best = math.inf
        null = self.null_errors or {}
        for widths, err in sorted(self.errors.items(), key=lambda kv: (sum(kv[0]), kv[1])):
            if not out or err < min(best, null.get(widths, math.inf)) * (1 - min_gain):
                out.append((sum(widths), widths, err))
                best = min(best, err)
        return out


def proxy_errors(
    name: str,
    vision_rows: Tensor,
    text_rows: Tensor,
    smooth: Tensor,
    vision_order: Tensor,
    text_order: Tensor,
    fixed: tuple[int, int],
    step: int,
    out_features: Sequence[int],
    bits: tuple[int, int],
    seed: int = 0,
) -> SiteCandidates:
    """The proxy error of each candidate width pair of one site (module doc, steps 1-2).

    :param vision_rows, text_rows: sampled activation rows ``[n, d]`` of each modality
    :param smooth: the initial smoothing scales ``(d,)``
    :param vision_order, text_order: the selection rule's picks in order of priority
    :param fixed: the fixed layout's widths ``(k_v, k_t)`` (0 = that path stays empty)
    :param step: width step (the fixed layout's alignment)
    :param bits: activation bits ``(outlier paths, main path)``
    """
    d = int(smooth.numel())
    rows = [r[:ROWS_PER_MODALITY].float() * smooth.float() for r in (vision_rows, text_rows)]
    rows = [r for r in rows if r.shape[0] > 0]
    energy = [r.square().sum() for r in rows]
    cand_v, cand_t = (
        sorted({*candidate_widths(k, d, step), k} & set(range(len(order) + 1)))
        for k, order in zip(fixed, (vision_order, text_order))
    )
    aux_bits, main_bits = bits
    shuffled = torch.randperm(d, generator=torch.Generator().manual_seed(seed + 1))

    def error(kv: int, kt: int, v_order: Tensor, t_order: Tensor, dims) -> float | None:
        vis = v_order[:kv]
        main = torch.ones(d, dtype=torch.bool)
        main[vis] = False
        txt = t_order[main[t_order]][:kt]  # the text picks not on the vision path
        if len(txt) < kt:
            return None
        main[txt] = False
        gen = torch.Generator().manual_seed(seed)
        total = 0.0
        for r, e in zip(rows, energy):
            err = _path_error(r[:, vis], kron_dims(kv, 2, False), aux_bits, gen)
            err = err + _path_error(r[:, txt], kron_dims(kt, 2, False), aux_bits, gen)
            err = err + _path_error(r[:, main], dims, main_bits, gen)
            total += float(err.sum() / e.clamp_min(1e-30))
        return total / max(len(rows), 1)

    errors: dict[tuple[int, int], float] = {}
    null: dict[tuple[int, int], float] = {}
    for kv in cand_v:
        for kt in cand_t:
            if not stores_no_more_blocks((kv, kt), fixed, d):
                continue
            plan = balanced_plan((kv, kt, d - kv - kt), out_features)
            if plan is None:
                continue
            err = error(kv, kt, vision_order, text_order, plan[2])
            if err is None:
                continue
            errors[(kv, kt)] = err
            if kv + kt:
                null[(kv, kt)] = error(kv, kt, shuffled, shuffled, plan[2])
    if fixed not in errors:  # the fixed widths are always a candidate
        errors[fixed] = math.inf
    return SiteCandidates(name, errors, fixed, null)


def allocate(sites: Sequence[SiteCandidates], budget: int, min_gain: float = MIN_GAIN) -> list:
    """Widths ``(k_v, k_t)`` per site minimising the sum of the sites' proxy errors with at
    most ``budget`` outlier channels in all (an exact knapsack over the pruned candidates;
    ties go to fewer channels)."""
    options = [s.pruned(min_gain) for s in sites]
    # best[c] = (error, choice) with at most c channels spent on the sites so far
    best: dict[int, tuple[float, list]] = {0: (0.0, [])}
    for opts in options:
        nxt: dict[int, tuple[float, list]] = {}
        for spent, (err, choice) in best.items():
            for channels, widths, e in opts:
                c = spent + channels
                if c > budget:
                    continue
                cand = (err + e, [*choice, widths])
                if c not in nxt or cand[0] < nxt[c][0]:
                    nxt[c] = cand
        best = nxt
    if not best:  # cannot happen: the empty widths cost nothing
        raise ValueError(f"no allocation of {budget} outlier channels")
    spent = min(best, key=lambda c: (best[c][0], c))
    return best[spent][1]
