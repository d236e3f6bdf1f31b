"""``torch.ops.splitq.site_linear``: one SplitQ activation site as one torch op.

The op takes the *untransformed* activation ``x`` (..., d) with an optional text mask over its
leading dims, and every tensor of the site (see
:mod:`splitq_modifier.runtime.reference` for the exact contract) and returns the outputs of
the site's linears side by side. Implementations:

- CPU (and any non-CUDA device): the torch reference, exact integer arithmetic;
- CUDA: the Triton kernels of ``splitq_modifier.kernels`` (one fused gather + smoothing +
  Kronecker transform + per-token quantization + branch down-projection kernel, one GEMM over
  the concatenated weights); ``SPLITQ_DISABLE_TRITON=1`` forces the reference;
- ``SPLITQ_TRITON_INTERPRET=1``: CPU tensors go through the same Triton kernels under
  Triton's interpreter, so the CUDA code path runs end to end on a machine without a GPU
  (slow; for tests). It sets ``TRITON_INTERPRET=1`` before the kernels are first imported.

Weight-only sites (activation bits 16) always use the reference.
A fake (meta) implementation makes the op traceable by ``torch.compile`` and ``torch.export``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from splitq_modifier.runtime.quant import (
    pack_path_weight,
    packed_words,
    qmax_of,
    quantize_weight_per_channel,
)
from splitq_modifier.runtime.reference import (
    UNQUANTIZED,
    flatten_factor_dims,
    site_linear_reference,
)

__all__ = [
    "SiteBranchParams",
    "SiteParams",
    "build_site_params",
    "random_site_params",
    "site_linear",
    "site_linear_op",
    "triton_enabled",
]


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------
@dataclass
class SiteBranchParams:
    """The low-rank branch (CWS or MAC) of every linear of a site, concatenated.

    Attributes:
        down: packed int32 (R, ceil(km * w_bits / 32)): the down factors of the linears,
            their ranks stacked (``R = sum(ranks)``).
        down_scale: fp32 (R,).
        up: packed int32 (D, ceil(max(ranks) * w_bits / 32)): row ``o`` of linear ``j`` holds
            its ``ranks[j]`` codes.
        up_scale: fp32 (D,).
        ranks: rank of each linear's branch.
        w_bits: bits of the factors; act_bits: bits of the branch activations.
    """

    down: Tensor
    down_scale: Tensor
    up: Tensor
    up_scale: Tensor
    ranks: tuple[int, ...]
    w_bits: int = 4
    act_bits: int = 4

    def to(self, device: torch.device | str) -> SiteBranchParams:
        """A copy with every tensor on ``device``."""
        return replace(
            self,
            down=self.down.to(device),
            down_scale=self.down_scale.to(device),
            up=self.up.to(device),
            up_scale=self.up_scale.to(device),
        )


@dataclass
class SiteParams:
    """Everything a site needs at runtime besides its input and text mask.

    ``sizes`` path widths ``(kv, kt, km)``; ``dims`` Kronecker factor sides per path;
    ``out_splits`` the output widths of the site's linears; ``perm`` int32 (d,), ``smooth``
    fp32 (d,) path order, ``factors`` fp32 flat, ``act_clip`` fp32 (3,); ``w_packed`` /
    ``w_scale`` per path over the concatenated output rows (D); optional branches; ``bias``
    (D,) or None.
    """

    sizes: tuple[int, int, int]
    dims: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    out_splits: tuple[int, ...]
    perm: Tensor
    smooth: Tensor
    factors: Tensor
    act_clip: Tensor
    w_packed: tuple[Tensor, Tensor, Tensor]
    w_scale: tuple[Tensor, Tensor, Tensor]
    w_bits: tuple[int, int, int] = (4, 4, 4)
    a_bits: tuple[int, int, int] = (4, 4, 4)
    cws: SiteBranchParams | None = None
    mac: SiteBranchParams | None = None
    mac_input: int = 0
    bias: Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def d_in(self) -> int:
        """Input width."""
        return int(sum(self.sizes))

    @property
    def d_out(self) -> int:
        """Total output width (all linears)."""
        return int(sum(self.out_splits))

    def to(self, device: torch.device | str) -> SiteParams:
        """A copy with every tensor on ``device``."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            perm=mv(self.perm),
            smooth=mv(self.smooth),
            factors=mv(self.factors),
            act_clip=mv(self.act_clip),
            w_packed=tuple(mv(t) for t in self.w_packed),
            w_scale=tuple(mv(t) for t in self.w_scale),
            cws=None if self.cws is None else self.cws.to(device),
            mac=None if self.mac is None else self.mac.to(device),
            bias=mv(self.bias),
        )

    def validate(self) -> None:
        """Check shapes, dtypes and bit widths; ``ValueError`` naming the first mismatch."""
        d, big_d = self.d_in, self.d_out
        if len(self.sizes) != 3 or any(int(k) < 0 for k in self.sizes):
            raise ValueError(f"sizes must be three non-negative ints, got {self.sizes}")
        fd = flatten_factor_dims(self.dims)
        want_f = sum(n * n for n in fd)
        for p, k in enumerate(self.sizes):
            prod = 1
            for n in self.dims[p]:
                prod *= n
            if self.dims[p] and prod != k:
                raise ValueError(f"path {p}: factors {self.dims[p]} do not multiply to {k}")
        checks = [
            ("perm", self.perm, torch.int32, (d,)),
            ("smooth", self.smooth, torch.float32, (d,)),
            ("factors", self.factors, torch.float32, (want_f,)),
            ("act_clip", self.act_clip, torch.float32, (3,)),
        ]
        for p, k in enumerate(self.sizes):
            qmax_of(self.w_bits[p])
            words = packed_words(int(k), int(self.w_bits[p]))
            checks.append((f"w_packed[{p}]", self.w_packed[p], torch.int32, (big_d, words)))
            checks.append((f"w_scale[{p}]", self.w_scale[p], torch.float32, (big_d,)))
        for name, br in (("cws", self.cws), ("mac", self.mac)):
            if br is None:
                continue
            if len(br.ranks) != len(self.out_splits) or min(br.ranks) < 1:
                raise ValueError(f"{name}: need one rank >= 1 per linear, got {br.ranks}")
            r, rmax = sum(br.ranks), max(br.ranks)
            km = int(self.sizes[2])
            checks += [
                (f"{name}.down", br.down, torch.int32, (r, packed_words(km, br.w_bits))),
                (f"{name}.down_scale", br.down_scale, torch.float32, (r,)),
                (f"{name}.up", br.up, torch.int32, (big_d, packed_words(rmax, br.w_bits))),
                (f"{name}.up_scale", br.up_scale, torch.float32, (big_d,)),
            ]
        for name, t, dtype, shape in checks:
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(
                    f"{name} must be {dtype} {tuple(shape)}, got {t.dtype} {tuple(t.shape)}"
                )
        if self.bias is not None and tuple(self.bias.shape) != (big_d,):
            raise ValueError(f"bias must have shape ({big_d},), got {tuple(self.bias.shape)}")
        if self.mac_input not in (0, 1):
            raise ValueError(f"mac_input must be 0 or 1, got {self.mac_input}")
        quant = [int(b) < UNQUANTIZED for b in self.a_bits]
        if any(quant) and not all(quant):
            raise ValueError(f"activation bits must all be quantized or all 16: {self.a_bits}")
        for b in self.a_bits:
            if int(b) < UNQUANTIZED:
                qmax_of(b)

    def op_args(self) -> tuple:
        """The flat arguments of ``torch.ops.splitq.site_linear`` after ``x`` up to and
        excluding ``text_mask``."""
        cws, mac = self.cws, self.mac
        return (
            self.perm, self.smooth, self.factors, self.act_clip,
            *self.w_packed, *self.w_scale,
            None if cws is None else cws.down, None if cws is None else cws.down_scale,
            None if cws is None else cws.up, None if cws is None else cws.up_scale,
            None if mac is None else mac.down, None if mac is None else mac.down_scale,
            None if mac is None else mac.up, None if mac is None else mac.up_scale,
        )  # fmt: skip

    def int_args(self) -> tuple:
        """The flat integer arguments: sizes, factor_dims, out_splits, cws_ranks, mac_ranks,
        a_bits, w_bits, branch_bits, mac_input."""
        cws, mac = self.cws, self.mac
        branch_bits = [
            4 if cws is None else int(cws.w_bits),
            4 if cws is None else int(cws.act_bits),
            4 if mac is None else int(mac.w_bits),
            4 if mac is None else int(mac.act_bits),
        ]
        return (
            [int(k) for k in self.sizes],
            flatten_factor_dims(self.dims),
            [int(k) for k in self.out_splits],
            [] if cws is None else [int(r) for r in cws.ranks],
            [] if mac is None else [int(r) for r in mac.ranks],
            [int(b) for b in self.a_bits],
            [int(b) for b in self.w_bits],
            branch_bits,
            int(self.mac_input),
        )

    def weight_bytes(self) -> int:
        """Bytes of every stored tensor (codes, scales, transforms, branches, bias)."""
        ts = [self.perm, self.smooth, self.factors, self.act_clip, *self.w_packed, *self.w_scale]
        for br in (self.cws, self.mac):
            if br is not None:
                ts += [br.down, br.down_scale, br.up, br.up_scale]
        if self.bias is not None:
            ts.append(self.bias)
        return int(sum(t.numel() * t.element_size() for t in ts))


# --------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------
def triton_enabled(device: torch.device) -> bool:
    """Whether the op runs the Triton kernels for tensors on ``device``."""
    if device.type == "cuda":
        return os.environ.get("SPLITQ_DISABLE_TRITON", "0") != "1"
    return os.environ.get("SPLITQ_TRITON_INTERPRET", "0") == "1"


def _triton(*args):
    if os.environ.get("SPLITQ_TRITON_INTERPRET", "0") == "1":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from splitq_modifier.kernels import site_linear_triton  # lazy: triton only when used

    return site_linear_triton(*args)


def _dispatch(*args):
    """Flatten the leading dims (inside the op, so no extra top-level torch ops), run the
    Triton kernels or the reference on (N, d), restore the leading dims."""
    x, mask, a_bits = args[0], args[19], args[26]
    lead = x.shape[:-1]
    flat = (x.reshape(-1, x.shape[-1]), *args[1:19], None if mask is None else mask.reshape(-1))
    flat = (*flat, *args[20:])
    if int(a_bits[2]) < UNQUANTIZED and triton_enabled(x.device):
        y = _triton(*flat)
    else:
        y = site_linear_reference(*flat)
    return y.reshape(*lead, y.shape[-1])


@torch.library.custom_op("splitq::site_linear", mutates_args=())
def site_linear_op(
    x: Tensor,
    perm: Tensor,
    smooth: Tensor,
    factors: Tensor,
    act_clip: Tensor,
    w_v: Tensor,
    w_t: Tensor,
    w_m: Tensor,
    ws_v: Tensor,
    ws_t: Tensor,
    ws_m: Tensor,
    l2: Tensor | None,
    l2_scale: Tensor | None,
    l1: Tensor | None,
    l1_scale: Tensor | None,
    l4: Tensor | None,
    l4_scale: Tensor | None,
    l3: Tensor | None,
    l3_scale: Tensor | None,
    text_mask: Tensor | None,
    bias: Tensor | None,
    sizes: list[int],
    factor_dims: list[int],
    out_splits: list[int],
    cws_ranks: list[int],
    mac_ranks: list[int],
    a_bits: list[int],
    w_bits: list[int],
    branch_bits: list[int],
    mac_input: int,
    out_dtype: torch.dtype | None,
) -> Tensor:
    """``torch.ops.splitq.site_linear``: CPU = the reference (Triton under the interpreter
    with ``SPLITQ_TRITON_INTERPRET=1``)."""
    return _dispatch(
        x, perm, smooth, factors, act_clip, w_v, w_t, w_m, ws_v, ws_t, ws_m, l2, l2_scale,
        l1, l1_scale, l4, l4_scale, l3, l3_scale, text_mask, bias, sizes, factor_dims,
        out_splits, cws_ranks, mac_ranks, a_bits, w_bits, branch_bits, mac_input, out_dtype,
    )  # fmt: skip


@site_linear_op.register_kernel("cuda")
def _site_linear_cuda(
    x, perm, smooth, factors, act_clip, w_v, w_t, w_m, ws_v, ws_t, ws_m, l2, l2_scale, l1,
    l1_scale, l4, l4_scale, l3, l3_scale, text_mask, bias, sizes, factor_dims, out_splits,
    cws_ranks, mac_ranks, a_bits, w_bits, branch_bits, mac_input, out_dtype,
):  # fmt: skip
    return _dispatch(
        x, perm, smooth, factors, act_clip, w_v, w_t, w_m, ws_v, ws_t, ws_m, l2, l2_scale,
        l1, l1_scale, l4, l4_scale, l3, l3_scale, text_mask, bias, sizes, factor_dims,
        out_splits, cws_ranks, mac_ranks, a_bits, w_bits, branch_bits, mac_input, out_dtype,
    )  # fmt: skip


@site_linear_op.register_fake
def _site_linear_fake(
    x, perm, smooth, factors, act_clip, w_v, w_t, w_m, ws_v, ws_t, ws_m, l2, l2_scale, l1,
    l1_scale, l4, l4_scale, l3, l3_scale, text_mask, bias, sizes, factor_dims, out_splits,
    cws_ranks, mac_ranks, a_bits, w_bits, branch_bits, mac_input, out_dtype,
):  # fmt: skip
    torch._check(x.dim() >= 1, lambda: "splitq::site_linear expects an input (..., d)")
    return x.new_empty((*x.shape[:-1], sum(out_splits)), dtype=out_dtype or x.dtype)


def site_linear(
    x: Tensor, params: SiteParams, text_mask: Tensor | None = None, out_dtype=None
) -> Tensor:
    """Run one site: ``x`` (..., d) untransformed -> (..., D), the site's linears side by side.

    ``text_mask`` (...) bool over the leading dims of ``x`` (True = text token) or None (every
    token is text, as at decode time).
    """
    return torch.ops.splitq.site_linear(
        x, *params.op_args(), text_mask, params.bias, *params.int_args(), out_dtype
    )


# --------------------------------------------------------------------------------------------
# Builders (tests, benchmarks, freezing)
# --------------------------------------------------------------------------------------------
def _pack_branch(
    downs: Sequence[Tensor], ups: Sequence[Tensor], w_bits: int, act_bits: int
) -> SiteBranchParams:
    """Quantize and pack dense per-linear factors ``down_j`` (r_j, km), ``up_j`` (d_j, r_j)."""
    ranks = tuple(int(d.shape[0]) for d in downs)
    rmax = max(ranks)
    d_int, d_scale = quantize_weight_per_channel(torch.cat(list(downs)), w_bits)
    u_codes, u_scales = [], []
    for up in ups:
        q, s = quantize_weight_per_channel(up, w_bits)
        u_codes.append(torch.nn.functional.pad(q, (0, rmax - q.shape[1])))
        u_scales.append(s)
    return SiteBranchParams(
        down=pack_path_weight(d_int, w_bits),
        down_scale=d_scale,
        up=pack_path_weight(torch.cat(u_codes), w_bits),
        up_scale=torch.cat(u_scales),
        ranks=ranks,
        w_bits=int(w_bits),
        act_bits=int(act_bits),
    )


def build_site_params(
    w_paths: Sequence[Tensor],
    out_splits: Sequence[int],
    perm: Tensor,
    smooth: Tensor,
    mats: Sequence[Sequence[Tensor]],
    w_bits: Sequence[int] = (4, 4, 4),
    a_bits: Sequence[int] = (4, 4, 4),
    act_clip: Sequence[float] | Tensor | None = None,
    cws: tuple[Sequence[Tensor], Sequence[Tensor]] | None = None,
    mac: tuple[Sequence[Tensor], Sequence[Tensor]] | None = None,
    branch_bits: tuple[int, int] = (4, 4),
    mac_input: int = 0,
    bias: Tensor | None = None,
) -> SiteParams:
    """Quantize and pack dense transformed path weights (concatenated rows, (D, k_p) each)."""
    packed, scales = [], []
    for w, b in zip(w_paths, w_bits, strict=True):
        q, s = quantize_weight_per_channel(w, b)
        packed.append(pack_path_weight(q, b))
        scales.append(s)
    dev = w_paths[2].device
    clip = torch.ones(3) if act_clip is None else torch.as_tensor(act_clip, dtype=torch.float32)
    factors = [m.float().reshape(-1) for path in mats for m in path]
    params = SiteParams(
        sizes=tuple(int(w.shape[1]) for w in w_paths),
        dims=tuple(tuple(int(m.shape[0]) for m in path) for path in mats),
        out_splits=tuple(int(k) for k in out_splits),
        perm=perm.to(device=dev, dtype=torch.int32),
        smooth=smooth.to(device=dev, dtype=torch.float32),
        factors=torch.cat(factors).to(dev) if factors else torch.zeros(0, device=dev),
        act_clip=clip.to(dev).reshape(3).clone(),
        w_packed=tuple(packed),
        w_scale=tuple(scales),
        w_bits=tuple(int(b) for b in w_bits),
        a_bits=tuple(int(b) for b in a_bits),
        cws=None if cws is None else _pack_branch(*cws, *branch_bits),
        mac=None if mac is None else _pack_branch(*mac, *branch_bits),
        mac_input=int(mac_input),
        bias=bias,
    )
    params.validate()
    return params


def random_site_params(
    out_splits: Sequence[int],
    sizes: Sequence[int],
    dims: Sequence[Sequence[int]] | None = None,
    w_bits: Sequence[int] = (4, 4, 4),
    a_bits: Sequence[int] = (4, 4, 4),
    cws_rank: int = 0,
    mac_rank: int = 0,
    mac_input: int = 0,
    bias: bool = False,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> SiteParams:
    """Random site parameters (for tests and benchmarks): Gaussian weights, random orthogonal
    factors, positive smoothing, a random permutation; branch ranks per linear (0 = none).
    Default factor sides: :func:`splitq_modifier.layout.kron_dims` of each path."""
    from splitq_modifier.layout import kron_dims

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

    def branch(rank: int):
        if rank <= 0:
            return None
        downs = [torch.randn(rank, km, generator=gen) * km**-0.5 for _ in out_splits]
        ups = [torch.randn(int(o), rank, generator=gen) * 0.1 * d**-0.5 for o in out_splits]
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
        mac_input=mac_input,
        bias=torch.randn(big_d, generator=gen) if bias else None,
    )
    return params.to(device)
