"""MOCD: modality-specific outlier channel decoupling (paper section 4.2).

Plain torch (and NumPy) functions plus a small reducible statistics accumulator; nothing here
imports llm-compressor. For one activation site of width ``d``:

1. :class:`ChannelStats` accumulates, over calibration batches, per-channel max and sum of
   ``|x|`` per modality, token counts, and a bounded, deterministic sample of text-token rows;
   it is reducible across data-parallel ranks (:meth:`ChannelStats.all_reduce`).
2. :func:`select_channels` turns them into three disjoint, sorted index sets
   ``(vision_idx, text_idx, main_idx)`` under one of :data:`SELECTION_RULES`.

MOCD (rule ``"mocd"``): vision path = top-``k_v`` channels by max ``|x|`` over vision tokens;
text path = among the others, top-``k_t`` by :func:`text_instability_score` (per text token the
percentile rank of each channel's ``|x|``; per channel a 1-D k-means with ``K`` clusters over its
rank sequence; score = inertia / tokens); main path = the rest. The choices made, the k-means
and its measured accuracy and speed are described in ``docs/design.md`` (section MOCD).
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
    "text_error_greedy",
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
    "mocd_error",
)

# Bound on the elements of one working tensor (token chunks of the rank sort, column chunks of
# the k-means): 2**24 elements is 128 MiB in 8-byte types.
_CHUNK_ELEMS = 1 << 24


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic), a well-mixed hash."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _sample_keys(seed: int, stream: int, start: int, count: int) -> Tensor:
    """Non-negative int64 keys of tokens ``start .. start+count-1`` of a stream (a rank).

    A key depends only on ``(seed, stream, token index)``, never on the batching, so keeping
    the smallest keys is a uniform sample without replacement that merges exactly across
    batches and ranks ("bottom-k" sampling).
    """
    idx = np.arange(start, start + count, dtype=np.uint64)
    salt = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    salt = _splitmix64(salt ^ np.uint64(stream & 0xFFFFFFFF))
    return torch.from_numpy((_splitmix64(idx ^ salt[0]) >> np.uint64(1)).astype(np.int64))


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class ChannelStats:
    """Per-channel activation statistics of one activation site, split by modality.

    Accumulated with :meth:`update`: ``vision_max`` / ``text_max`` (running max of ``|x|``,
    float32, on the device of the first batch, zeros while a modality is unseen),
    ``vision_abs_sum`` / ``text_abs_sum`` (sums of ``|x|``, float64) with the token counts, and
    ``text_rows``: at most ``max_text_tokens`` text-token rows (float32, CPU) for the text
    score. The rows kept are those with the smallest keys of :func:`_sample_keys` (seeded by
    ``(seed, rank, index in this rank's text stream)``), ordered by key: a uniform sample that
    is the same for any batching and merges exactly across ranks. Tokens in neither mask
    (padding) are ignored; a token in both masks is an error.

    Data parallel: :meth:`all_reduce` (maxima with MAX, sums and counts with SUM, text rows
    gathered and cut back by key), once, after the last ``update``.
    """

    def __init__(self, dim: int, max_text_tokens: int = 4096, seed: int = 0) -> None:
        """Create an empty accumulator for ``dim`` channels keeping ``max_text_tokens`` rows."""
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if max_text_tokens < 1:
            raise ValueError(f"max_text_tokens must be >= 1, got {max_text_tokens}")
        self.dim, self.max_text_tokens, self.seed = int(dim), int(max_text_tokens), int(seed)
        self.vision_max = torch.zeros(self.dim)
        self.text_max = torch.zeros(self.dim)
        self.vision_abs_sum = torch.zeros(self.dim, dtype=torch.float64)
        self.text_abs_sum = torch.zeros(self.dim, dtype=torch.float64)
        self.num_vision_tokens = 0
        self.num_text_tokens = 0
        self.text_rows = torch.zeros(0, self.dim)
        self.text_keys = torch.zeros(0, dtype=torch.int64)
        self._seen = False
        self._reduced = False

    @property
    def multi_mean(self) -> Tensor:
        """Per-channel mean ``|x|`` over all vision and text tokens (zeros if none), float32."""
        total = max(self.num_vision_tokens + self.num_text_tokens, 1)
        return ((self.vision_abs_sum + self.text_abs_sum) / total).float()

    @property
    def multi_max(self) -> Tensor:
        """Per-channel max ``|x|`` over vision and text tokens, float32."""
        return torch.maximum(self.vision_max, self.text_max)

    @torch.no_grad()
    def update(self, x: Tensor, vision_mask: Tensor, text_mask: Tensor) -> None:
        """Add one batch: ``x`` ``[..., d]`` (any float dtype and device) and bool masks of
        its leading shape marking vision (image/video) and text tokens.

        Raises:
            ValueError: on a shape mismatch, or a token marked as both vision and text.
            RuntimeError: after :meth:`all_reduce` (the statistics are then global).
        """
        if self._reduced:
            raise RuntimeError("ChannelStats.update() after all_reduce(); create a new one")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x has {x.shape[-1]} channels, ChannelStats expects {self.dim}")
        for name, m in (("vision_mask", vision_mask), ("text_mask", text_mask)):
            if tuple(m.shape) != tuple(x.shape[:-1]):
                raise ValueError(f"{name} has shape {tuple(m.shape)}, expected {x.shape[:-1]}")
        xs = x.detach().reshape(-1, self.dim)
        vm = vision_mask.reshape(-1).to(device=xs.device, dtype=torch.bool)
        tm = text_mask.reshape(-1).to(device=xs.device, dtype=torch.bool)
        if bool((vm & tm).any()):
            raise ValueError("a token is marked as both vision and text")
        if not self._seen:  # statistics live on the device of the first batch
            for name in ("vision_max", "text_max", "vision_abs_sum", "text_abs_sum"):
                setattr(self, name, getattr(self, name).to(xs.device))
            self._seen = True
        dev = self.vision_max.device
        # out of place throughout: safe when the tensors were made under torch.inference_mode
        av = xs[vm].abs()
        if av.shape[0] > 0:
            self.vision_max = torch.maximum(self.vision_max, av.amax(0).float().to(dev))
            self.vision_abs_sum = self.vision_abs_sum + av.sum(0, dtype=torch.float64).to(dev)
            self.num_vision_tokens += int(av.shape[0])
        xt = xs[tm]
        n_t = int(xt.shape[0])
        if n_t > 0:
            at = xt.abs()
            self.text_max = torch.maximum(self.text_max, at.amax(0).float().to(dev))
            self.text_abs_sum = self.text_abs_sum + at.sum(0, dtype=torch.float64).to(dev)
            rank = torch.distributed.get_rank() if _dist_ready() else 0
            keys = _sample_keys(self.seed, rank, self.num_text_tokens, n_t)
            self.num_text_tokens += n_t
            if n_t > self.max_text_tokens:  # only the batch's smallest keys can make the cut
                keep = torch.sort(keys, stable=True).indices[: self.max_text_tokens]
                xt, keys = xt[keep.to(xt.device)], keys[keep]
            self._keep_smallest(
                torch.cat([self.text_rows, xt.float().cpu()]), torch.cat([self.text_keys, keys])
            )

    def _keep_smallest(self, rows: Tensor, keys: Tensor) -> None:
        """Keep the ``max_text_tokens`` rows with the smallest keys, ordered by key."""
        order = torch.sort(keys, stable=True).indices[: self.max_text_tokens]
        self.text_rows, self.text_keys = rows[order].contiguous(), keys[order].contiguous()

    @torch.no_grad()
    def all_reduce(self) -> None:
        """Reduce the statistics over all ranks of the default process group, in place.

        A no-op when ``torch.distributed`` is not initialised or when already reduced. NCCL
        groups reduce on the current CUDA device, others (gloo) on CPU; the tensors return to
        their device. The text rows are gathered with ``all_gather_object`` and cut back to
        ``max_text_tokens`` by smallest key (keys differ between ranks), the same on every rank.
        """
        if self._reduced or not _dist_ready():
            return
        dist = torch.distributed
        nccl = "nccl" in str(dist.get_backend()).lower()
        comm = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        home = self.vision_max.device
        maxima = torch.stack([self.vision_max, self.text_max]).to(comm)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        counts = torch.tensor([self.num_vision_tokens, self.num_text_tokens], dtype=torch.float64)
        sums = torch.cat([self.vision_abs_sum.cpu(), self.text_abs_sum.cpu(), counts]).to(comm)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        maxima, sums = maxima.to(home), sums.to(home)
        d = self.dim
        self.vision_max, self.text_max = maxima[0].clone(), maxima[1].clone()
        self.vision_abs_sum, self.text_abs_sum = sums[:d].clone(), sums[d : 2 * d].clone()
        self.num_vision_tokens = int(round(float(sums[2 * d])))
        self.num_text_tokens = int(round(float(sums[2 * d + 1])))
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self.text_rows, self.text_keys))
        self._keep_smallest(
            torch.cat([g[0].cpu().float() for g in gathered]),
            torch.cat([g[1].cpu() for g in gathered]),
        )
        self._reduced = True


# ---------------------------------------------------------------------------------------------
# Text instability score
# ---------------------------------------------------------------------------------------------


def _sort_rows(t: Tensor) -> Tensor:
    """``t`` ``[r, m]`` sorted ascending along dim 1 (NaN last). On CPU through NumPy, whose
    SIMD sort is far faster than ``torch.sort`` there (measured 7-20x on this project's box);
    elsewhere ``torch.sort``."""
    if t.device.type != "cpu":
        return torch.sort(t, dim=1).values
    a = t.detach().contiguous()
    if a.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds it exactly
        a = a.float()
    return torch.from_numpy(np.sort(a.numpy(), axis=1))


def percentile_ranks(rows: Tensor) -> Tensor:
    """Per-row percentile rank of ``|x|``: float32 ``rank / (d - 1)`` in [0, 1] for ``rows``
    ``[n, d]``. Ordinal ranks: ties as a stable sort orders them (lower column lower), NaN
    above everything; ``d == 1`` gives 0.

    The order comes from one plain sort of distinct int64 keys ``(bits of |x| as float32) << s
    | column`` (a non-negative float's bit pattern orders like its value), i.e. exactly the
    stable order without a stable argsort.
    """
    n, d = rows.shape
    dev = rows.device
    out = torch.empty(n, d, dtype=torch.float32, device=dev)
    ar = torch.arange(d, device=dev, dtype=torch.float32).div_(float(max(d - 1, 1)))
    shift = max(d - 1, 1).bit_length()
    col = torch.arange(d, device=dev, dtype=torch.int64)
    step = max(1, _CHUNK_ELEMS // max(d, 1))
    for s in range(0, n, step):
        keys = rows[s : s + step].float().contiguous().view(torch.int32).to(torch.int64)
        keys.bitwise_and_(0x7FFFFFFF).bitwise_left_shift_(shift).bitwise_or_(col)  # |x| bits
        order = _sort_rows(keys).to(dev).bitwise_and_((1 << shift) - 1)
        out[s : s + step].scatter_(1, order, ar.expand(keys.shape[0], d))
    return out


def _kmeans_sorted(xs: Tensor, k: int, grid: int, iters: int) -> Tensor:
    """Inertia ``[m]`` of a K-means of each row of ``xs`` ``[m, n]`` (float64, sorted per row,
    shifted to its median; ``2 <= k < n``). See :func:`batched_kmeans_1d`."""
    m, n = xs.shape
    dt, dev = torch.float64, xs.device
    p1 = torch.empty(m, n + 1, dtype=dt, device=dev)  # p1[:, b] = sum of the b smallest points
    p1[:, 0] = 0
    torch.cumsum(xs, dim=1, out=p1[:, 1:])
    # candidate boundaries: every (n / grid)-th point and the edges of grid equal-width bins
    lo, hi = xs[:, :1], xs[:, -1:]
    edges = lo + (hi - lo) * torch.arange(1, grid, dtype=xs.dtype, device=dev) / grid
    quant = torch.linspace(0, n, grid + 1, device=dev).round().long().expand(m, -1)
    cand = torch.sort(torch.cat([quant, torch.searchsorted(xs, edges)], 1), dim=1).values
    # exact DP over those boundaries, maximising the between-cluster sum of S_j^2 / n_j
    cnt = (cand[:, None, :] - cand[:, :, None]).to(dt)  # [m, a, b]: size of [a, b)
    s = p1.gather(1, cand)
    s = s[:, None, :] - s[:, :, None]
    between = (s * s / cnt.clamp_min(1)).masked_fill_(cnt < 0, float("-inf"))
    best, args = between[:, 0], []
    for _ in range(k - 1):
        best, arg = (best[:, :, None] + between).max(dim=1)
        args.append(arg)
    bounds = [torch.full((m, 1), cand.shape[1] - 1, dtype=torch.long, device=dev)]
    for arg in reversed(args):
        bounds.append(arg.gather(1, bounds[-1]))
    bounds.append(torch.zeros_like(bounds[0]))
    pos = cand.gather(1, torch.cat(bounds[::-1], 1))  # [m, k + 1]: 0 = b_0 <= ... <= b_k = n
    # Lloyd from there: centroids from prefix sums, boundaries at their midpoints; stops early
    # once no boundary moves (an empty cluster keeps its centroid)
    cent = xs.gather(1, pos[:, :-1].clamp(max=n - 1))
    for _ in range(iters + 1):
        seg = p1.gather(1, pos[:, 1:]) - p1.gather(1, pos[:, :-1])
        num = (pos[:, 1:] - pos[:, :-1]).to(dt)
        cent = torch.where(num > 0, seg / num.clamp_min(1), cent)
        mids = (cent[:, 1:] + cent[:, :-1]) / 2
        new = torch.cat([pos[:, :1], torch.searchsorted(xs, mids), pos[:, -1:]], 1)
        if torch.equal(new, pos):
            break
        pos = new
    seg = p1.gather(1, pos[:, 1:]) - p1.gather(1, pos[:, :-1])
    num = (pos[:, 1:] - pos[:, :-1]).to(dt)
    tot = torch.linalg.vector_norm(xs, dim=1).square()
    return (tot - (seg * seg / num.clamp_min(1)).sum(1)).clamp_min(0)


def batched_kmeans_1d(values: Tensor, num_clusters: int, grid: int = 16, iters: int = 30) -> Tensor:
    """1-D k-means inertia of every column of ``values`` ``[n, c]`` at once (no loop over
    columns): float64 ``[c]``, the sum of squared distances to the assigned centroid.

    Per column, on its sorted points with prefix sums (a clustering of sorted 1-D data is a
    partition into contiguous segments; a segment's sum is two prefix-sum lookups): an exact
    dynamic programme over a coarse set of candidate boundaries (every ``n / grid``-th point
    and the edges of ``grid`` equal-width bins of the column's range) picks the start, then
    at most ``iters`` Lloyd steps (boundaries at centroid midpoints by ``searchsorted``). The
    result is the inertia of an actual partition, so never below the optimum; how far above
    it was measured against an exact solver and scikit-learn (``docs/design.md``, MOCD).
    ``K == 1`` gives ``n * variance``, ``K >= n`` gives 0. Plain torch ops (plus NumPy's sort
    on CPU), so it runs unchanged on CUDA.
    """
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    n, c = values.shape
    out = torch.zeros(c, dtype=torch.float64, device=values.device)
    k = min(num_clusters, n)
    if n == 0 or c == 0 or k == n:
        return out
    vt = values.t().contiguous()  # one transpose: much faster than one per chunk
    step = max(1, (_CHUNK_ELEMS // 16) // (n + 1))  # 256 columns at n = 4096: cache-sized
    for s in range(0, c, step):
        xs = _sort_rows(vt[s : s + step]).to(device=values.device, dtype=torch.float64)
        xs -= xs[:, n // 2 : n // 2 + 1].clone()  # at the median: no cancellation in the sums
        if k == 1:
            out[s : s + step] = xs.var(dim=1, unbiased=False) * n
        else:
            out[s : s + step] = _kmeans_sorted(xs, k, grid, iters)
    return out


def _keep_mask(d: int, exclude: Tensor | Sequence[int] | None, dev: torch.device) -> Tensor:
    """Bool ``[d]``: True where a channel is not in ``exclude`` (indices or a bool mask)."""
    keep = torch.ones(d, dtype=torch.bool, device=dev)
    if exclude is not None:
        ex = torch.as_tensor(exclude, device=dev)
        if ex.dtype == torch.bool:
            if ex.shape != (d,):
                raise ValueError(f"bool exclude mask must have shape ({d},)")
            keep &= ~ex
        elif ex.numel() > 0:
            keep[ex.long()] = False
    return keep


def text_instability_score(
    text_rows: Tensor,
    num_clusters: int = 3,
    exclude: Tensor | Sequence[int] | None = None,
) -> Tensor:
    """MOCD text score: within-cluster variance of each channel's per-token percentile rank.

    Per text token (row), each channel's percentile rank of ``|x|`` over the channels not in
    ``exclude`` (:func:`percentile_ranks`); per channel, 1-D k-means with ``num_clusters``
    clusters over its rank sequence (:func:`batched_kmeans_1d`); score = inertia / ``n``.
    Larger = less stable relative response. A channel whose rank is spread over many levels
    scores high; one that keeps its place (also one that is always the largest) scores near 0;
    one switching between two tight levels scores near 0 for ``K >= 2`` and high for ``K = 1``.

    Args:
        text_rows: ``[n, d]`` text-token activations (computed on their device).
        num_clusters: ``K`` (paper: 1, 3, 5; default 3). ``K = 1`` is the rank variance.
        exclude: indices (or a bool mask of length ``d``) of channels left out of the ranking.

    Returns:
        float32 ``[d]``; excluded channels score ``-inf``. Never NaN: ``n <= K`` (with
        ``K > 1``) falls back to ``K = 1`` with a warning, ``n == 0`` gives zeros (warned).
    """
    if text_rows.dim() != 2:
        raise ValueError(f"text_rows must be [n, d], got shape {tuple(text_rows.shape)}")
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    n, d = text_rows.shape
    dev = text_rows.device
    keep = _keep_mask(d, exclude, dev)
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
    ranks = percentile_ranks(text_rows if kept.numel() == d else text_rows[:, kept])
    score[kept] = torch.nan_to_num((batched_kmeans_1d(ranks, k) / n).float(), nan=0.0)
    return score


def text_error_greedy(
    text_rows: Tensor, k: int, exclude: Tensor | Sequence[int] | None = None
) -> Tensor:
    """Text channels chosen greedily to minimise the main path's per-token quantization error.

    A per-token quantizer's step on token ``n`` is set by the largest ``|x|`` left on the
    path, so its rounding noise relative to the token is ``~ max_j x_nj^2 / ||x_n||^2``. Over
    the text tokens, each step removes from the candidates (channels not in ``exclude``) the
    channel with the largest drop of ``sum_n max_j x_nj^2 / ||x_n||^2``: the tokens where it is
    the largest, weighted by the gap to their next largest. That catches a channel that is
    large on every token (a persistent outlier, whose rank never moves, which
    :func:`text_instability_score` misses) and one that is huge on some tokens only (an
    unstable relative response, MOCD's case); one that moves around below the top of every
    token costs a per-token quantizer nothing and is not taken. Only each token's ``k + 1``
    largest candidates matter, so a step costs ``O(n + d)`` plus the tokens it changes.
    Ties go to the lower index; once no channel lowers the error (every token's top value is
    tied), the rest follow by max ``|x|``.

    Args:
        text_rows: ``[n, d]`` text-token activations.
        k: number of channels to choose (at most the number of candidates).
        exclude: indices (or a bool mask of length ``d``) of channels not to choose (MOCD
            passes the vision path's); they still count in ``||x_n||``.

    Returns:
        int64 ``[min(k, candidates)]`` channel indices in the order chosen (on CPU).
    """
    x = text_rows.detach().float().cpu()
    n, d = x.shape
    alive = _keep_mask(d, exclude, torch.device("cpu"))
    k = min(int(k), int(alive.sum()))
    chosen: list[int] = []
    if k <= 0 or n == 0:
        return torch.tensor(chosen, dtype=torch.long)
    sq = x.square()
    weight = 1.0 / sq.sum(1).clamp_min(torch.finfo(torch.float32).tiny)
    sq[:, ~alive] = -1.0
    top = sq.topk(min(k + 1, d), dim=1)  # k removals leave one
    idx, val = top.indices, top.values.clamp_min(0)
    rows = torch.arange(n)

    def first_two(r: Tensor) -> tuple[Tensor, Tensor]:
        live = alive[idx[r]].long().cumsum(1)
        return (live < 1).sum(1), (live < 2).sum(1).clamp(max=idx.shape[1] - 1)

    p1, p2 = first_two(rows)
    for _ in range(k):
        top1 = idx[rows, p1]
        gain = torch.zeros(d).index_add_(0, top1, weight * (val[rows, p1] - val[rows, p2]))
        gain = gain.masked_fill_(~alive, -1.0)
        j = int(gain.argmax())
        if gain[j] <= 0:  # nothing left to gain: the largest remaining by max |x|
            rest = sq.amax(0).masked_fill_(~alive, -1.0)
            chosen += (
                torch.sort(rest, descending=True, stable=True).indices[: k - len(chosen)].tolist()
            )
            break
        chosen.append(j)
        alive[j] = False
        hit = torch.nonzero((top1 == j) | (idx[rows, p2] == j)).flatten()
        p1[hit], p2[hit] = first_two(hit)
    return torch.tensor(chosen, dtype=torch.long)


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

    ``k_v = ceil(vision_ratio * d)``, ``k_t = ceil(text_ratio * d)`` (or ``counts``).

    Rules (``"mocd"`` is the method; the others are the paper's ablation baselines, which still
    fill both outlier paths, so the split keeps its shape):

    - ``"mocd"``: vision = top-``k_v`` by vision max ``|x|``; text = top-``k_t`` by
      :func:`text_instability_score` over the remaining channels.
    - ``"none"``: both outlier paths empty.
    - ``"random"``: random disjoint channels, ``torch.Generator`` seeded with ``seed``.
    - ``"text_max"``: text = top-``k_t`` by text max ``|x|``, vision = the next ``k_v``.
    - ``"vision_max"``: vision = top-``k_v`` by vision max ``|x|``, text = the next ``k_t``.
    - ``"multi_max"``: by max ``|x|`` over both modalities: vision = top-``k_v``, text = the
      next ``k_t``.
    - ``"multi_mean"``: the same with mean ``|x|`` over all vision and text tokens.
    - ``"mocd_error"``: vision as ``"mocd"``; text = :func:`text_error_greedy` over the
      remaining channels (the channels that most lower the main path's per-token quantization
      error on text tokens: persistent and token-varying outliers alike).

    Missing modality (warned), for every rule but ``"none"`` and ``"random"``: no vision tokens
    -> ``k_v = 0``; no text tokens -> ``k_t = 0``; a single-modality rule whose modality is
    missing selects nothing.

    Args:
        stats: accumulated (and, under data parallelism, all-reduced) statistics.
        rule: one of :data:`SELECTION_RULES`.
        vision_ratio: fraction of channels for the vision path, in [0, 0.5].
        text_ratio: fraction of channels for the text path, in [0, 0.5].
        num_clusters: ``K`` of the MOCD text score.
        seed: seed of the ``"random"`` rule.
        device: where to compute the text score (default: CPU, where the rows live).
        counts: ``(k_v, k_t)`` instead of the ratios' ``ceil(ratio * d)`` (the aligned counts
            of :func:`splitq_modifier.layout.plan_site`).

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

    vis = txt = torch.zeros(0, dtype=torch.long)
    if rule == "random":
        perm = torch.randperm(d, generator=torch.Generator().manual_seed(int(seed)))
        vis, txt = perm[:k_v], perm[k_v : k_v + k_t]
    elif rule != "none":
        has_v, has_t = stats.num_vision_tokens > 0, stats.num_text_tokens > 0
        if not has_v and k_v > 0:
            logger.warning(f"select_channels({rule!r}): no vision tokens seen; vision path empty")
            k_v = 0
        if not has_t and k_t > 0:
            logger.warning(f"select_channels({rule!r}): no text tokens seen; text path empty")
            k_t = 0
        vision_max = stats.vision_max.detach().float().cpu()
        text_max = stats.text_max.detach().float().cpu()
        if rule in ("mocd", "mocd_error"):
            vis = _descending(vision_max)[:k_v]
            rows = stats.text_rows if device is None else stats.text_rows.to(device)
            if k_t > 0 and rule == "mocd":
                score = text_instability_score(rows, num_clusters, exclude=vis)
                txt = _descending(score.cpu())[:k_t]
            elif k_t > 0:
                txt = text_error_greedy(rows, k_t, exclude=vis)
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
    return vis, txt, torch.nonzero(~used).flatten()


def jaccard(a: Tensor | Sequence[int], b: Tensor | Sequence[int]) -> float:
    """Jaccard similarity ``|A & B| / |A | B|`` of two index sets (1.0 if both are empty)."""
    sa = set(torch.as_tensor(a).flatten().tolist())
    sb = set(torch.as_tensor(b).flatten().tolist())
    union = sa | sb
    return len(sa & sb) / len(union) if union else 1.0
