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

import functools
import itertools
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


def _sort_rows(t: Tensor) -> Tensor:
    """The values of ``t`` ``[r, m]`` sorted ascending along dim 1 (NaN last).

    On CPU through NumPy's sort: the same values (a sort has one result), and its SIMD
    quicksort is far faster than ``torch.sort`` on CPU (measured on this project's 2-core
    AVX-512 box, one thread: 1024 x 4096 float32 rows 0.014 s vs 0.33 s; 512 x 18944 int64
    rows 0.15 s vs 0.71 s). Elsewhere (CUDA) ``torch.sort``.
    """
    if t.device.type != "cpu":
        return torch.sort(t, dim=1).values
    a = t.detach().contiguous()
    if a.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds it exactly
        a = a.float()
    return torch.from_numpy(np.sort(a.numpy(), axis=1))


def percentile_ranks(rows: Tensor) -> Tensor:
    """Per-row percentile rank of ``|x|``: ``rank / (d - 1)`` in [0, 1].

    Args:
        rows: ``[n, d]`` activations.

    Returns:
        float32 ``[n, d]``; ordinal ranks (ties: lower column ranks lower, as a stable sort
        orders them; NaN ranks above everything). With ``d == 1`` every rank is 0.

    The order comes from one plain sort of int64 keys ``(bits of |x| as float32) << s |
    column`` (the bit pattern of a non-negative float orders like its value), which makes
    the keys distinct and so gives exactly the stable order without a stable argsort (on CPU
    ~7x faster, see :func:`_sort_rows`).
    """
    n, d = rows.shape
    dev = rows.device
    out = torch.empty(n, d, dtype=torch.float32, device=dev)
    if n == 0:
        return out
    denom = float(max(d - 1, 1))
    ar = torch.arange(d, device=dev, dtype=torch.float32).div_(denom)
    shift = max(d - 1, 1).bit_length()
    col = torch.arange(d, device=dev, dtype=torch.int64)
    step = max(1, _CHUNK_ELEMS // max(d, 1))
    for s in range(0, n, step):
        a = rows[s : s + step].abs().float().contiguous()
        keys = (a.view(torch.int32).to(torch.int64) << shift) | col
        order = _sort_rows(keys).to(dev) & ((1 << shift) - 1)
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
        # prefix sums of x and x^2 side by side ([c, n+1, 2]; p1, p2 are views)
        self.pp = torch.zeros(c, n + 1, 2, dtype=xs.dtype, device=xs.device)
        torch.cumsum(xs, dim=1, out=self.pp[:, 1:, 0])
        torch.cumsum(xs * xs, dim=1, out=self.pp[:, 1:, 1])
        self.p1 = self.pp[..., 0]  # [c, n+1]
        self.p2 = self.pp[..., 1]

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
        """Segment means ``[c, K]``, non-decreasing (segments of sorted data); an empty
        segment takes the value at its position."""
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
        cost = self.cost(bounds)
        for _ in range(iters):
            new = self.assign(self.means(bounds))
            # Accept only where the inertia does not increase (it never should; guards ties).
            new_cost = self.cost(new)
            better = new_cost <= cost
            new = torch.where(better.unsqueeze(1), new, bounds)
            if torch.equal(new, bounds):
                break
            bounds = new
            cost = torch.where(better, new_cost, cost)
        return bounds


def _dp_bounds(data: _Sorted1D, edges: Tensor, k: int) -> Tensor:
    """Optimal K-partition whose boundaries are restricted to candidate positions ``edges``.

    ``edges`` ``[c, E]``: sorted positions into the data, starting with 0 and ending with
    ``n`` (duplicates are harmless: empty segments cost 0). Exact dynamic programme,
    ``O(K E^2)`` per row, batched over rows. It maximises the between-cluster sum of squares
    ``sum_i S_i^2 / n_i`` (the inertia is the fixed total minus it), with the segment terms
    broadcast from the prefix sums at the edges. Returns bounds ``[c, K+1]``.
    """
    c, e = edges.shape
    dev = edges.device
    pe = data.p1.gather(1, edges)
    s1 = pe.unsqueeze(1) - pe.unsqueeze(2)  # [c, a, b]
    cnt = (edges.unsqueeze(1) - edges.unsqueeze(2)).to(pe.dtype)
    between = s1 * s1 / cnt.clamp_min(1)
    upper = torch.ones(e, e, dtype=torch.bool, device=dev).triu()
    between = between.masked_fill(~upper, float("-inf"))  # a <= b only
    best = between[:, 0, :]  # one segment over edges 0..b
    back = []
    for _ in range(k - 2):
        best, arg = (best.unsqueeze(2) + between).max(dim=1)
        back.append(arg)
    cuts = [torch.full((c, 1), e - 1, dtype=torch.long, device=dev)]
    cuts.append((best + between[:, :, e - 1]).argmax(dim=1, keepdim=True))  # last segment
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


@functools.lru_cache(maxsize=32)
def _block_tuples(blocks: int, m: int) -> Tensor:
    """All non-decreasing ``m``-tuples over ``range(blocks)``, int64 ``[T, m]`` (CPU)."""
    rows = list(itertools.combinations_with_replacement(range(blocks), m))
    return torch.tensor(rows, dtype=torch.long).view(-1, m)


@functools.lru_cache(maxsize=8)
def _child_offsets(m: int) -> Tensor:
    """The ``2**m`` halving offsets of an item (see :class:`_Flat`; ``m = K-1``), int64
    ``[2**m, K+2]`` (CPU; 0 in the row and sentinel columns)."""
    rows = [(0, 0, *o, 0) for o in itertools.product((0, 1), repeat=m)]
    return torch.tensor(rows, dtype=torch.long).view(-1, m + 3)


def _interval_gap2(lo: Tensor, hi: Tensor, c_lo: Tensor, c_hi: Tensor) -> Tensor:
    """Squared distance between the intervals ``[lo, hi]`` and ``[c_lo, c_hi]`` (0 if they
    meet; ``c_lo = -inf, c_hi = +inf`` gives 0)."""
    g = torch.maximum(c_lo - hi, lo - c_hi).clamp_min(0)
    return g * g


class _Flat:
    """Flat lookup tables of a :class:`_Sorted1D` for per-item access (``row * width + pos``):
    the prefix sums as ``[c * (n+1), 2]`` (first and second moment side by side, so one
    ``index_select`` fetches both) and the data as ``[c * n]``.

    An *item* is a row of an int64 ``[M, K+2]`` tensor: ``(row, 0, b_1, ..., b_{K-1}, n+1)``,
    block indices of the K-1 inner boundaries between two sentinels that the block
    arithmetic maps to the fixed ends 0 and ``n``.
    """

    def __init__(self, data: _Sorted1D) -> None:
        self.n = data.n
        self.pp = data.pp.view(-1, 2)
        self.xs = data.xs.reshape(-1)

    def _moments(self, rows: Tensor, pos: Tensor) -> Tensor:
        """Prefix sums ``[M, K+1, 2]`` of rows ``rows`` ``[M]`` at positions ``pos``."""
        at = pos + (rows * (self.n + 1)).unsqueeze(1)
        return self.pp.index_select(0, at.reshape(-1)).view(*pos.shape, 2)

    def cost(self, rows: Tensor, pos: Tensor) -> Tensor:
        """Inertia ``[M]`` of the partitions ``pos`` ``[M, K+1]`` (with both ends) of rows
        ``rows``."""
        d = self._moments(rows, pos).diff(dim=1)  # segment sums and sums of squares
        cnt = pos.diff(dim=1).clamp_min(1).to(d.dtype)
        return (d[..., 1] - d[..., 0] * d[..., 0] / cnt).clamp_min(0).sum(dim=1)

    def lower_bound(self, items: Tensor, size: int, inner: Tensor) -> Tensor:
        """Lower bound ``[M]`` on the inertia of every partition of row ``items[:, 0]`` whose
        inner boundary ``i`` lies in ``[b_i * size, b_i * size + size - 1]`` (clipped to
        ``n``). ``inner``: int64 ``[K+1]``, 1 at the inner boundaries, 0 at the ends.

        With ``lo_i``/``hi_i`` the ends of boundary ``i``'s block (``lo_0 = hi_0 = 0``,
        ``lo_K = hi_K = n``), every such partition has

        - the points ``[hi_j, lo_{j+1})`` (the *core* of segment ``j``) in segment ``j``, which
          cost at least their own sum of squares about their own mean;
        - each point of block ``i`` (``[lo_i, hi_i)``) in segment ``i-1`` or ``i``, whose mean
          lies in ``[mean(lo_j, lo_{j+1}), mean(hi_j, hi_{j+1})]`` (the mean of a window of
          sorted data grows with either end), so such a point costs at least the squared
          distance from the block's value range to the nearer of the two mean ranges.

        Where a segment may be empty (overlapping blocks) its mean range is unbounded, which
        only weakens the bound. With ``size == 1`` the bound is the exact inertia.
        """
        n = self.n
        rows = items[:, 0]
        lo = (items[:, 1:] * size).clamp_(max=n)  # [M, K+1]
        if size == 1:
            return self.cost(rows, lo)
        hi = (lo + (size - 1) * inner).clamp_(max=n)
        p_lo, p_hi = self._moments(rows, lo), self._moments(rows, hi)
        cnt = lo[:, 1:] - hi[:, :-1]  # [M, K] core sizes
        sure = cnt > 0  # the segment is certainly not empty
        core = p_lo[:, 1:] - p_hi[:, :-1]
        fcnt = cnt.clamp_min(1).to(core.dtype)
        core = (core[..., 1] - core[..., 0] * core[..., 0] / fcnt).clamp_min(0)
        bound = torch.where(sure, core, 0.0).sum(dim=1)
        inf = float("inf")
        c_lo = p_lo[..., 0].diff(dim=1) / lo.diff(dim=1).clamp_min(1).to(core.dtype)
        c_hi = p_hi[..., 0].diff(dim=1) / hi.diff(dim=1).clamp_min(1).to(core.dtype)
        c_lo = torch.where(sure, c_lo, -inf)
        c_hi = torch.where(sure, c_hi, inf)
        base = (rows * n).unsqueeze(1)
        lo_in, hi_in = lo[:, 1:-1], hi[:, 1:-1]
        x_lo = self.xs.take(lo_in.clamp(max=n - 1).add_(base))
        x_hi = self.xs.take((hi_in - 1).clamp_(0, n - 1).add_(base))
        gap = torch.minimum(
            _interval_gap2(x_lo, x_hi, c_lo[:, :-1], c_hi[:, :-1]),  # segment i-1
            _interval_gap2(x_lo, x_hi, c_lo[:, 1:], c_hi[:, 1:]),  # segment i
        )
        return bound + ((hi_in - lo_in).to(gap.dtype) * gap).sum(dim=1)


def _descend(flat: _Flat, items: Tensor, size: int, best: Tensor, slack: Tensor, cap: int) -> None:
    """Branch and bound from ``items`` (see :class:`_Flat`) at block size ``size`` (a power
    of two) down to size 1, lowering ``best`` ``[c]`` in place.

    An item is kept only while its lower bound is below ``best[row] - slack[row]``; ``best``
    also takes the inertia of the partition at each surviving item's block centres. Items are
    halved into ``2**(K-1)`` children per level. More than ``cap`` items are finished in
    slices (depth first), which bounds the working set.
    """
    n = flat.n
    k = items.shape[1] - 2
    dev = items.device
    inner = torch.ones(k + 1, dtype=items.dtype, device=dev)
    inner[0] = inner[-1] = 0
    mult = torch.cat([inner.new_ones(1), inner + 1])  # children: blocks doubled, rest kept
    mult[-1] = 1
    offsets = _child_offsets(k - 1).to(dev)
    while items.shape[0] > 0:
        if items.shape[0] > cap:
            for s in range(0, items.shape[0], cap):
                _descend(flat, items[s : s + cap], size, best, slack, cap)
            return
        lb = flat.lower_bound(items, size, inner)
        keep = lb < (best - slack)[items[:, 0]]
        items, lb = items[keep], lb[keep]
        if size == 1:  # the bound is the inertia: these partitions beat the best known
            best.scatter_reduce_(0, items[:, 0], lb, "amin")
            return
        if items.shape[0] == 0:
            return
        centres = (items[:, 1:] * size + (size // 2) * inner).clamp_(max=n)
        best.scatter_reduce_(0, items[:, 0], flat.cost(items[:, 0], centres), "amin")
        items = items[lb < (best - slack)[items[:, 0]]]
        size //= 2
        kids = (items * mult).unsqueeze(1) + offsets  # [M, 2**(K-1), K+2]
        inner_b = kids[..., 2:-1]
        ok = (inner_b[..., -1] * size <= n) & (inner_b.diff(dim=-1) >= 0).all(dim=-1)
        items = kids[ok]


def _kmeans_bnb(data: _Sorted1D, k: int, upper: Tensor, tol: float = 1e-12) -> Tensor:
    """Exact minimum inertia ``[c]`` over all K-partitions of each row (``k >= 2``).

    Branch and bound (:func:`_descend`) from all non-decreasing (K-1)-tuples of about
    ``(160 (K-1)!)^(1/(K-1))`` equal blocks of boundary positions (153 tuples of 17 blocks at
    K=3), starting from ``upper`` (the inertia of a known partition per row). Pruning keeps an
    item only if its bound is below the best known inertia by ``tol * (1 + total sum of
    squares)``, so the result is the optimum to within that (and rounding).
    """
    c, n = data.c, data.n
    dev = data.xs.device
    m = k - 1
    top = max(2, int((160 * math.factorial(m)) ** (1.0 / m)))
    size = 1
    while n // size + 1 > top:
        size *= 2
    tuples = _block_tuples(n // size + 1, m).to(dev)
    t = tuples.shape[0]
    items = torch.zeros(c, t, k + 2, dtype=torch.long, device=dev)
    items[:, :, 0] = torch.arange(c, device=dev).unsqueeze(1)
    items[:, :, 2:-1] = tuples
    items[:, :, -1] = n + 1
    best = upper.clone()
    slack = tol * (1.0 + data.p2[:, -1])
    cap = max(1, _CHUNK_ELEMS // (4 * (k + 2) * 2**m))
    _descend(_Flat(data), items.view(-1, k + 2), size, best, slack, cap)
    return best


@functools.lru_cache(maxsize=16)
def _dc_schedule(n: int) -> tuple[tuple[Tensor, Tensor, Tensor], ...]:
    """Breadth-first divide-and-conquer order of the rows ``0..n`` of one DP layer: per level
    ``(rows, left, right)`` with ``left``/``right`` the neighbouring rows already solved,
    shifted by one (0 and ``n + 2`` are sentinels), int64 on CPU."""
    levels = []
    cur = [(0, n, -1, n + 1)]
    while cur:
        rows, left, right, nxt = [], [], [], []
        for lo, hi, lft, rgt in cur:
            mid = (lo + hi) // 2
            rows.append(mid)
            left.append(lft + 1)
            right.append(rgt + 1)
            if lo < mid:
                nxt.append((lo, mid - 1, lft, mid))
            if mid < hi:
                nxt.append((mid + 1, hi, mid, rgt))
        levels.append(tuple(torch.tensor(v, dtype=torch.long) for v in (rows, left, right)))
        cur = nxt
    return tuple(levels)


def _dc_layer(prev: Tensor, p1: Tensor) -> tuple[Tensor, Tensor]:
    """One exact DP layer: ``f[b] = max_{a <= b} prev[a] + (p1[b] - p1[a])^2 / (b - a)`` for
    every ``b`` in ``0..n`` (``prev``, ``p1``: ``[c, n+1]``). Returns ``(f, argmax a)``.

    The maximising ``a`` is non-decreasing in ``b`` (the 1-D k-means cost satisfies the
    quadrangle inequality), so rows are solved in divide-and-conquer order, each searching
    only between the solutions of its solved neighbours: ``O(n log n)`` per row of ``prev``.
    Per level the candidate ranges of all rows lie back to back in one flat ``[c, n + R]``
    tensor and are reduced with ``torch.segment_reduce``.
    """
    c, width = prev.shape
    n = width - 1
    dev = prev.device
    f = torch.empty_like(prev)
    opt = torch.zeros(c, n + 3, dtype=torch.long, device=dev)  # shifted by one, sentinels
    opt[:, -1] = n
    for rows, left, right in _dc_schedule(n):
        rows, left, right = rows.to(dev), left.to(dev), right.to(dev)
        r = rows.numel()
        lo = opt.index_select(1, left)
        hi = torch.minimum(opt.index_select(1, right), rows)  # a <= b
        length = hi - lo + 1  # >= 1
        start = length.cumsum(dim=1) - length
        total = length.sum(dim=1, keepdim=True)  # <= n + r
        width_l = n + r
        node = torch.zeros(c, width_l, dtype=torch.long, device=dev)
        node = node.scatter_(1, start, 1).cumsum_(dim=1).sub_(1)  # range of each position
        p = torch.arange(width_l, device=dev)
        base = lo - start
        a = (p + base.gather(1, node)).clamp_(max=n)
        s = p1.index_select(1, rows).gather(1, node) - p1.gather(1, a)
        cnt = ((rows - base).gather(1, node) - p).clamp_(min=1).to(s.dtype)  # b - a
        v = (s * s).div_(cnt).add_(prev.gather(1, a))
        v.masked_fill_(p >= total, float("-inf"))  # padding after the last range
        lengths = length.clone()
        lengths[:, -1] += width_l - total[:, 0]
        best = torch.segment_reduce(v, "max", lengths=lengths, axis=1)
        first = torch.where(v >= best.gather(1, node), p.to(v.dtype), float(width_l))
        arg = torch.segment_reduce(first, "min", lengths=lengths, axis=1).long()
        f.index_copy_(1, rows, best)
        opt.index_copy_(1, rows + 1, arg + base)
    return f, opt[:, 1:-1]


def _kmeans_dc(data: _Sorted1D, k: int) -> Tensor:
    """Exact minimum inertia ``[c]`` of each row (``k >= 3``) by the dynamic programme over
    the K-1 boundaries, each layer solved by :func:`_dc_layer` (``O((K-2) n log n)``).

    The layers maximise the between-cluster sum of squares; the inertia is then computed
    from the optimal partition's own segments (no cancellation against the total)."""
    n = data.n
    pos = torch.arange(n + 1, dtype=data.xs.dtype, device=data.xs.device)
    p1 = data.p1.contiguous()
    f = p1 * p1 / pos.clamp_min(1)  # one segment [0, b)
    opts = []
    for _ in range(k - 2):
        f, arg = _dc_layer(f, p1)
        opts.append(arg)
    tail = p1[:, -1:] - p1
    last = (f + tail * tail / (n - pos).clamp_min(1)).argmax(dim=1, keepdim=True)
    bounds = [torch.full_like(last, n), last]
    for arg in reversed(opts):
        bounds.append(arg.gather(1, bounds[-1]))
    bounds.append(torch.zeros_like(last))
    return data.cost(torch.cat(bounds[::-1], dim=1))


def _kmeans_exact(data: _Sorted1D, k: int, iters: int, bins: int) -> Tensor:
    """Exact minimum inertia ``[c]`` of each row of ``data`` (``2 <= k <= n``)."""
    if k == 2:  # one boundary: scan all n+1 positions (between-cluster sum of squares)
        pos = torch.arange(data.n + 1, dtype=data.p1.dtype, device=data.p1.device)
        tail = data.p1[:, -1:] - data.p1
        between = data.p1 * data.p1 / pos.clamp_min(1) + tail * tail / (data.n - pos).clamp_min(1)
        b = between.argmax(dim=1, keepdim=True)
        zero = torch.zeros_like(b)
        return data.cost(torch.cat([zero, b, zero + data.n], dim=1))
    if k > 3:  # the branch and bound's item count grows like (choices per boundary)^(K-1)
        return _kmeans_dc(data, k)
    start = data.lloyd(_dp_bounds(data, _coarse_edges(data, bins), k), iters)
    return _kmeans_bnb(data, k, data.cost(start))


def batched_kmeans_1d(
    values: Tensor,
    num_clusters: int,
    iters: int = 50,
    bins: int = 32,
) -> Tensor:
    """Exact 1-D k-means on many independent series at once (batched over series, no Python
    loop over them).

    Args:
        values: ``[n, c]``: ``c`` independent series (columns) of ``n`` points each.
        num_clusters: ``K >= 1``. ``K == 1`` gives ``n * variance``; ``K >= n`` gives 0.
        iters: maximum Lloyd iterations of the starting partition (stops early once no
            assignment changes). Only the speed depends on it.
        bins: about how many candidate boundaries the starting partition considers. Only
            the speed depends on it.

    Returns:
        float64 ``[c]``: the minimum k-means inertia (sum of squared distances to the
        assigned centroid) of each column, exact to rounding (within ``1e-12`` of the
        column's total sum of squares).

    Why not Lloyd (or sklearn's ``KMeans``): they stall in local optima even in 1-D
    (measured against an exact ``O(K n^2)`` dynamic programme: quantile-initialised Lloyd up
    to ~10% above the optimum on discrete or multi-modal data, ``KMeans(n_init=10)`` up to
    8.5%). Algorithm:

    1. each column is sorted (in its own dtype, then float64) and centred; a clustering is a
       partition into K contiguous segments (the optimum and every Lloyd fixed point are),
       with O(1) segment costs from prefix sums;
    2. ``K == 2``: all ``n + 1`` boundaries are scanned (exact, ``O(n)``);
    3. ``K >= 3``: a start, the best partition over ~``bins`` candidate boundaries (a batched
       ``O(K bins^2)`` dynamic programme) refined by Lloyd, gives an upper bound; then an
       exact branch and bound over tuples of boundary blocks, batched over all columns as
       one flat list of (column, blocks) items: each level halves the blocks and drops the
       items whose lower bound (:meth:`_Flat.lower_bound`: core segment costs plus, for the
       points in each block, the distance to the possible centroid ranges) cannot beat the
       column's best partition so far. Block size 1 leaves exact partitions.

    Work: per column about ``1.3e3`` bound evaluations at ``n = 4096``, ``K = 3`` on
    percentile-rank data (an ``O(K n^2)`` programme needs ``3.4e7``, a divide-and-conquer one
    ``~6e4``). The cost grows quickly with K (``2**(K-1)`` children per item); meant for the
    paper's ``K <= 5``. Work is chunked over columns so each working tensor stays within a few
    times 2**24 elements; it runs unchanged on CUDA.
    """
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    n, c = values.shape
    out = torch.zeros(c, dtype=torch.float64, device=values.device)
    if n == 0 or c == 0:
        return out
    k = min(num_clusters, n)
    if k == n:
        return out  # every point its own cluster
    step = max(1, _CHUNK_ELEMS // (4 * max(n + 1, bins * bins)))
    for s in range(0, c, step):
        xs = _sort_rows(values[:, s : s + step].t()).to(device=values.device, dtype=torch.float64)
        xs = (xs - xs.mean(dim=1, keepdim=True)).contiguous()
        if k == 1:
            out[s : s + step] = xs.pow(2).sum(dim=1)
        else:
            out[s : s + step] = _kmeans_exact(_Sorted1D(xs), k, iters, bins)
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
