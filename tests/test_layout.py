"""Channel counts and transform factors at the widths of real VLMs (no download: widths only)."""

from __future__ import annotations

import math

import pytest

from splitq_modifier.layout import (
    DENSE_MAX,
    MAX_IMBALANCE,
    TRANSFORM_BUDGET,
    factorizations,
    kron_dims,
    outlier_count,
    plan_for_sizes,
    plan_site,
)
from splitq_modifier.widths import REAL_MODELS, site_widths

SITES = [
    (name, site, d, outs)
    for name, m in REAL_MODELS.items()
    for site, (d, outs) in site_widths(m).items()
]


@pytest.mark.parametrize("name,site,d,outs", SITES, ids=[f"{s[0]}-{s[1]}" for s in SITES])
def test_real_width_layout(name, site, d, outs):
    plan = plan_site(d, outs, 0.02, 0.02, multiple=32)
    k_v, k_t, k_m = plan.sizes
    assert k_v + k_t + k_m == d
    # aligned outlier paths, close to the 2% the recipe asks for
    assert k_v % 32 == 0 and k_t % 32 == 0 and k_v > 0 and k_t > 0
    for k in (k_v, k_t):
        assert abs(k - 0.02 * d) <= 8 * 32, (k, d)
    for k, dims in zip(plan.sizes, plan.dims):
        assert math.prod(dims) == k
        if k > DENSE_MAX:
            f = len(dims)
            assert f in (2, 3)
            assert max(dims) <= MAX_IMBALANCE * k ** (1 / f) + 1e-9, (k, dims)
        else:
            assert dims == (k,)
    # the online transform costs at most 5% of the site's linear MACs per token
    assert plan.cost <= TRANSFORM_BUDGET, (plan.sizes, plan.dims, plan.cost)
    assert plan.linear_macs == d * sum(outs)


def test_table_covers_the_families():
    names = " ".join(REAL_MODELS)
    for family in ("Qwen2.5-VL-3B", "Qwen2.5-VL-7B", "Qwen2.5-VL-32B", "Qwen2.5-VL-72B",
                   "Qwen2-VL-2B", "Qwen2-VL-7B", "Qwen3-VL-2B", "Qwen3-VL-4B", "Qwen3-VL-8B",
                   "Qwen3-VL-32B", "LLaVA-1.5-7B", "LLaVA-1.5-13B", "Gemma-3-4B",
                   "Gemma-3-12B", "Gemma-3-27B", "SmolVLM", "InternVL", "Mistral"):  # fmt: skip
        assert family in names


def test_the_issue_widths_no_longer_degenerate():
    # main widths that used to factor as 2 x 983, 4 x 983, 12 x 983, 10 x 1327, 42 x 433
    for d, outs in ((2048, (2048,)), (4096, (4096,)), (12288, (4096,)), (13824, (5120,)),
                    (18944, (3584,))):  # fmt: skip
        plan = plan_site(d, outs, 0.02, 0.02)
        dims = plan.dims[2]
        assert max(dims) <= 2 * plan.sizes[2] ** (1 / len(dims)), (d, dims)


def test_counts_and_toy_widths():
    assert outlier_count(0.02, 4096) == 96  # 81.9 -> nearest multiple of 32
    assert outlier_count(0.02, 2048) == 32
    assert outlier_count(0.0, 4096) == 0
    assert outlier_count(0.02, 128) == 3  # toy width: ceil, unaligned
    assert outlier_count(0.02, 4096, multiple=1) == 82
    toy = plan_site(128, (128,), 0.02, 0.02)
    assert toy.sizes == (3, 3, 122)
    assert toy.dims == ((3,), (3,), (2, 61))  # best effort, as before alignment existed
    base = plan_site(18944, (3584,), 0.0, 0.0)
    assert base.sizes == (0, 0, 18944) and base.cost <= TRANSFORM_BUDGET


def test_factorizations_and_fixed_sizes():
    assert set(factorizations(24, 2)) == {(2, 12), (3, 8), (4, 6)}
    assert set(factorizations(24, 3)) == {(2, 2, 6), (2, 3, 4)}
    assert kron_dims(3456) == (54, 64)  # fewest padded elements among balanced pairs
    assert kron_dims(1966) is None  # 2 x 983 only
    assert kron_dims(1966, balanced_only=False) == (2, 983)
    plan = plan_for_sizes((0, 0, 4096), (4096,))
    assert plan.dims == ((), (), (64, 64))


@pytest.mark.parametrize("name", [n for n, m in REAL_MODELS.items() if m.hidden >= 1024])
def test_checkpoint_size_at_real_widths(name):
    from benchmarks.size_report import layer_report

    assert layer_report(REAL_MODELS[name], "W4A4", 0.02, 0.03, verbose=False) <= 4.5
