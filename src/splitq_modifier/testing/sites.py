"""Random site parameters for tests and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from splitq_modifier.layout import kron_dims
from splitq_modifier.runtime.params import SiteParams, build_site_params

__all__ = ["random_site_params"]


def random_site_params(
    out_splits: Sequence[int],
    sizes: Sequence[int],
    dims: Sequence[Sequence[int]] | None = None,
    w_bits: Sequence[int] = (4, 4, 4),
    a_bits: Sequence[int] = (4, 4, 4),
    cws_rank: int | Sequence[int] = 0,
    mac_rank: int | Sequence[int] = 0,
    mac_input: int = 0,
    bias: bool = False,
    device: torch.device | str = "cpu",
    seed: int = 0,
    branch_bits: tuple[int, int] = (4, 4),
) -> SiteParams:
    """Random site parameters: Gaussian weights, random orthogonal factors, positive
    smoothing, a random permutation; branch rank per linear (an int: the same for every
    linear; 0 = no branch). Default factor sides: :func:`splitq_modifier.layout.kron_dims`
    of each path."""
    gen = torch.Generator().manual_seed(seed)
    d, big_d = int(sum(sizes)), int(sum(out_splits))
    km = int(sizes[2])
    if dims is None:
        dims = [kron_dims(int(k), 2, balanced_only=False) for k in sizes]

    def orth(n: int) -> Tensor:
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return q.float()

    mats = [[orth(int(n)) for n in path] for path in dims]
    w_paths = [torch.randn(big_d, int(k), generator=gen) * d**-0.5 for k in sizes]

    def branch(rank: int | Sequence[int]):
        ranks = [rank] * len(out_splits) if isinstance(rank, int) else list(rank)
        if min(ranks) <= 0:
            return None
        downs = [torch.randn(r, km, generator=gen) * km**-0.5 for r in ranks]
        ups = [torch.randn(int(o), r, generator=gen) * 0.1 * d**-0.5
               for o, r in zip(out_splits, ranks)]  # fmt: skip
        return downs, ups

    params = build_site_params(
        w_paths,
        out_splits,
        torch.randperm(d, generator=gen),
        torch.rand(d, generator=gen) + 0.5,
        mats,
        w_bits,
        a_bits,
        torch.rand(3, generator=gen) * 0.2 + 0.8,
        branch(cws_rank),
        branch(mac_rank),
        branch_bits=branch_bits,
        mac_input=mac_input,
        bias=torch.randn(big_d, generator=gen) if bias else None,
    )
    return params.to(device)
