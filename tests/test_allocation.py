"""Adaptive outlier-path widths (splitq_modifier.allocation): widths from planted statistics,
the per-layer budget, the same choice on every data-parallel rank, and end to end."""

from __future__ import annotations

import itertools

import pytest
import torch

from splitq_modifier.allocation import (
    SiteCandidates,
    allocate,
    candidate_widths,
    proxy_errors,
    stores_no_more_blocks,
)

D = 128


def _rows(n: int, channels: list[int], scale: float, seed: int) -> torch.Tensor:
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(seed))
    x[:, channels] *= scale
    return x


def _site(name: str, v_out: list[int], t_out: list[int], seed: int) -> SiteCandidates:
    vr, tr = _rows(64, v_out, 40.0, seed), _rows(64, t_out, 40.0, seed + 1)
    # the selection rule's order of priority: the outliers first where there are some
    v_order = torch.tensor(v_out + [c for c in range(D) if c not in v_out])
    t_order = torch.tensor(t_out + [c for c in range(D) if c not in t_out])
    return proxy_errors(name, vr, tr, torch.ones(D), v_order, t_order, (3, 3), 1, [D], (4, 4))


def test_widths_follow_the_planted_outliers() -> None:
    """A site with many outliers gets wider paths than the fixed 3 + 3, a site with none gets
    empty paths, within the two sites' fixed budget (12 channels)."""
    many = _site("many", [0, 1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15], seed=0)
    none = _site("none", [], [], seed=2)
    assert none.pruned() == [(0, (0, 0), none.errors[(0, 0)])]
    widths = allocate([many, none], budget=12)
    assert widths == [(6, 6), (0, 0)]
    assert many.errors[(6, 6)] < 0.5 * many.errors[(3, 3)]
    few = _site("few", [7], [], seed=4)  # one vision outlier, no text one
    assert allocate([few], budget=6) == [(1, 0)]


def test_budget_holds_and_the_allocation_is_optimal() -> None:
    """Against brute force over random tables: never above the budget, and no other choice
    within it has a lower total error among the pruned candidates."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        sites = []
        for s in range(3):
            errs = {(v, t): float(torch.rand(1, generator=gen)) for v in range(4) for t in range(3)}
            sites.append(SiteCandidates(f"s{s}", errs, (1, 1)))
        budget = trial % 9
        got = allocate(sites, budget, min_gain=0.0)
        assert sum(v + t for v, t in got) <= budget
        options = [[w for _, w, _ in s.pruned(0.0)] for s in sites]
        best = min(
            sum(s.errors[w] for s, w in zip(sites, combo))
            for combo in itertools.product(*options)
            if sum(v + t for v, t in combo) <= budget
        )
        assert sum(s.errors[w] for s, w in zip(sites, got)) == pytest.approx(best)


def test_candidates_are_aligned_and_capped() -> None:
    c = candidate_widths(384, 18944, 32)
    assert c[0] == 0 and all(w % 32 == 0 for w in c) and max(c) == 4 * 384
    assert len(c) <= 12
    assert candidate_widths(0, 4096, 32) == [0]
    assert candidate_widths(3, 128, 1) == [0, 1, 2, 3, 4, 6, 7, 9, 12]


def test_no_candidate_stores_more_weight_blocks_than_the_fixed_widths() -> None:
    """Paths are packed in whole 64-channel blocks: at d = 6144 the fixed (128, 128) fill
    6144 / 64 blocks exactly, so (32, 64) (two partial blocks and a partial main path) is
    refused, (64, 64) and (0, 0) are not; at d = 2048 the fixed (32, 32) already pad."""
    assert not stores_no_more_blocks((32, 64), (128, 128), 6144)
    assert stores_no_more_blocks((64, 64), (128, 128), 6144)
    assert stores_no_more_blocks((0, 0), (128, 128), 6144)
    assert stores_no_more_blocks((32, 64), (32, 32), 2048)
    gen = torch.Generator().manual_seed(0)
    d = 6144
    x = torch.randn(32, d, generator=gen)
    order = torch.arange(d)
    site = proxy_errors("s", x, x, torch.ones(d), order, order, (128, 128), 32, [2048], (4, 4))
    assert (128, 128) in site.errors and (0, 0) in site.errors
    assert all(stores_no_more_blocks(w, (128, 128), d) for w in site.errors)
    assert (32, 64) not in site.errors


def test_ranks_choose_the_same_widths(tmp_path) -> None:
    """The allocation reads reduced statistics only: the two ranks of test_mocd's gloo run
    hold equal samples, so they choose equal widths."""
    from test_mocd import test_all_reduce_two_processes

    test_all_reduce_two_processes(tmp_path)
    widths = []
    for r in torch.load(tmp_path / "reduced.pt"):
        order = torch.argsort(r["vision_max"], descending=True, stable=True)
        t_order = torch.argsort(r["text_max"], descending=True, stable=True)
        site = proxy_errors("s", r["vision_rows"], r["text_rows"], torch.ones(24), order,
                            t_order, (1, 1), 1, [24], (4, 4))  # fmt: skip
        widths.append((site.errors, allocate([site], 2)))
    assert widths[0] == widths[1]
