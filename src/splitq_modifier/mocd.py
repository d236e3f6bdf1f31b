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
- The k-means is batched over all channels at once (no Python loop over channels), see
  :func:`batched_kmeans_1d`. Plain Lloyd with a quantile start, and sklearn's
  ``KMeans(n_init=10)`` too, stall in local optima even in 1-D (measured up to ~10% and ~8.5%
  above the exact optimum on discrete, rank-like data). The batched solver (coarse exact DP
  start, Lloyd steps, exact joint boundary moves) reaches the exact optimum to rounding on
  nearly every channel in the tests and is deterministic.
- Fewer text tokens than clusters (``n <= K``): the k-means would be degenerate (inertia 0
  everywhere), so ``K`` falls back to 1 (rank variance), with a warning.
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
            # out of place: safe when the tensors were made under torch.inference_mode
            self.vision_abs_sum = self.vision_abs_sum + av.sum(dim=0, dtype=torch.float64).to(
                self.vision_abs_sum
            )
            self._num_vision += int(xv.shape[0])

        xt = xs[tm]
        n_t = int(xt.shape[0])
        if n_t > 0:
            at = xt.abs()
            self.text_max = torch.maximum(
                self.text_max, at.amax(dim=0).float().to(self.text_max.device)
            )
            self.text_abs_sum = self.text_abs_sum + at.sum(dim=0, dtype=torch.float64).to(
                self.text_abs_sum
            )
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


class _Sorted1D:
    """Per-row sorted, centred 1-D data with prefix sums, for O(1) segment costs.

    A K-clustering of sorted 1-D data is a partition into K contiguous segments (the optimal
    one and every Lloyd fixed point are), held as ``bounds`` ``[c, K+1]``: positions
    ``0 = b_0 <= b_1 <= ... <= b_K = n``; segment ``i`` is ``xs[:, b_i:b_{i+1}]``.
    """

    def __init__(self, xs: Tensor) -> None:
        self.xs = xs  # [c, n] float64, sorted per row, centred
        c, n = xs.shape
        self.c, self.n = c, n
        zero = torch.zeros(c, 1, dtype=xs.dtype, device=xs.device)
        self.p1 = torch.cat([zero, xs.cumsum(dim=1)], dim=1)  # [c, n+1]
        self.p2 = torch.cat([zero, (xs * xs).cumsum(dim=1)], dim=1)

    def seg_cost(self, lo: Tensor, hi: Tensor) -> Tensor:
        """Sum of squared deviations from the mean over ``xs[r, lo:hi]`` (same-shape lo/hi)."""
        s1 = self.p1.gather(1, hi) - self.p1.gather(1, lo)
        s2 = self.p2.gather(1, hi) - self.p2.gather(1, lo)
        cnt = (hi - lo).to(self.xs.dtype)
        return (s2 - s1 * s1 / cnt.clamp_min(1)).clamp_min(0)

    def cost(self, bounds: Tensor) -> Tensor:
        """Inertia of the partition ``bounds`` (centroids = segment means), ``[c]``."""
        return self.seg_cost(bounds[:, :-1], bounds[:, 1:]).sum(dim=1)

    def means(self, bounds: Tensor) -> Tensor:
        """Segment means ``[c, K]`` (non-decreasing); an empty segment takes the value at its
        position."""
        lo, hi = bounds[:, :-1], bounds[:, 1:]
        s1 = self.p1.gather(1, hi) - self.p1.gather(1, lo)
        cnt = (hi - lo).to(self.xs.dtype)
        at = self.xs.gather(1, lo.clamp(max=self.n - 1))
        return torch.where(cnt > 0, s1 / cnt.clamp_min(1), at)

    def assign(self, cent: Tensor) -> Tensor:
        """Nearest-centroid partition of sorted data for sorted centroids ``[c, K]``."""
        mids = (0.5 * (cent[:, 1:] + cent[:, :-1])).contiguous()
        inner = torch.searchsorted(self.xs, mids, right=True)
        zeros = torch.zeros(self.c, 1, dtype=torch.long, device=self.xs.device)
        full = torch.full((self.c, 1), self.n, dtype=torch.long, device=self.xs.device)
        return torch.cat([zeros, inner, full], dim=1)

    def lloyd(self, bounds: Tensor, iters: int) -> Tensor:
        """Lloyd iterations from a partition until no assignment changes (or ``iters``)."""
        for _ in range(iters):
            cent = torch.sort(self.means(bounds), dim=1).values
            new = self.assign(cent)
            # Accept only where the inertia does not increase (it never should; guards ties).
            better = self.cost(new) <= self.cost(bounds)
            new = torch.where(better.unsqueeze(1), new, bounds)
            if torch.equal(new, bounds):
                break
            bounds = new
        return bounds

    def subset(self, rows: Tensor) -> _Sorted1D:
        """The same structure for a subset of rows."""
        return _Sorted1D(self.xs[rows])


def _dp_bounds(data: _Sorted1D, edges: Tensor, k: int) -> Tensor:
    """Optimal K-partition whose boundaries are restricted to candidate positions ``edges``.

    ``edges`` ``[c, E]``: sorted positions into the data, starting with 0 and ending with
    ``n`` (duplicates are harmless: empty segments cost 0). Exact dynamic programme,
    ``O(K E^2)`` per row, batched over rows. Returns bounds ``[c, K+1]``.
    """
    c, e = edges.shape
    dev = edges.device
    a_idx = edges.unsqueeze(2).expand(c, e, e).reshape(c, -1)
    b_idx = edges.unsqueeze(1).expand(c, e, e).reshape(c, -1)
    cost = data.seg_cost(torch.minimum(a_idx, b_idx), b_idx).view(c, e, e)  # [c, a, b]
    upper = torch.ones(e, e, dtype=torch.bool, device=dev).triu()
    cost = cost.masked_fill(~upper, float("inf"))  # a <= b only
    best = cost[:, 0, :]  # one segment over edges 0..b
    back = []
    for _ in range(k - 1):
        best, arg = (best.unsqueeze(2) + cost).min(dim=1)
        back.append(arg)
    cuts = [torch.full((c, 1), e - 1, dtype=torch.long, device=dev)]
    for arg in reversed(back):
        cuts.append(arg.gather(1, cuts[-1]))
    cuts.append(torch.zeros(c, 1, dtype=torch.long, device=dev))
    return edges.gather(1, torch.cat(cuts[::-1], dim=1))  # [c, K+1]


def _coarse_edges(data: _Sorted1D, bins: int) -> Tensor:
    """About ``bins`` candidate boundaries: equal-width edges (resolve gaps between groups of
    values) merged with equal-count edges (resolve dense regions and tails), ``[c, E]``."""
    xs, c, n = data.xs, data.c, data.n
    dev = xs.device
    half = max(bins // 2, 1)
    lo, hi = xs[:, :1], xs[:, -1:]
    frac = torch.arange(1, half, dtype=xs.dtype, device=dev) / half
    width_pos = torch.searchsorted(xs, (lo + (hi - lo) * frac.unsqueeze(0)).contiguous())
    count_pos = (frac * n).long().unsqueeze(0).expand(c, -1)
    ends = torch.tensor([0, n], dtype=torch.long, device=dev).unsqueeze(0).expand(c, -1)
    return torch.sort(torch.cat([ends, width_pos, count_pos], dim=1), dim=1).values


def _window_dp_bounds(data: _Sorted1D, bounds: Tensor, w: int, stride: int = 1) -> Tensor:
    """Best partition with every inner boundary moved by ``stride * j``, ``|j| <= w``.

    Exact chain dynamic programme over the K-1 windows (``O(K w^2)`` per row, batched): a
    joint move of all boundaries, which escapes the local optima of one-boundary moves. The
    current partition is a candidate, so the result is never worse. Returns ``[c, K+1]``.
    """
    c, n = data.c, data.n
    dev = bounds.device
    k = bounds.shape[1] - 1
    off = torch.arange(-w, w + 1, device=dev) * stride
    win = (bounds[:, 1:-1].unsqueeze(2) + off).clamp(0, n)  # [c, K-1, W] candidate positions
    nw = win.shape[2]
    zeros = torch.zeros(c, nw, dtype=torch.long, device=dev)
    best = data.seg_cost(zeros, win[:, 0])  # [c, W]: first segment ends at candidate x
    back = []
    for i in range(1, k - 1):
        x = win[:, i - 1].unsqueeze(2).expand(c, nw, nw)  # previous boundary
        y = win[:, i].unsqueeze(1).expand(c, nw, nw)  # this boundary
        step = data.seg_cost(torch.minimum(x, y).reshape(c, -1), y.reshape(c, -1)).view(c, nw, nw)
        step = step.masked_fill(x > y, float("inf"))
        best, arg = (best.unsqueeze(2) + step).min(dim=1)  # over previous boundary
        back.append(arg)
    last = win[:, -1]
    total = best + data.seg_cost(last, torch.full_like(last, n))
    j = total.argmin(dim=1, keepdim=True)  # [c, 1] index into the last window
    picks = [j]
    for arg in reversed(back):
        picks.append(arg.gather(1, picks[-1]))
    idx = torch.cat(picks[::-1], dim=1)  # [c, K-1] window indices, first to last boundary
    inner = win.gather(2, idx.unsqueeze(2)).squeeze(2)
    return torch.cat([bounds[:, :1], inner, bounds[:, -1:]], dim=1)


def _kmeans_sorted(
    data: _Sorted1D, k: int, iters: int, bins: int, window: int, kicks: int
) -> Tensor:
    """Inertia ``[c]`` of a (near-)optimal K-partition of each row of ``data`` (``k >= 2``).

    Two starts (coarse DP optimum, equal-count segments), each refined by Lloyd and kicks;
    the lower inertia per row wins.
    """
    strides = [1]
    while strides[-1] * 4 * window < data.n:
        strides.append(strides[-1] * 4)
    strides.reverse()  # coarse moves first
    eq = (torch.arange(k + 1, device=data.xs.device) * data.n) // k
    starts = [
        _dp_bounds(data, _coarse_edges(data, bins), k),
        eq.unsqueeze(0).expand(data.c, -1).contiguous(),
    ]
    best = None
    for b in starts:
        b = data.lloyd(b, iters)
        cost = data.cost(b)
        active = torch.arange(data.c, device=b.device)
        for _ in range(kicks):
            improved = torch.zeros(data.c, dtype=torch.bool, device=b.device)
            sub = data if active.numel() == data.c else data.subset(active)
            for stride in strides:
                kb = sub.lloyd(_window_dp_bounds(sub, b[active], window, stride), iters)
                kc = sub.cost(kb)
                better = kc < cost[active] - 1e-12 * (1.0 + cost[active].abs())
                rows = active[better]
                b[rows] = kb[better]
                cost[rows] = kc[better]
                improved[rows] = True
            if not bool(improved.any()):
                break
            active = torch.nonzero(improved).flatten()
        cent = torch.sort(data.means(b), dim=1).values
        cost = torch.minimum(cost, data.cost(data.assign(cent)))
        best = cost if best is None else torch.minimum(best, cost)
    return best


def batched_kmeans_1d(
    values: Tensor,
    num_clusters: int,
    iters: int = 50,
    bins: int = 64,
    window: int = 32,
    max_kicks: int = 4,
) -> Tensor:
    """1-D k-means on many independent series at once (batched over series, no Python loop).

    Args:
        values: ``[n, c]``: ``c`` independent series (columns) of ``n`` points each.
        num_clusters: ``K >= 1``. ``K == 1`` gives ``n * variance``; ``K >= n`` gives 0.
        iters: maximum Lloyd iterations per refinement (stops early once no assignment
            changes).
        bins: about how many candidate boundaries the coarse start considers.
        window: half-width (in points) of the joint boundary moves.
        max_kicks: maximum rounds of joint boundary moves.

    Returns:
        float64 ``[c]``: the k-means inertia (sum of squared distances to the assigned
        centroid) of each column.

    Why not plain Lloyd: it stalls in local optima even in 1-D. Measured against an exact
    ``O(K n^2)`` dynamic programme: quantile-initialised Lloyd ends up to ~10% above the
    optimum on discrete or multi-modal data, and sklearn's ``KMeans(n_init=10)`` up to 8.5%
    (discrete data, K=3) and ~1% on uniform data (K=5). So:

    1. each column is sorted and centred; a clustering is a partition into K contiguous
       segments (the optimum and every Lloyd fixed point are), with O(1) segment costs from
       float64 prefix sums;
    2. two starts: the exact optimum over ~``bins`` candidate boundaries (equal-width and
       equal-count edges; a batched ``O(K bins^2)`` dynamic programme), and K equal-count
       segments; each goes through 3 and 4, the lower inertia wins;
    3. Lloyd steps (centroid midpoints + ``searchsorted``: ``O(K log n)`` per column);
    4. kicks: the exact best joint move of all boundaries by ``stride * j``, ``|j| <=
       window`` (a batched ``O(K window^2)`` chain dynamic programme), for strides
       ``..., 16, 4, 1`` (coarse first, up to about ``n / 4``), each followed by Lloyd;
       repeated on the columns that improved, at most ``max_kicks`` rounds.

    Never worse than its starts. Measured against the exact programme on uniform, normal,
    multi-modal, discrete, heavy-tailed and rank-like data (n = 240..2000, K = 2..5): exact
    to rounding on all but ~0.6% of columns, which sit in a distant local optimum at most
    ~0.5% above; never meaningfully above sklearn, often below. Empty clusters are zero-length
    segments and only survive when fewer than K distinct values exist. Work is chunked over
    columns so each working tensor stays within a few times 2**24 elements.
    """
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    if bins < 2 or window < 1:
        raise ValueError(f"bins must be >= 2 and window >= 1, got {bins}, {window}")
    n, c = values.shape
    out = torch.zeros(c, dtype=torch.float64, device=values.device)
    if n == 0 or c == 0:
        return out
    k = min(num_clusters, n)
    w2 = (2 * window + 1) ** 2
    step = max(1, _CHUNK_ELEMS // (4 * max(n + 1, bins * bins, w2)))
    for s in range(0, c, step):
        xs = values[:, s : s + step].t().to(torch.float64)
        xs = torch.sort(xs, dim=1).values
        xs = (xs - xs.mean(dim=1, keepdim=True)).contiguous()
        if k == 1:
            out[s : s + step] = xs.pow(2).sum(dim=1)
        else:
            out[s : s + step] = _kmeans_sorted(_Sorted1D(xs), k, iters, bins, window, max_kicks)
    return out


def text_instability_score(
    text_rows: Tensor,
    num_clusters: int = 3,
    exclude: Tensor | Sequence[int] | None = None,
    iters: int = 50,
) -> Tensor:
    """MOCD text score: within-cluster variance of each channel's per-token percentile rank.

    For every text token (row) each channel's percentile rank of ``|x|`` is computed over the
    channels not in ``exclude`` (``rank / (d_eff - 1)`` in [0, 1]); each channel's rank
    sequence over the tokens is clustered with 1-D k-means (``num_clusters`` clusters, batched
    over channels, :func:`batched_kmeans_1d`) and scored by inertia / ``n``. Larger = less
    stable relative response = more of a text outlier channel.

    What it rewards (measured in ``tests/test_mocd.py``): a rank sequence spread over many
    levels, e.g. a channel whose magnitude varies over orders of magnitude between tokens,
    against background channels with persistent relative magnitudes. A channel that switches
    between two tight rank levels (on/off) is perfectly clusterable, so with ``K >= 2`` it
    scores near zero; only ``K = 1`` (rank variance) ranks it high. On a background of i.i.d.
    channels every rank sequence is near-uniform and the score separates little.

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
        ex = torch.as_tensor(exclude, device=dev)
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
    counts: tuple[int, int] | None = None,
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
        counts: ``(k_v, k_t)`` to select instead of the ratios' ``ceil(ratio * d)`` (the
            aligned counts of :func:`splitq_modifier.layout.plan_site`).

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
    k_v, k_t = (math.ceil(vr * d), math.ceil(tr * d)) if counts is None else map(int, counts)
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
