"""MOCD: modality-specific outlier channel decoupling (paper section 4.2), and its ablations.

Per activation site, :class:`ChannelStats` accumulates reducible per-modality statistics over the
calibration batches and :func:`select_channels` splits the channels into vision, text and main
paths. Torch and NumPy only; the choices and measurements are in ``docs/design.md`` (MOCD).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

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
    "rank_channels",
    "select_channels",
    "text_error_greedy",
    "text_instability_score",
]

#: ``channel_selection`` values: the paper's MOCD, its ablation baselines, and ``mocd_error``
SELECTION_RULES: tuple[str, ...] = tuple(
    "mocd none random text_max vision_max multi_max multi_mean mocd_error".split()
)

# elements of one working tensor (token chunks of the rank sort; the k-means takes 1/16 of it)
_CHUNK_ELEMS = 1 << 24


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic), a well-mixed hash."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _sample_keys(seed: int, stream: int, start: int, count: int) -> Tensor:
    """Non-negative int64 keys of tokens ``start .. start+count-1`` of a stream (a rank): they
    depend on ``(seed, stream, index)`` only, so the smallest keys are a uniform sample that
    merges exactly across batches and ranks ("bottom-k" sampling)."""
    idx = np.arange(start, start + count, dtype=np.uint64)
    salt = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    salt = _splitmix64(salt ^ np.uint64(stream & 0xFFFFFFFF))
    return torch.from_numpy((_splitmix64(idx ^ salt[0]) >> np.uint64(1)).astype(np.int64))


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class ChannelStats:
    """Per-channel activation statistics of one activation site, split by modality.

    :meth:`update` accumulates ``vision_max`` / ``text_max`` (max ``|x|``, float32, on the
    first batch's device), ``vision_abs_sum`` / ``text_abs_sum`` (float64) with the token
    counts, and ``text_rows``: the ``max_text_tokens`` text rows (float32, CPU) with the
    smallest :func:`_sample_keys` (seeded by ``seed``), ordered by key, so the same for any
    batching; likewise ``vision_rows`` (``max_vision_tokens`` of them, none by default: the
    adaptive path widths read them). Tokens in neither mask (padding) are ignored. Data
    parallel: :meth:`all_reduce` once, after the last ``update``.
    """

    def __init__(
        self, dim: int, max_text_tokens: int = 4096, seed: int = 0, max_vision_tokens: int = 0
    ) -> None:
        """Create an empty accumulator for ``dim`` channels keeping ``max_text_tokens`` text
        rows and ``max_vision_tokens`` vision rows."""
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if max_text_tokens < 1:
            raise ValueError(f"max_text_tokens must be >= 1, got {max_text_tokens}")
        self.dim, self.max_text_tokens, self.seed = int(dim), int(max_text_tokens), int(seed)
        self.max_vision_tokens = int(max_vision_tokens)
        self.vision_rows = torch.zeros(0, self.dim)
        self.vision_keys = torch.zeros(0, dtype=torch.int64)
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
        """Add a batch ``x`` ``[..., d]`` with bool masks (its leading shape) of the vision and
        text tokens. ValueError on a shape mismatch or a token in both masks; RuntimeError
        after :meth:`all_reduce`."""
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
        xv = xs[vm]
        av = xv.abs()
        if av.shape[0] > 0:
            self.vision_max = torch.maximum(self.vision_max, av.amax(0).float().to(dev))
            self.vision_abs_sum = self.vision_abs_sum + av.sum(0, dtype=torch.float64).to(dev)
            if self.max_vision_tokens:
                rank = torch.distributed.get_rank() if _dist_ready() else 0
                keys = _sample_keys(self.seed, rank + (1 << 20), self.num_vision_tokens, len(xv))
                self._keep("vision", xv, keys)
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
            self._keep("text", xt, keys)

    def _keep(self, kind: str, rows: Tensor, keys: Tensor) -> None:
        """Merge ``rows`` into the ``kind`` ("text" or "vision") sample: keep the rows with the
        smallest keys (at most ``max_{kind}_tokens``), ordered by key."""
        cap = getattr(self, f"max_{kind}_tokens")
        if rows.shape[0] > cap:  # only the batch's smallest keys can make the cut
            keep = torch.sort(keys, stable=True).indices[:cap]
            rows, keys = rows[keep.to(rows.device)], keys[keep]
        self._keep_smallest(
            kind,
            torch.cat([getattr(self, f"{kind}_rows"), rows.float().cpu()]),
            torch.cat([getattr(self, f"{kind}_keys"), keys]),
        )

    def _keep_smallest(self, kind: str, rows: Tensor, keys: Tensor) -> None:
        """Keep the ``max_{kind}_tokens`` rows with the smallest keys, ordered by key."""
        order = torch.sort(keys, stable=True).indices[: getattr(self, f"max_{kind}_tokens")]
        setattr(self, f"{kind}_rows", rows[order].contiguous())
        setattr(self, f"{kind}_keys", keys[order].contiguous())

    @torch.no_grad()
    def all_reduce(self) -> None:
        """Reduce over the ranks of the default process group, in place (a no-op without one, or
        once reduced): maxima with MAX, sums and counts with SUM (on the current CUDA device
        under NCCL, else on CPU), text rows gathered and cut back by key, alike on every rank."""
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
        samples = (self.text_rows, self.text_keys, self.vision_rows, self.vision_keys)
        dist.all_gather_object(gathered, samples)
        for kind, i in (("text", 0), ("vision", 2)):
            self._keep_smallest(
                kind,
                torch.cat([g[i].cpu().float() for g in gathered]),
                torch.cat([g[i + 1].cpu() for g in gathered]),
            )
        self._reduced = True


def _sort_rows(t: Tensor) -> Tensor:
    """``t`` ``[r, m]`` sorted along dim 1 (NaN last); on CPU by NumPy (7-20x faster there)."""
    if t.device.type != "cpu":
        return torch.sort(t, dim=1).values
    a = t.detach().contiguous()
    if a.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds it exactly
        a = a.float()
    return torch.from_numpy(np.sort(a.numpy(), axis=1))


def percentile_ranks(rows: Tensor) -> Tensor:
    """Per-row percentile rank of ``|x|``: float32 ``rank / (d - 1)`` in [0, 1] for ``rows``
    ``[n, d]``; ties ordered as a stable sort orders them, NaN above everything. One plain sort
    of distinct int64 keys ``bits(|x|) << s | column`` (a non-negative float's bits order like
    its value) gives exactly that order without a stable argsort."""
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


@contextlib.contextmanager
def _serial(dev: torch.device) -> Iterator[None]:
    """One intra-op thread (on CPU) for loops of small ops: with more, every op opens a parallel
    region whose spin-waits cost far more than the op on a busy machine (measured: the k-means
    at d = 18944 took 24 s at 2 threads instead of 1.5 s, mostly in ``searchsorted``)."""
    threads = torch.get_num_threads()
    if dev.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _kmeans_sorted(xs: Tensor, k: int, grid: int, iters: int) -> Tensor:
    """Inertia ``[m]`` of a K-means of each row of ``xs`` ``[m, n]`` (float64, sorted per row,
    shifted to its median; ``2 <= k < n``). See :func:`batched_kmeans_1d`."""
    m, n = xs.shape
    dt, dev = torch.float64, xs.device
    p1 = torch.empty(m, n + 1, dtype=dt, device=dev)  # p1[:, b] = sum of the b smallest points
    p1[:, 0] = 0
    torch.cumsum(xs, dim=1, out=p1[:, 1:])

    def segments(pos: Tensor) -> tuple[Tensor, Tensor]:  # sums and sizes of [b_i, b_{i+1})
        return p1.gather(1, pos[:, 1:]) - p1.gather(1, pos[:, :-1]), pos.diff(dim=1).to(dt)

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
        seg, num = segments(pos)
        cent = torch.where(num > 0, seg / num.clamp_min(1), cent)
        mids = (cent[:, 1:] + cent[:, :-1]) / 2
        new = torch.cat([pos[:, :1], torch.searchsorted(xs, mids), pos[:, -1:]], 1)
        if torch.equal(new, pos):
            break
        pos = new
    seg, num = segments(pos)
    tot = torch.linalg.vector_norm(xs, dim=1).square()
    return (tot - (seg * seg / num.clamp_min(1)).sum(1)).clamp_min(0)


def batched_kmeans_1d(values: Tensor, num_clusters: int, grid: int = 16, iters: int = 30) -> Tensor:
    """1-D k-means inertia (float64 ``[c]``) of every column of ``values`` ``[n, c]`` at once.

    Per column, sorted, with prefix sums (a 1-D clustering is a partition of the sorted points
    into segments): an exact dynamic programme over coarse candidate boundaries (every
    ``n / grid``-th point and the edges of ``grid`` equal-width bins) gives the start, then at
    most ``iters`` Lloyd steps (boundaries at centroid midpoints by ``searchsorted``). It is
    the inertia of an actual partition, never below the optimum; how far above was measured
    (``docs/design.md``). ``K == 1`` gives ``n * variance``, ``K >= n`` 0. Torch ops only
    (NumPy's sort on CPU), so it runs as is on CUDA.
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
            with _serial(xs.device):
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

    Per text token (row of ``text_rows`` ``[n, d]``), each channel's percentile rank of ``|x|``
    among the channels not in ``exclude`` (indices or a bool mask); per channel, 1-D k-means
    with ``num_clusters`` clusters over its ranks; score = inertia / ``n``. High for a rank
    spread over many levels; near 0 for one that keeps its place (also the always-largest
    channel) and, for ``K >= 2``, for one switching between two tight levels.

    Returns float32 ``[d]``, ``-inf`` on excluded channels, never NaN: ``n <= K`` falls back to
    ``K = 1`` (rank variance), ``n == 0`` gives zeros (both warned).
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
        return score.index_fill_(0, kept, 0.0)
    k = num_clusters
    if k > 1 and n <= k:
        logger.warning(f"text_instability_score: {n} text token(s) <= num_clusters={k}; "
                       "falling back to K=1 (rank variance)")  # fmt: skip
        k = 1
    ranks = percentile_ranks(text_rows if kept.numel() == d else text_rows[:, kept])
    score[kept] = torch.nan_to_num((batched_kmeans_1d(ranks, k) / n).float(), nan=0.0)
    return score


def text_error_greedy(
    text_rows: Tensor, k: int, exclude: Tensor | Sequence[int] | None = None
) -> Tensor:
    """``k`` text channels chosen greedily to minimise the main path's per-token quantization
    error; int64 ``[min(k, candidates)]`` (CPU) in the order chosen.

    A per-token quantizer's step on token ``n`` is its largest ``|x|`` left on the path, so the
    path's rounding-noise energy goes with ``sum_n max_j x_nj^2`` (what a layer-output MSE
    sees). Each step takes, among the channels not in ``exclude`` (indices or a bool mask), the
    one that most lowers that sum over the text tokens (``text_rows`` ``[n, d]``): a channel
    large on every token (a persistent outlier, whose stable rank
    :func:`text_instability_score` misses) as well as one huge on some tokens only (MOCD's
    unstable relative response). Only each token's ``k + 1`` largest candidates matter. Ties
    go to the lower index; once nothing lowers the error, the rest go by max ``|x|``.
    """
    x = text_rows.detach().float().cpu()
    n, d = x.shape
    alive = _keep_mask(d, exclude, torch.device("cpu"))
    k = min(int(k), int(alive.sum()))
    chosen: list[int] = []
    if k <= 0 or n == 0:
        return torch.tensor(chosen, dtype=torch.long)
    sq = x.square()
    sq[:, ~alive] = -1.0
    top = sq.topk(min(k + 1, d), dim=1)  # k removals leave one
    idx, val = top.indices, top.values.clamp_min(0)
    rows = torch.arange(n)

    def first_two(r: Tensor) -> tuple[Tensor, Tensor]:
        live = alive[idx[r]].long().cumsum(1)
        return (live < 1).sum(1), (live < 2).sum(1).clamp(max=idx.shape[1] - 1)

    p1, p2 = first_two(rows)
    with _serial(x.device):  # many small ops per step
        for _ in range(k):
            top1 = idx[rows, p1]
            gain = torch.zeros(d).index_add_(0, top1, val[rows, p1] - val[rows, p2])
            gain = gain.masked_fill_(~alive, -1.0)
            j = int(gain.argmax())
            if gain[j] <= 0:  # nothing left to gain: the largest remaining by max |x|
                rest = _descending(sq.amax(0).masked_fill_(~alive, -1.0))
                chosen += rest[: k - len(chosen)].tolist()
                break
            chosen.append(j)
            alive[j] = False
            hit = torch.nonzero((top1 == j) | (idx[rows, p2] == j)).flatten()
            p1[hit], p2[hit] = first_two(hit)
    return torch.tensor(chosen, dtype=torch.long)


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
    """Split the ``d`` channels of one site into ``(vision_idx, text_idx, main_idx)``: int64
    CPU tensors, each sorted, disjoint, together ``range(d)`` (:func:`rank_channels`' choice).
    """
    vis, txt = rank_channels(stats, rule, vision_ratio, text_ratio, num_clusters, seed,
                             device=device, counts=counts)  # fmt: skip
    vis, txt = torch.sort(vis).values, torch.sort(txt).values
    used = torch.zeros(stats.dim, dtype=torch.bool).index_fill_(0, torch.cat([vis, txt]), True)
    return vis, txt, torch.nonzero(~used).flatten()


def rank_channels(
    stats: ChannelStats,
    rule: str,
    vision_ratio: float,
    text_ratio: float,
    num_clusters: int = 3,
    seed: int = 0,
    *,
    device: torch.device | str | None = None,
    counts: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """The vision and text channels a rule picks, each in its order of priority (int64, CPU):
    a rule picking fewer channels of a modality picks (about) a prefix of that order.

    ``k_v = ceil(vision_ratio * d)`` and ``k_t = ceil(text_ratio * d)`` channels (ratios in
    [0, 0.5]), or ``counts = (k_v, k_t)`` (the aligned counts of ``layout.plan_site``). Rules:

    - ``"mocd"``: vision = top-``k_v`` by vision max ``|x|``; text = top-``k_t`` among the rest
      by :func:`text_instability_score` (``num_clusters`` = K), computed on ``device``.
    - ``"mocd_error"``: vision as ``"mocd"``; text = :func:`text_error_greedy` among the rest.
    - The paper's ablation baselines, which still fill both paths: ``"none"`` (both empty),
      ``"random"`` (seeded with ``seed``), ``"text_max"`` (text = top-``k_t`` by text max
      ``|x|``, vision = the next ``k_v``), ``"vision_max"`` (vision = top-``k_v`` by vision
      max, text = the next ``k_t``), ``"multi_max"`` / ``"multi_mean"`` (the same by max / mean
      ``|x|`` over both modalities).

    A modality with no tokens seen gets an empty path (a rule reading only that modality
    selects nothing), with a warning. Raises ValueError on an unknown rule, a ratio outside
    [0, 0.5], ``k_v + k_t > d`` or ``num_clusters < 1``.
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
        if rule in ("mocd", "mocd_error"):
            vis = _descending(stats.vision_max.detach().cpu())[:k_v]
            rows = stats.text_rows if device is None else stats.text_rows.to(device)
            if k_t > 0 and rule == "mocd":
                score = text_instability_score(rows, num_clusters, exclude=vis)
                txt = _descending(score.cpu())[:k_t]
            elif k_t > 0:
                txt = text_error_greedy(rows, k_t, exclude=vis)
        else:  # one statistic orders the channels: the first path takes the top, then the other
            score, seen, text_first = {
                "text_max": (stats.text_max, has_t, True),
                "vision_max": (stats.vision_max, has_v, False),
                "multi_max": (stats.multi_max, True, False),
                "multi_mean": (stats.multi_mean, True, False),
            }[rule]
            if not seen:
                logger.warning(f"select_channels({rule!r}): no statistic; nothing selected")
            else:
                order = _descending(score.detach().cpu())
                a = k_t if text_first else k_v
                first, second = order[:a], order[a : k_v + k_t]
                vis, txt = (second, first) if text_first else (first, second)

    return vis.long().cpu(), txt.long().cpu()


def jaccard(a: Tensor | Sequence[int], b: Tensor | Sequence[int]) -> float:
    """Jaccard similarity ``|A & B| / |A | B|`` of two index sets (1.0 if both are empty)."""
    sa = set(torch.as_tensor(a).flatten().tolist())
    sb = set(torch.as_tensor(b).flatten().tolist())
    union = sa | sb
    return len(sa & sb) / len(union) if union else 1.0
