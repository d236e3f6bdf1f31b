"""Sites, inputs and masks shared by the kernel tests (test_kernel_quant, test_kernel_gemm,
test_kernels)."""

from __future__ import annotations

import torch

from splitq_modifier.runtime import SiteParams, build_site_params, site_quantize_reference

OUT_TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
N_TOKENS = 21  # not a multiple of any block size


def make_site(
    out_splits: tuple[int, ...],
    sizes: tuple[int, int, int],
    dims: tuple[tuple[int, ...], ...],
    w_bits: tuple[int, int, int] = (4, 4, 4),
    a_bits: tuple[int, int, int] = (4, 4, 4),
    cws: tuple[int, ...] | None = None,
    mac: tuple[int, ...] | None = None,
    branch_bits: tuple[int, int] = (4, 4),
    mac_input: int = 0,
    bias: bool = False,
    seed: int = 0,
) -> SiteParams:
    """Random site: Gaussian weights, random orthogonal factors scaled by ~U(0.5, 1.5) rows
    (so the transform is not norm-preserving), positive smoothing, a random permutation."""
    gen = torch.Generator().manual_seed(seed)
    d, big_d, km = sum(sizes), sum(out_splits), sizes[2]

    def factor(n: int) -> torch.Tensor:
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return (q * (torch.rand(n, 1, generator=gen, dtype=torch.float64) + 0.5)).float()

    def branch(ranks):
        if ranks is None:
            return None
        downs = [torch.randn(r, km, generator=gen) * km**-0.5 for r in ranks]
        ups = [torch.randn(o, r, generator=gen) * 0.3 * d**-0.5 for o, r in zip(out_splits, ranks)]
        return downs, ups

    return build_site_params(
        [torch.randn(big_d, k, generator=gen) * d**-0.5 for k in sizes],
        out_splits,
        torch.randperm(d, generator=gen),
        torch.rand(d, generator=gen) + 0.5,
        [[factor(n) for n in path] for path in dims],
        w_bits,
        a_bits,
        torch.rand(3, generator=gen) * 0.2 + 0.8,
        branch(cws),
        branch(mac),
        branch_bits,
        mac_input,
        torch.randn(big_d, generator=gen) if bias else None,
    )


def make_x(n: int, d: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) * torch.linspace(0.1, 4.0, d)
    x[:, torch.randperm(d, generator=gen)[:3]] *= 12.0  # a few outlier channels
    if n > 4:
        x[4] = 0.0  # an all-zero token takes the 1e-8 floor
    return x.to(dtype)


def make_mask(kind: str | None, n: int) -> torch.Tensor | None:
    if kind is None:
        return None
    if kind == "text":
        return torch.ones(n, dtype=torch.bool)
    if kind == "vision":
        return torch.zeros(n, dtype=torch.bool)
    return torch.rand(n, generator=torch.Generator().manual_seed(5)) > 0.5


def ref_quantize(p: SiteParams, xt: torch.Tensor) -> dict:
    return site_quantize_reference(xt, p)


def op_args(p: SiteParams, x, mask, out_dtype=None) -> tuple:
    """Arguments of site_linear_{triton,reference}."""
    return (x, p, mask, out_dtype)


QUANT_CASES = [
    # out_splits, sizes, dims, a_bits, branch_bits, cws ranks, mac ranks, mac_input, dtype
    ((40, 24), (6, 9, 120), ((6,), (3, 3), (4, 5, 6)), (4, 4, 4), (4, 4), (3, 5), (4, 2), 0,
     torch.float32),
    ((30,), (0, 11, 150), ((), (11,), (10, 15)), (8, 2, 3), (3, 8), (5,), None, 0,
     torch.bfloat16),
    ((17, 9, 9), (13, 0, 99), ((13,), (), (9, 11)), (4, 3, 8), (4, 3), None, (7, 2, 3), 1,
     torch.float16),
    ((33, 20), (5, 6, 77), ((), (), ()), (2, 4, 2), (2, 4), (2, 3), (33, 4), 0, torch.float32),
    ((25,), (0, 0, 90), ((), (), (2, 3, 15)), (4, 4, 4), (4, 4), (4,), (6,), 1, torch.bfloat16),
    ((24, 8), (16, 16, 140), ((4, 4), (16,), (2, 70)), (8, 8, 8), (8, 8), None, None, 0,
     torch.float32),
]  # fmt: skip


def case_site(case, bias=False, w_bits=(4, 4, 4), seed=0) -> tuple[SiteParams, torch.dtype]:
    outs, sizes, dims, a_bits, bb, cws, mac, mi, dtype = case
    p = make_site(outs, sizes, dims, w_bits, a_bits, cws, mac, bb, mi, bias, seed)
    return p, dtype


def check_codes_close(got: torch.Tensor, want: torch.Tensor, what: str, stats: list) -> None:
    diff = (got.int() - want.int()).abs()
    stats.append((what, int((diff != 0).sum()), diff.numel()))
    assert int(diff.max()) <= 1 if diff.numel() else True, f"{what}: a code is off by > 1"
    assert (diff != 0).float().mean().item() <= 1e-3 if diff.numel() else True, what
