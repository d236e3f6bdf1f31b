"""MOCD: modality-specific outlier channel decoupling (DESIGN.md section 1.2, paper section 4.2).

Plain torch functions plus a small reducible statistics accumulator; nothing here imports
llm-compressor, so the module is usable (and testable) on its own.

Pipeline for one activation site of width ``d``:

1. :class:`ChannelStats` accumulates, over calibration batches, per-channel maxima of ``|x|`` on
   vision and on text tokens, per-channel sums of ``|x|`` and token counts per modality, and a
   bounded, deterministic sample of text-token rows. It is reducible across data-parallel ranks
   (:meth:`ChannelStats.all_reduce`).
2. :func:`select_channels` turns the statistics into three disjoint, sorted index sets
   ``(vision_idx, text_idx, main_idx)`` under one of :data:`SELECTION_RULES`.

MOCD itself (rule ``"mocd"``):

- vision path ``C_v`` = top-``k_v`` channels by max ``|x|`` over vision tokens;
- text path ``C_t`` = among the remaining channels, top-``k_t`` channels by
  :func:`text_instability_score`: per text token, each channel's percentile rank of ``|x|``
  within the token; per channel, 1-D k-means (``K`` clusters) over its rank sequence; score =
  inertia / number of tokens (the within-cluster variance);
- main path ``C_m`` = the rest. ``k = ceil(ratio * d)``.

Choices made here (DESIGN.md marks them "I"/"choose"):

- Ranks use ``|x|`` (a quantizer cares about magnitude; a large negative value is as much an
  outlier as a large positive one) and are taken over the channels not yet assigned to the
  vision path (``d - k_v`` channels), so the vision outliers, which may also be large on text
  tokens, do not shift every other channel's rank.
- Ties within a token get ordinal ranks (stable sort: lower channel index ranks lower), which is
  deterministic and exact for continuous data.
- The k-means is a batched 1-D Lloyd iteration over all channels at once (see
  :func:`batched_kmeans_1d`): data sorted per channel, clusters are contiguous segments, so an
  iteration costs ``O(K log n)`` per channel via prefix sums and ``searchsorted``. Two
  deterministic starts (quantiles and an even grid over [min, max]) and keep the better one.
  Checked against sklearn's ``KMeans(n_init=10)`` in ``tests/test_mocd.py``.
- Ties between scores are broken towards the lower channel index (stable sort), so the
  selection is deterministic and identical on CPU and GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from loguru import logger
from torch import Tensor

__all__ = [
    "SELECTION_RULES",
    "ChannelStats",
    "batched_kmeans_1d",
    "jaccard",
    "percentile_ranks",
    "select_channels",
    "text_instability_score",
]

SELECTION_RULES: tuple[str, ...] = (
    "mocd",
    "none",
    "random",
    "text_max",
    "vision_max",
    "multi_max",
    "multi_mean",
)

# Upper bound on the number of elements of one working tensor in the score computation (rank
# argsort over token chunks, sorted float64 channel chunks in the k-means). 2**24 elements is
# 128 MiB in float64; it bounds peak memory for wide sites (d ~ 19k) with n = 4096 text rows.
_CHUNK_ELEMS = 1 << 24

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


# ---------------------------------------------------------------------------------------------
# Deterministic sample keys
# ---------------------------------------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic), a well-mixed hash."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def _sample_keys(seed: int, stream: int, start: int, count: int) -> Tensor:
    """Pseudo-random, non-negative int64 keys for tokens ``start .. start+count-1`` of a stream.

    The key of a token depends only on ``(seed, stream, token index)``, never on how the tokens
    were split into batches, so keeping the ``m`` smallest keys is a uniform random sample
    without replacement that is the same for any batching and merges exactly across ranks
    ("bottom-k" sampling). ``stream`` is the data-parallel rank.
    """
    idx = np.arange(start, start + count, dtype=np.uint64)
    salt = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    salt = _splitmix64(salt ^ np.uint64(stream & 0xFFFFFFFF))
    keys = _splitmix64(idx ^ salt[0])
    return torch.from_numpy((keys >> np.uint64(1)).astype(np.int64))


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# ---------------------------------------------------------------------------------------------
# Statistics accumulator
# ---------------------------------------------------------------------------------------------


class ChannelStats:
    """Per-channel activation statistics of one activation site, split by modality.

    Accumulated over calibration batches with :meth:`update`:

    - ``vision_max`` / ``text_max``: running per-channel max of ``|x|`` over vision / text
      tokens (float32, on the device of the first batch; zeros while a modality is unseen);
    - ``vision_abs_sum`` / ``text_abs_sum``: per-channel sums of ``|x|`` (float64), with
      ``num_vision_tokens`` / ``num_text_tokens`` (for the ``multi_mean`` rule);
    - ``text_rows``: at most ``max_text_tokens`` text-token rows (float32, CPU) for the text
      instability score.

    Subsampling of text rows: every text token gets a pseudo-random key hashed from
    ``(seed, rank, index of the token in this rank's text stream)``; the rows with the
    ``max_text_tokens`` smallest keys are kept, ordered by key. This is a uniform sample without
    replacement, it does not depend on how the stream was split into batches (several
    ``update`` calls keep exactly the rows one call on the concatenation keeps), and it merges
    exactly across ranks (gather, keep the smallest keys again). A plain stride would bias
    towards early batches once the cap is reached; a ``torch.Generator`` would depend on the
    batching.

    Tokens in neither mask (padding, for example) are ignored. A token in both masks is an
    error.

    Reduction across data-parallel ranks: :meth:`all_reduce` (maxima with MAX, sums and counts
    with SUM, text rows gathered and re-subsampled). Call it once, after the last ``update``.
    """

    def __init__(self, dim: int, max_text_tokens: int = 4096, seed: int = 0) -> None:
        """Create an empty accumulator.

        Args:
            dim: channel count ``d`` of the activation site.
            max_text_tokens: cap on the stored text rows (after reduction too).
            seed: seed of the sample keys (see the class docstring).
        """
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if max_text_tokens < 1:
            raise ValueError(f"max_text_tokens must be >= 1, got {max_text_tokens}")
        self.dim = int(dim)
        self.max_text_tokens = int(max_text_tokens)
        self.seed = int(seed)
        self.vision_max = torch.zeros(self.dim, dtype=torch.float32)
        self.text_max = torch.zeros(self.dim, dtype=torch.float32)
        self.vision_abs_sum = torch.zeros(self.dim, dtype=torch.float64)
        self.text_abs_sum = torch.zeros(self.dim, dtype=torch.float64)
        self._num_vision = 0
        self._num_text = 0
        self.text_rows = torch.zeros(0, self.dim, dtype=torch.float32)
        self._text_keys = torch.zeros(0, dtype=torch.int64)
        self._device_set = False
        self._reduced = False

    # -- properties ---------------------------------------------------------------------------

    @property
    def num_vision_tokens(self) -> int:
        """Number of vision tokens seen (all ranks after :meth:`all_reduce`)."""
        return self._num_vision

    @property
    def num_text_tokens(self) -> int:
        """Number of text tokens seen (all ranks after :meth:`all_reduce`)."""
        return self._num_text

    @property
    def text_keys(self) -> Tensor:
        """Sample keys of ``text_rows`` (int64, CPU, ascending)."""
        return self._text_keys

    @property
    def vision_mean(self) -> Tensor:
        """Per-channel mean ``|x|`` over vision tokens (zeros if none), float32."""
        return (self.vision_abs_sum / max(self._num_vision, 1)).float()

    @property
    def text_mean(self) -> Tensor:
        """Per-channel mean ``|x|`` over text tokens (zeros if none), float32."""
        return (self.text_abs_sum / max(self._num_text, 1)).float()

    @property
    def multi_mean(self) -> Tensor:
        """Per-channel mean ``|x|`` over all vision and text tokens (zeros if none), float32."""
        total = max(self._num_vision + self._num_text, 1)
        return ((self.vision_abs_sum + self.text_abs_sum) / total).float()

    @property
    def multi_max(self) -> Tensor:
        """Per-channel max ``|x|`` over vision and text tokens, float32."""
        return torch.maximum(self.vision_max, self.text_max)

    # -- accumulation -------------------------------------------------------------------------

    def _to_device(self, device: torch.device) -> None:
        if self._device_set:
            return
        self.vision_max = self.vision_max.to(device)
        self.text_max = self.text_max.to(device)
        self.vision_abs_sum = self.vision_abs_sum.to(device)
        self.text_abs_sum = self.text_abs_sum.to(device)
        self._device_set = True

    @torch.no_grad()
    def update(self, x: Tensor, vision_mask: Tensor, text_mask: Tensor) -> None:
        """Add one batch of activations.

        Args:
            x: activations ``[..., d]`` (any float dtype, any device).
            vision_mask: bool ``[...]``, True at vision (image/video) token positions; same
                leading shape as ``x``.
            text_mask: bool ``[...]``, True at text token positions.

        Raises:
            ValueError: on a shape mismatch, or a token marked as both vision and text.
            RuntimeError: after :meth:`all_reduce` (the statistics are then global).
        """
        if self._reduced:
            raise RuntimeError("ChannelStats.update() after all_reduce(); create a new one")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x has {x.shape[-1]} channels, ChannelStats expects {self.dim}")
        lead = tuple(x.shape[:-1])
        for name, m in (("vision_mask", vision_mask), ("text_mask", text_mask)):
            if tuple(m.shape) != lead:
                raise ValueError(f"{name} has shape {tuple(m.shape)}, expected {lead}")
        xs = x.detach().reshape(-1, self.dim)
        vm = vision_mask.reshape(-1).to(device=xs.device, dtype=torch.bool)
        tm = text_mask.reshape(-1).to(device=xs.device, dtype=torch.bool)
        if bool((vm & tm).any()):
            raise ValueError("a token is marked as both vision and text")
        self._to_device(xs.device)

        xv = xs[vm]
        if xv.shape[0] > 0:
            av = xv.abs()
            self.vision_max = torch.maximum(
                self.vision_max, av.amax(dim=0).float().to(self.vision_max.device)
            )
            self.vision_abs_sum += av.sum(dim=0, dtype=torch.float64).to(self.vision_abs_sum)
            self._num_vision += int(xv.shape[0])

        xt = xs[tm]
        n_t = int(xt.shape[0])
        if n_t > 0:
            at = xt.abs()
            self.text_max = torch.maximum(
                self.text_max, at.amax(dim=0).float().to(self.text_max.device)
            )
            self.text_abs_sum += at.sum(dim=0, dtype=torch.float64).to(self.text_abs_sum)
            rank = torch.distributed.get_rank() if _dist_ready() else 0
            keys = _sample_keys(self.seed, rank, self._num_text, n_t)
            self._num_text += n_t
            self._add_text_rows(xt, keys)

    def _add_text_rows(self, rows: Tensor, keys: Tensor) -> None:
        """Merge ``rows`` (any device) with the stored sample, keep the smallest keys."""
        n_old = self._text_keys.shape[0]
        all_keys = torch.cat([self._text_keys, keys])
        keep = min(self.max_text_tokens, all_keys.shape[0])
        order = torch.sort(all_keys, stable=True).indices[:keep]
        old_sel = order[order < n_old]
        new_sel = order[order >= n_old] - n_old
        new_rows = rows[new_sel.to(rows.device)].float().cpu()
        merged_rows = torch.cat([self.text_rows[old_sel], new_rows])
        merged_keys = torch.cat([self._text_keys[old_sel], keys[new_sel]])
        resort = torch.sort(merged_keys, stable=True).indices
        self.text_rows = merged_rows[resort].contiguous()
        self._text_keys = merged_keys[resort].contiguous()

    # -- reduction ----------------------------------------------------------------------------

    @torch.no_grad()
    def all_reduce(self) -> None:
        """Reduce the statistics over all ranks of the default process group, in place.

        Maxima with ``ReduceOp.MAX``, sums and counts with ``ReduceOp.SUM``, text rows gathered
        with ``all_gather_object`` and cut back to ``max_text_tokens`` by smallest key (keys are
        distinct per rank, so the result is the same on every rank). A no-op when
        ``torch.distributed`` is not initialised or when already reduced. NCCL groups reduce on
        the current CUDA device, others (gloo) on CPU; the tensors return to their device.
        """
        if self._reduced or not _dist_ready():
            return
        dist = torch.distributed
        backend = str(dist.get_backend()).lower()
        comm_dev = (
            torch.device("cuda", torch.cuda.current_device())
            if "nccl" in backend
            else torch.device("cpu")
        )
        home = self.vision_max.device

        maxima = torch.stack([self.vision_max, self.text_max]).to(comm_dev)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        counts = torch.tensor([self._num_vision, self._num_text], dtype=torch.float64)
        sums = torch.cat([self.vision_abs_sum.to(comm_dev), self.text_abs_sum.to(comm_dev)])
        sums = torch.cat([sums, counts.to(comm_dev)])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        maxima = maxima.to(home)
        sums = sums.to(home)
        self.vision_max, self.text_max = maxima[0].clone(), maxima[1].clone()
        self.vision_abs_sum = sums[: self.dim].clone()
        self.text_abs_sum = sums[self.dim : 2 * self.dim].clone()
        self._num_vision = int(round(float(sums[2 * self.dim])))
        self._num_text = int(round(float(sums[2 * self.dim + 1])))

        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self.text_rows, self._text_keys))
        rows = torch.cat([g[0].cpu() for g in gathered])
        keys = torch.cat([g[1].cpu() for g in gathered])
        order = torch.sort(keys, stable=True).indices[: self.max_text_tokens]
        self.text_rows = rows[order].float().contiguous()
        self._text_keys = keys[order].contiguous()
        self._reduced = True


# ---------------------------------------------------------------------------------------------
# Text instability score
# ---------------------------------------------------------------------------------------------


def percentile_ranks(rows: Tensor) -> Tensor:
    """Per-row percentile rank of ``|x|``: ``rank / (d - 1)`` in [0, 1].

    Args:
        rows: ``[n, d]`` activations.

    Returns:
        float32 ``[n, d]``; ordinal ranks (stable sort, ties: lower column ranks lower). With
        ``d == 1`` every rank is 0.
    """
    n, d = rows.shape
    out = torch.empty(n, d, dtype=torch.float32, device=rows.device)
    if n == 0:
        return out
    denom = float(max(d - 1, 1))
    ar = torch.arange(d, device=rows.device, dtype=torch.float32).div_(denom)
    step = max(1, _CHUNK_ELEMS // max(d, 1))
    for s in range(0, n, step):
        a = rows[s : s + step].abs().float()
        order = torch.sort(a, dim=1, stable=True).indices
        out[s : s + step].scatter_(1, order, ar.expand(a.shape[0], d))
    return out


def _lloyd_sorted(
    xs: Tensor, prefix: Tensor, prefix_sq: Tensor, cent: Tensor, iters: int
) -> tuple[Tensor, Tensor]:
    """Lloyd iterations on per-row sorted 1-D data.

    ``xs`` ``[c, n]`` sorted ascending per row (float64); ``prefix`` / ``prefix_sq``
    ``[c, n+1]`` cumulative sums of ``xs`` / ``xs**2`` with a leading zero; ``cent`` ``[c, K]``
    initial centroids. Clusters of sorted 1-D data under nearest-centroid assignment are
    contiguous segments whose boundaries are found with ``searchsorted`` of the centroid
    midpoints. Empty clusters are moved to the point farthest from its centroid (as sklearn
    does). Returns (centroids ``[c, K]``, inertia ``[c]``).
    """
    c, n = xs.shape
    zeros = torch.zeros(c, 1, dtype=torch.long, device=xs.device)
    full = torch.full((c, 1), n, dtype=torch.long, device=xs.device)
    cent = torch.sort(cent, dim=1).values
    prev_bounds = None
    bounds = None
    for _ in range(max(iters, 1)):
        mids = 0.5 * (cent[:, 1:] + cent[:, :-1])
        inner = torch.searchsorted(xs, mids.contiguous(), right=True)
        bounds = torch.cat([zeros, inner, full], dim=1)  # [c, K+1]
        if prev_bounds is not None and torch.equal(bounds, prev_bounds):
            break
        prev_bounds = bounds
        counts = (bounds[:, 1:] - bounds[:, :-1]).to(xs.dtype)
        sums = prefix.gather(1, bounds[:, 1:]) - prefix.gather(1, bounds[:, :-1])
        empty = counts == 0
        new = torch.where(empty, cent, sums / counts.clamp_min(1))
        if bool(empty.any()):
            new = _relocate_empty(xs, new, empty)
            prev_bounds = None  # assignments must be recomputed
        cent = torch.sort(new, dim=1).values
    # Final inertia with nearest-centroid assignment to the final centroids.
    mids = 0.5 * (cent[:, 1:] + cent[:, :-1])
    inner = torch.searchsorted(xs, mids.contiguous(), right=True)
    bounds = torch.cat([zeros, inner, full], dim=1)
    lo, hi = bounds[:, :-1], bounds[:, 1:]
    cnt = (hi - lo).to(xs.dtype)
    s1 = prefix.gather(1, hi) - prefix.gather(1, lo)
    s2 = prefix_sq.gather(1, hi) - prefix_sq.gather(1, lo)
    # sum (x - m)^2 over a segment = s2 - 2 m s1 + cnt m^2; exact up to float64 rounding.
    inertia = (s2 - 2 * cent * s1 + cnt * cent * cent).clamp_min(0).sum(dim=1)
    return cent, inertia


def _relocate_empty(xs: Tensor, cent: Tensor, empty: Tensor) -> Tensor:
    """Move each empty cluster's centroid to the point farthest from its nearest centroid."""
    cent = cent.clone()
    rows = torch.nonzero(empty.any(dim=1)).flatten()
    x = xs[rows]  # [r, n]
    cr = cent[rows]
    er = empty[rows]
    for j in range(cent.shape[1]):
        need = er[:, j]
        if not bool(need.any()):
            continue
        valid = ~er  # centroids that currently own points (or were relocated)
        dist = (x.unsqueeze(-1) - cr.unsqueeze(1)).abs()  # [r, n, K]
        dist = dist.masked_fill(~valid.unsqueeze(1), float("inf"))
        far = dist.min(dim=2).values.argmax(dim=1)  # [r]
        cand = x.gather(1, far.unsqueeze(1)).squeeze(1)
        cr[:, j] = torch.where(need, cand, cr[:, j])
        er[:, j] = False
    cent[rows] = cr
    return cent


def _binned_dp_init(xs: Tensor, prefix: Tensor, prefix_sq: Tensor, k: int, bins: int) -> Tensor:
    """Optimal K-partition of per-row sorted data restricted to ``bins`` equal-width bin edges.

    Exact dynamic programme (``O(K bins^2)`` per row, batched over rows) over the bin edges;
    points in one bin stay together, so the result is within one bin width of the global
    optimum's boundaries. Returns the segment means ``[c, K]`` (an empty segment repeats a
    neighbouring mean; Lloyd's empty-cluster handling then moves it).
    """
    c, n = xs.shape
    dev = xs.device
    half = max(bins // 2, 1)
    lo, hi = xs[:, :1], xs[:, -1:]
    frac = torch.arange(1, half, dtype=xs.dtype, device=dev) / half
    # Edge positions into xs: equal-width edges (resolve gaps between groups of values) and
    # equal-count edges (resolve dense regions and heavy tails), merged.
    width_pos = torch.searchsorted(xs, (lo + (hi - lo) * frac.unsqueeze(0)).contiguous())
    count_pos = (frac * n).long().unsqueeze(0).expand(c, -1)
    edges = torch.cat(
        [
            torch.zeros(c, 1, dtype=torch.long, device=dev),
            width_pos,
            count_pos,
            torch.full((c, 1), n, dtype=torch.long, device=dev),
        ],
        dim=1,
    )
    edges = torch.sort(edges, dim=1).values  # [c, E] positions into xs, duplicates harmless
    nb = edges.shape[1] - 1
    p1 = prefix.gather(1, edges)
    p2 = prefix_sq.gather(1, edges)
    pc = edges.to(xs.dtype)
    s1 = p1.unsqueeze(1) - p1.unsqueeze(2)  # [c, a, b] sum over bins a..b-1
    s2 = p2.unsqueeze(1) - p2.unsqueeze(2)
    cnt = pc.unsqueeze(1) - pc.unsqueeze(2)
    cost = (s2 - s1 * s1 / cnt.clamp_min(1)).clamp_min(0)
    upper = torch.ones(nb + 1, nb + 1, dtype=torch.bool, device=dev).triu()
    cost = cost.masked_fill(~upper, float("inf"))  # only a <= b
    del s1, s2, cnt
    best = cost[:, 0, :]  # [c, B+1]: one cluster over bins 0..b-1
    back = []
    for _ in range(k - 1):
        tot = best.unsqueeze(2) + cost  # [c, a, b]
        best, arg = tot.min(dim=1)
        back.append(arg)
    # Backtrack the K-1 inner edges (in bin-edge units), from the last cluster to the first.
    cuts = [torch.full((c,), nb, dtype=torch.long, device=dev)]
    for arg in reversed(back):
        cuts.append(arg.gather(1, cuts[-1].unsqueeze(1)).squeeze(1))
    cuts.append(torch.zeros(c, dtype=torch.long, device=dev))
    cut_edges = torch.stack(cuts[::-1], dim=1)  # [c, K+1] ascending bin-edge indices
    pos = edges.gather(1, cut_edges)  # [c, K+1] positions into xs
    seg_s = prefix.gather(1, pos[:, 1:]) - prefix.gather(1, pos[:, :-1])
    seg_n = (pos[:, 1:] - pos[:, :-1]).to(xs.dtype)
    mean = seg_s / seg_n.clamp_min(1)
    # Empty segments: copy the previous non-empty mean (forward fill, then backward fill).
    filled = mean.clone()
    has = seg_n > 0
    for j in range(1, k):
        filled[:, j] = torch.where(has[:, j], filled[:, j], filled[:, j - 1])
        has[:, j] = has[:, j] | has[:, j - 1]
    for j in range(k - 2, -1, -1):
        filled[:, j] = torch.where(seg_n[:, j] > 0, filled[:, j], filled[:, j + 1])
    return filled


def batched_kmeans_1d(
    values: Tensor, num_clusters: int, iters: int = 50, bins: int = 128
) -> Tensor:
    """1-D k-means on many independent series at once, at (in practice) the global optimum.

    Args:
        values: ``[n, c]``: ``c`` independent series (columns) of ``n`` points each.
        num_clusters: ``K >= 1``. ``K == 1`` gives ``n * variance``; ``K >= n`` gives 0.
        iters: maximum Lloyd iterations per start (stops early once no assignment changes).
        bins: resolution of the binned dynamic-programming start (see below).

    Returns:
        float64 ``[c]``: the k-means inertia (sum of squared distances to the assigned
        centroid) of each column.

    Lloyd's algorithm alone stalls in local optima even in 1-D (measured: up to 10% above the
    optimum on discrete or multi-modal data, and sklearn's ``KMeans(n_init=10)`` likewise).
    So the start is the exact optimum of the problem coarsened to ``bins`` equal-width bins
    (a batched ``O(K bins^2)`` dynamic programme), refined by Lloyd on the full data; a second
    start from the ``(i + 0.5) / K`` quantiles is refined too and the lower inertia kept.
    Checked in the tests against an exact ``O(K n^2)`` dynamic programme and against sklearn.
    Data are sorted and centred per column, so a Lloyd step costs ``O(K log n)`` per column
    (prefix sums + ``searchsorted``). Work is chunked over columns to bound memory.
    """
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    n, c = values.shape
    out = torch.zeros(c, dtype=torch.float64, device=values.device)
    if n == 0 or c == 0:
        return out
    k = min(num_clusters, n)
    step = max(1, min(_CHUNK_ELEMS // n, _CHUNK_ELEMS // ((bins + 1) ** 2)))
    q = (torch.arange(k, dtype=torch.float64, device=values.device) + 0.5) / k
    for s in range(0, c, step):
        xs = values[:, s : s + step].t().to(torch.float64)
        xs = torch.sort(xs, dim=1).values
        xs = (xs - xs.mean(dim=1, keepdim=True)).contiguous()
        if k == 1:
            out[s : s + step] = xs.pow(2).sum(dim=1)
            continue
        zero = torch.zeros(xs.shape[0], 1, dtype=xs.dtype, device=xs.device)
        prefix = torch.cat([zero, xs.cumsum(dim=1)], dim=1)
        prefix_sq = torch.cat([zero, (xs * xs).cumsum(dim=1)], dim=1)
        idx = (q * n).long().clamp_(0, n - 1)
        init_q = xs[:, idx]
        init_dp = _binned_dp_init(xs, prefix, prefix_sq, k, bins)
        _, in_q = _lloyd_sorted(xs, prefix, prefix_sq, init_q, iters)
        _, in_dp = _lloyd_sorted(xs, prefix, prefix_sq, init_dp, iters)
        out[s : s + step] = torch.minimum(in_q, in_dp)
    return out


def text_instability_score(
    text_rows: Tensor,
    num_clusters: int = 3,
    exclude: Tensor | None = None,
    iters: int = 50,
) -> Tensor:
    """MOCD text score: within-cluster variance of each channel's per-token percentile rank.

    For every text token (row) each channel's percentile rank of ``|x|`` is computed over the
    channels not in ``exclude`` (``rank / (d_eff - 1)`` in [0, 1]); each channel's rank
    sequence over the tokens is clustered with 1-D k-means (``num_clusters`` clusters, batched
    over channels, :func:`batched_kmeans_1d`) and scored by inertia / ``n``. Larger = less
    stable relative response = more of a text outlier channel.

    Args:
        text_rows: ``[n, d]`` text-token activations (any device; computed there).
        num_clusters: ``K`` (paper: 1, 3, 5; default 3). ``K = 1`` is the variance.
        exclude: optional indices (or a bool mask of length ``d``) of channels left out of the
            ranking (MOCD passes the vision channels).
        iters: maximum Lloyd iterations.

    Returns:
        float32 ``[d]``; excluded channels score ``-inf`` (never selected ahead of a real
        score). Never NaN: if ``n <= K`` (and ``K > 1``) the k-means would be degenerate
        (inertia 0 for every channel), so ``K`` falls back to 1 (variance) with a warning;
        ``n == 0`` gives zeros (warned).
    """
    if text_rows.dim() != 2:
        raise ValueError(f"text_rows must be [n, d], got shape {tuple(text_rows.shape)}")
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    n, d = text_rows.shape
    dev = text_rows.device
    keep = torch.ones(d, dtype=torch.bool, device=dev)
    if exclude is not None:
        ex = exclude.to(dev)
        if ex.dtype == torch.bool:
            if ex.shape != (d,):
                raise ValueError(f"bool exclude mask must have shape ({d},)")
            keep &= ~ex
        elif ex.numel() > 0:
            keep[ex.long()] = False
    score = torch.full((d,), float("-inf"), dtype=torch.float32, device=dev)
    kept = torch.nonzero(keep).flatten()
    if kept.numel() == 0:
        return score
    if n == 0:
        logger.warning("text_instability_score: no text tokens; all scores are 0")
        score[kept] = 0.0
        return score
    k = num_clusters
    if k > 1 and n <= k:
        logger.warning(
            f"text_instability_score: {n} text token(s) <= num_clusters={k}; "
            "falling back to K=1 (rank variance)"
        )
        k = 1
    sub = text_rows if kept.numel() == d else text_rows[:, kept]
    ranks = percentile_ranks(sub)
    inertia = batched_kmeans_1d(ranks, k, iters=iters)
    score[kept] = torch.nan_to_num((inertia / n).float(), nan=0.0)
    return score


# ---------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------


def _check_ratio(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a number in [0, 0.5], got {value!r}") from e
    if not (0.0 <= v <= 0.5):  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 0.5], got {value!r}")
    return v


def _descending(score: Tensor) -> Tensor:
    """Indices by descending score; NaN counts as -inf; ties towards the lower index."""
    s = torch.nan_to_num(score.float(), nan=float("-inf"))
    return torch.sort(s, descending=True, stable=True).indices


def _top_two(score: Tensor, k_first: int, k_second: int) -> tuple[Tensor, Tensor]:
    order = _descending(score)
    return order[:k_first], order[k_first : k_first + k_second]


def select_channels(
    stats: ChannelStats,
    rule: str,
    vision_ratio: float,
    text_ratio: float,
    num_clusters: int = 3,
    seed: int = 0,
    *,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Split the ``d`` channels of one site into vision, text and main paths.

    ``k_v = ceil(vision_ratio * d)``, ``k_t = ceil(text_ratio * d)``.

    Rules (``"mocd"`` is the method; the others are the paper's ablation baselines, Table 4,
    which choose outlier channels by one modality-agnostic or single-modality statistic and
    still fill both outlier paths, so the split keeps its shape):

    - ``"mocd"``: vision = top-``k_v`` by vision max ``|x|``; text = top-``k_t`` by
      :func:`text_instability_score` over the remaining channels (vision channels excluded).
    - ``"none"``: both outlier paths empty (main = all channels).
    - ``"random"``: random disjoint channels, ``torch.Generator`` seeded with ``seed``.
    - ``"text_max"``: text = top-``k_t`` by text max ``|x|``, vision = the next ``k_v``.
    - ``"vision_max"``: vision = top-``k_v`` by vision max ``|x|``, text = the next ``k_t``.
    - ``"multi_max"``: by max ``|x|`` over both modalities: vision = top-``k_v``, text =
      the next ``k_t``.
    - ``"multi_mean"``: the same with mean ``|x|`` over all vision and text tokens.

    Missing modality (logged as a loguru warning), for every rule but ``"none"`` and
    ``"random"`` (which do not look at the data): no vision tokens seen -> ``k_v = 0``; no
    text tokens seen -> ``k_t = 0``. A single-modality rule whose modality is missing
    (``"vision_max"`` without vision tokens, ``"text_max"`` without text tokens) has no
    statistic at all and selects nothing. Fewer text tokens than ``num_clusters``: see
    :func:`text_instability_score` (falls back to K = 1).

    Args:
        stats: accumulated (and, under data parallelism, all-reduced) statistics.
        rule: one of :data:`SELECTION_RULES`.
        vision_ratio: fraction of channels for the vision path, in [0, 0.5].
        text_ratio: fraction of channels for the text path, in [0, 0.5].
        num_clusters: ``K`` of the MOCD text score.
        seed: seed of the ``"random"`` rule.
        device: where to compute the text score (default: CPU, where the rows live).

    Returns:
        ``(vision_idx, text_idx, main_idx)``: int64 CPU tensors, each sorted ascending,
        pairwise disjoint, union ``range(d)``.

    Raises:
        ValueError: unknown ``rule``; a ratio outside [0, 0.5]; ``k_v + k_t > d``;
            ``num_clusters < 1``.
    """
    if rule not in SELECTION_RULES:
        raise ValueError(
            f"unknown selection rule {rule!r}; valid rules: {', '.join(SELECTION_RULES)}"
        )
    vr = _check_ratio("vision_ratio", vision_ratio)
    tr = _check_ratio("text_ratio", text_ratio)
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    d = stats.dim
    k_v = math.ceil(vr * d)
    k_t = math.ceil(tr * d)
    if k_v + k_t > d:
        raise ValueError(
            f"vision_ratio={vision_ratio} and text_ratio={text_ratio} select "
            f"k_v + k_t = {k_v} + {k_t} > d = {d} channels"
        )

    empty = torch.zeros(0, dtype=torch.long)
    vis, txt = empty, empty
    if rule == "random":
        g = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(d, generator=g)
        vis, txt = perm[:k_v], perm[k_v : k_v + k_t]
    elif rule != "none":
        has_v = stats.num_vision_tokens > 0
        has_t = stats.num_text_tokens > 0
        if not has_v and k_v > 0:
            logger.warning(f"select_channels({rule!r}): no vision tokens seen; vision path empty")
            k_v = 0
        if not has_t and k_t > 0:
            logger.warning(f"select_channels({rule!r}): no text tokens seen; text path empty")
            k_t = 0
        vision_max = stats.vision_max.detach().float().cpu()
        text_max = stats.text_max.detach().float().cpu()
        if rule == "mocd":
            vis = _descending(vision_max)[:k_v]
            if k_t > 0:
                rows = stats.text_rows
                if device is not None:
                    rows = rows.to(device)
                score = text_instability_score(rows, num_clusters, exclude=vis)
                txt = _descending(score.cpu())[:k_t]
        elif rule == "text_max":
            if has_t:
                txt, vis = _top_two(text_max, k_t, k_v)
            else:
                logger.warning("select_channels('text_max'): no text statistic; nothing selected")
        elif rule == "vision_max":
            if has_v:
                vis, txt = _top_two(vision_max, k_v, k_t)
            else:
                logger.warning(
                    "select_channels('vision_max'): no vision statistic; nothing selected"
                )
        elif rule == "multi_max":
            vis, txt = _top_two(stats.multi_max.detach().float().cpu(), k_v, k_t)
        elif rule == "multi_mean":
            vis, txt = _top_two(stats.multi_mean.detach().float().cpu(), k_v, k_t)

    vis = torch.sort(vis.long().cpu()).values
    txt = torch.sort(txt.long().cpu()).values
    used = torch.zeros(d, dtype=torch.bool)
    used[vis] = True
    used[txt] = True
    main = torch.nonzero(~used).flatten()
    return vis, txt, main


def jaccard(a: Tensor | Sequence[int], b: Tensor | Sequence[int]) -> float:
    """Jaccard similarity ``|A & B| / |A | B|`` of two index sets (1.0 if both are empty)."""
    sa = set(torch.as_tensor(a).flatten().tolist())
    sb = set(torch.as_tensor(b).flatten().tolist())
    union = sa | sb
    if not union:
        return 1.0
    return len(sa & sb) / len(union)
