"""Which output rows of a SplitQ site one tensor-parallel rank keeps (pure Python, no vLLM).

A site's tensors with one row per output (packed weights, weight scales, bias, branch
up-projections) hold the outputs of all the site's linears concatenated (``D`` rows, owner
first). The site transform (permutation, smoothing, Kronecker factors, clipping) and the
branch down-projections read the whole input, so every rank keeps them whole. What differs
is which output rows a rank computes:

- **column-parallel** layers (vLLM's ``QKVParallelLinear``, ``MergedColumnParallelLinear``,
  ``ColumnParallelLinear``): each logical output ``j`` (q, k, v or gate, up) is split into
  ``tp_size / replicas_j`` contiguous blocks and rank ``r`` keeps block
  ``r // replicas_j`` (``replicas_j`` > 1 only for k/v heads replicated across ranks when
  there are fewer kv heads than ranks), exactly as vLLM shards a dense fused weight;
- **row-parallel** layers (``RowParallelLinear``: o_proj, down_proj): vLLM shards the input
  channels, but the transform mixes all of them, so SplitQ shards the *outputs* instead:
  the layer all-gathers its input, rank ``r`` computes output rows
  ``[r D / tp, (r + 1) D / tp)`` and writes them into a zero ``(N, D)`` tensor, and the
  layer's usual all-reduce sums the ranks' disjoint columns (adding zeros is exact).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ROW_ORDER_VERSIONS",
    "ShardLayout",
    "check_shardable",
    "column_layout",
    "full_layout",
    "row_layout",
]

#: ``splitq-packed`` format versions whose per-output tensors store output ``o`` in row
#: ``o`` (so a rank's outputs are a row slice): 2 (dense packing) and 3 (the MMA block
#: packing reorders codes within a row, never rows). A version that reorders rows must
#: define its shards before tensor parallelism can use it.
ROW_ORDER_VERSIONS = (2, 3)


def check_shardable(version: int, tp_size: int, where: str = "") -> None:
    """Raise ``NotImplementedError`` if a site of format ``version`` cannot be split over
    ``tp_size`` > 1 ranks by row slices (see :data:`ROW_ORDER_VERSIONS`)."""
    if tp_size > 1 and int(version) not in ROW_ORDER_VERSIONS:
        at = f" {where}" if where else ""
        raise NotImplementedError(
            f"splitq-packed linear{at}: format version {version} is not known to store one "
            f"row per output, so it cannot be split over {tp_size} tensor-parallel ranks "
            f"(versions {list(ROW_ORDER_VERSIONS)} can); serve it with tensor_parallel_size=1"
        )


@dataclass(frozen=True)
class ShardLayout:
    """The output rows of a site that one rank keeps.

    :param rows: ``(start, length)`` blocks of the site's concatenated output rows, in order
    :param out_splits: this rank's output width of each of the site's linears
    :param out_offset: where this rank's outputs start in the layer's output when the layer
        returns the whole output (row-parallel: ``r D / tp``); 0 otherwise
    :param total: the site's total output width ``D``
    :param gather_input: whether the input must be all-gathered first (row-parallel, tp > 1)
    """

    rows: tuple[tuple[int, int], ...]
    out_splits: tuple[int, ...]
    out_offset: int
    total: int
    gather_input: bool

    @property
    def is_full(self) -> bool:
        """Whether this rank keeps every row in the stored order (no slicing needed)."""
        return self.rows == ((0, self.total),)

    @property
    def width(self) -> int:
        """Number of output rows kept."""
        return sum(n for _, n in self.rows)


def full_layout(out_splits: Sequence[int]) -> ShardLayout:
    """No tensor parallelism: every row."""
    total = int(sum(out_splits))
    return ShardLayout(((0, total),), tuple(int(o) for o in out_splits), 0, total, False)


def column_layout(
    out_splits: Sequence[int],
    partition_sizes: Sequence[int],
    tp_rank: int,
    tp_size: int,
) -> ShardLayout:
    """Rows kept by rank ``tp_rank`` of a column-parallel layer.

    :param out_splits: the site's output widths (owner first), as stored
    :param partition_sizes: the layer's per-rank width of each logical output, in the same
        order (vLLM's ``output_partition_sizes``); one entry per site linear, or a single
        entry for a site of one linear
    :raises ValueError: if the site and the layer's partitions do not fit together
    """
    out_splits = [int(o) for o in out_splits]
    parts = [int(s) for s in partition_sizes]
    total = sum(out_splits)
    if tp_size == 1:
        if sum(parts) != total:
            raise ValueError(
                f"the layer's outputs {parts} do not add up to the site's {out_splits}"
            )
        return full_layout(out_splits)
    if len(parts) != len(out_splits):
        raise ValueError(
            f"a site of {len(out_splits)} linear(s) with outputs {out_splits} cannot be "
            f"sharded over {tp_size} ranks as a layer of {len(parts)} logical outputs {parts}"
        )
    rows, offset = [], 0
    for size, local in zip(out_splits, parts):
        if local <= 0 or size % local or (tp_size * local) % size:
            raise ValueError(
                f"output of width {size} cannot be split into per-rank blocks of {local} "
                f"over {tp_size} ranks"
            )
        replicas = tp_size * local // size
        block = tp_rank // replicas
        rows.append((offset + block * local, local))
        offset += size
    return ShardLayout(tuple(rows), tuple(parts), 0, total, False)


def row_layout(out_splits: Sequence[int], tp_rank: int, tp_size: int) -> ShardLayout:
    """Rows kept by rank ``tp_rank`` of a row-parallel layer (a site of one linear): a
    contiguous ``D / tp_size`` block of its outputs."""
    out_splits = [int(o) for o in out_splits]
    total = sum(out_splits)
    if tp_size == 1:
        return full_layout(out_splits)
    if len(out_splits) != 1:
        raise ValueError(f"a row-parallel layer is one linear, got a site of {out_splits}")
    if total % tp_size:
        raise ValueError(f"output width {total} is not divisible by {tp_size} ranks")
    local = total // tp_size
    return ShardLayout(((tp_rank * local, local),), (local,), tp_rank * local, total, True)
