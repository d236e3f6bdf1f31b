"""Path layout of one activation site: channel counts per path and Kronecker factor sizes.

SplitQ splits the ``d`` input channels of a site into a vision-outlier path (``k_v``), a
text-outlier path (``k_t``) and the main path (``k_m = d - k_v - k_t``), each with its own
online transform ``diag(c) (M_1 kron M_2 ...)``. The user sets ratios (``k ~ 2% of d``); this
module turns them into counts and factor sizes that suit real widths (2048-8192 hidden,
6144-32768 intermediate). The rules, and why:

- **Aligned counts.** Outlier counts are multiples of ``multiple`` (default 32): 32 codes fill
  whole int32 words at 2, 4 and 8 bits and a whole 3-word group at 3 bits, and int8 ``tl.dot``
  consumes K in steps of 32, so no path ends in a partial word or a partial K tile. A count is
  the nearest multiple of ``ratio * d`` (at least one multiple when the ratio is > 0). At toy
  widths, where ``ratio * d < multiple / 2`` (``d < 800`` at 2%), alignment would multiply the
  outlier paths several times over, so counts stay ``ceil(ratio * d)`` there.
- **Balanced factors.** A path of width ``n`` > :data:`DENSE_MAX` gets Kronecker factors whose
  largest is at most :data:`MAX_IMBALANCE` times ``n^(1/f)`` (``f`` factors) and at most
  :data:`MAX_SIDE`: the per-token
  cost of the transform is ``n * sum(factors)``, smallest when the factors are equal. Among
  balanced factorisations the one with the fewest padded elements (Triton tiles are powers of
  two) and then the smallest sum wins. Narrower paths use one dense factor.
- **Cost budget.** The site's online transform (all paths) must cost at most
  :data:`TRANSFORM_BUDGET` (5%) of the site's linear MACs per token. Two factors meet that at
  every site of the real-model table except the MLP down projections, whose input
  (intermediate) is 3-6x wider than their output (hidden): two balanced factors of an
  18944-wide path cost ``2 sqrt(18944) / 3584 = 7.7%`` of the down projection. Three balanced
  factors cost ``3 cbrt(n) / d_out`` (2.2% there), so the main path gets three factors where
  two would exceed the budget, and two otherwise (FlatQuant's form).
- **Nearest count that works.** When the main width ``d - k_v - k_t`` has no balanced
  factorisation within the budget (for example ``4096 - 2 * 82 = 3932 = 4 x 983``), the outlier
  counts move by whole multiples to the nearest pair whose main width has one. No padding is
  needed for any width in :mod:`splitq_modifier.widths`; a width where no pair within
  :data:`SEARCH_STEPS` multiples works falls back to the target counts and the most balanced
  divisor pair, with a warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from loguru import logger

__all__ = [
    "DENSE_MAX",
    "MAX_IMBALANCE",
    "MAX_SIDE",
    "TRANSFORM_BUDGET",
    "SitePlan",
    "balanced_plan",
    "factorizations",
    "kron_dims",
    "outlier_count",
    "plan_for_sizes",
    "plan_site",
    "transform_macs",
]

#: Paths at most this wide use one dense factor.
DENSE_MAX = 64
#: A factorisation into ``f`` factors is balanced when its largest factor is at most this
#: multiple of ``n ** (1 / f)``.
MAX_IMBALANCE = 2.0
#: Largest factor side of a balanced factorisation: one factor is one ``tl.dot`` operand in
#: the fused transform kernel, and 128 keeps it (padded to a power of two) within one tile.
MAX_SIDE = 128
#: Largest allowed transform cost, as a fraction of the site's linear MACs per token.
TRANSFORM_BUDGET = 0.05
#: How many multiples each outlier count may move to find a main width that factors well.
SEARCH_STEPS = 8


def _pad(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@lru_cache(maxsize=4096)
def factorizations(n: int, f: int) -> tuple[tuple[int, ...], ...]:
    """All non-decreasing ``f``-tuples of integers >= 2 whose product is ``n``."""
    if f == 1:
        return ((n,),) if n >= 2 else ()
    out = []
    for a in range(2, math.isqrt(n) + 1 if f == 2 else int(round(n ** (1 / f))) + 2):
        if n % a == 0:
            for rest in factorizations(n // a, f - 1):
                if rest[0] >= a:
                    out.append((a, *rest))
    return tuple(out)


def _is_balanced(dims: tuple[int, ...], n: int) -> bool:
    return max(dims) <= min(MAX_IMBALANCE * n ** (1 / len(dims)) + 1e-9, MAX_SIDE)


def kron_dims(n: int, num_factors: int = 2, balanced_only: bool = True) -> tuple[int, ...] | None:
    """Kronecker factor sizes of a path of width ``n``.

    ``n <= DENSE_MAX``: one dense factor ``(n,)`` (``()`` for an empty path). Otherwise the
    best ``num_factors``-way factorisation (fewest padded elements, then smallest sum); with
    ``balanced_only`` only balanced ones qualify and None means there is none. Without it,
    the most balanced one is returned, or ``(n,)`` when ``n`` has no such factorisation
    (a prime width).
    """
    if n <= 0:
        return ()
    if n <= DENSE_MAX:
        return (n,)
    cands = factorizations(n, num_factors)
    if balanced_only:
        cands = tuple(c for c in cands if _is_balanced(c, n))
        if not cands:
            return None
        return min(cands, key=lambda c: (math.prod(_pad(x) for x in c), sum(c)))
    if not cands:
        return (n,)
    return min(cands, key=lambda c: (max(c), sum(c)))


def transform_macs(sizes: tuple[int, ...], dims: tuple[tuple[int, ...], ...]) -> int:
    """Multiply-adds per token of a site's online transform: smoothing (``k``) plus, per path,
    ``k * sum(factors)`` (a dense factor: ``k^2``)."""
    return sum(k + k * sum(f) for k, f in zip(sizes, dims) if k)


def outlier_count(ratio: float, d: int, multiple: int = 32) -> int:
    """Channels of one outlier path: the nearest multiple of ``ratio * d`` (at least one
    multiple when ``ratio > 0``); ``ceil(ratio * d)`` when ``multiple == 1`` or at toy widths
    (``ratio * d < multiple / 2``)."""
    target = ratio * d
    if ratio <= 0:
        return 0
    if multiple <= 1 or target < multiple / 2:
        return math.ceil(target - 1e-9)
    return multiple * max(1, round(target / multiple))


@dataclass(frozen=True)
class SitePlan:
    """The realised layout of one site.

    :param sizes: path widths ``(k_v, k_t, k_m)``
    :param dims: Kronecker factor sizes per path (``()`` for an empty path)
    :param linear_macs: multiply-adds per token of the site's linears (``d * sum(d_out)``)
    """

    sizes: tuple[int, int, int]
    dims: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    linear_macs: int

    @property
    def transform_macs(self) -> int:
        """Multiply-adds per token of the online transform."""
        return transform_macs(self.sizes, self.dims)

    @property
    def cost(self) -> float:
        """Transform MACs as a fraction of the site's linear MACs."""
        return self.transform_macs / max(self.linear_macs, 1)

    def imbalance(self) -> float:
        """Largest ``max(factor) / n^(1/f)`` over the paths with more than one factor."""
        worst = 0.0
        for k, f in zip(self.sizes, self.dims):
            if len(f) > 1:
                worst = max(worst, max(f) / k ** (1 / len(f)))
        return worst

    def to_dict(self) -> dict:
        """JSON-able form (for reports)."""
        return {
            "sizes": list(self.sizes),
            "factors": [list(f) for f in self.dims],
            "transform_cost": round(self.cost, 5),
        }


def _main_dims(
    k_v: int, k_t: int, m: int, out_total: int, d: int, budget: float
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    side = (kron_dims(k_v, 2, False), kron_dims(k_t, 2, False))
    for f in (2, 3):
        dm = kron_dims(m, f)
        if dm is None:
            continue
        dims = (*side, dm)
        if transform_macs((k_v, k_t, m), dims) <= budget * d * out_total:
            return dims
    return None


def plan_site(
    d: int,
    out_features: tuple[int, ...] | list[int],
    vision_ratio: float,
    text_ratio: float,
    multiple: int = 32,
    budget: float = TRANSFORM_BUDGET,
) -> SitePlan:
    """Channel counts and factor sizes of a site of input width ``d`` (see the module doc).

    :param out_features: output widths of the site's linears (they share the transform)
    :param vision_ratio: target fraction of channels on the vision-outlier path
    :param text_ratio: target fraction on the text-outlier path
    :param multiple: alignment of the outlier counts (1: none)
    :param budget: largest transform cost as a fraction of the site's linear MACs
    """
    if d < 1:
        raise ValueError(f"site width must be >= 1, got {d}")
    out_total = int(sum(out_features))
    k_v0, k_t0 = outlier_count(vision_ratio, d, multiple), outlier_count(text_ratio, d, multiple)
    if k_v0 + k_t0 >= d:
        raise ValueError(
            f"outlier paths of {k_v0} + {k_t0} channels leave no main path at width {d}"
        )
    aligned = multiple > 1 and (k_v0 % multiple == 0 and k_t0 % multiple == 0)
    if aligned:
        steps = range(-SEARCH_STEPS, SEARCH_STEPS + 1)
        cands = sorted(
            {
                (k_v0 + i * multiple if k_v0 else 0, k_t0 + j * multiple if k_t0 else 0)
                for i in steps
                for j in steps
            },
            key=lambda c: (abs(c[0] - k_v0) + abs(c[1] - k_t0), abs(c[1] - k_t0), c),
        )
        for k_v, k_t in cands:
            if (k_v0 and k_v < multiple) or (k_t0 and k_t < multiple) or k_v + k_t >= d:
                continue
            dims = _main_dims(k_v, k_t, d - k_v - k_t, out_total, d, budget)
            if dims is not None:
                return SitePlan((k_v, k_t, d - k_v - k_t), dims, d * out_total)
    m = d - k_v0 - k_t0
    dims = _main_dims(k_v0, k_t0, m, out_total, d, budget)
    if dims is None:
        dims = tuple(kron_dims(k, 2, False) for k in (k_v0, k_t0, m))
        if aligned or d >= 1024:
            logger.warning(
                f"SplitQ layout: no balanced transform within {budget:.0%} of the linear cost "
                f"for a site of width {d} (paths {k_v0}/{k_t0}/{m}); using factors {dims}"
            )
    return SitePlan((k_v0, k_t0, m), dims, d * out_total)


def plan_for_sizes(
    sizes: tuple[int, int, int],
    out_features: tuple[int, ...] | list[int],
    budget: float = TRANSFORM_BUDGET,
) -> SitePlan:
    """Factor sizes for path widths that are already fixed (no count search): the budgeted
    balanced choice when there is one, else the most balanced divisor pairs."""
    k_v, k_t, m = (int(k) for k in sizes)
    d, out_total = k_v + k_t + m, int(sum(out_features))
    dims = _main_dims(k_v, k_t, m, out_total, d, budget)
    if dims is None:
        dims = tuple(kron_dims(k, 2, False) for k in (k_v, k_t, m))
    return SitePlan((k_v, k_t, m), dims, d * out_total)


def balanced_plan(
    sizes: tuple[int, int, int],
    out_features: tuple[int, ...] | list[int],
    budget: float = TRANSFORM_BUDGET,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    """Factor sizes for fixed path widths when the main path has a balanced factorisation
    within the cost budget, else None; below width 1024, where the kernels' tiles do not
    care, the most balanced factors whatever they are (:func:`plan_for_sizes`)."""
    d = int(sum(sizes))
    if d < 1024:
        return plan_for_sizes(sizes, out_features, budget).dims
    k_v, k_t, m = (int(k) for k in sizes)
    return _main_dims(k_v, k_t, m, int(sum(out_features)), d, budget)
