"""The parameters of one SplitQ activation site: one object across the runtime.

:class:`SiteParams` is what the reference, the Triton kernels, the runtime modules, the
format and the vLLM layers pass around. It becomes plain tensors and integers only at the
boundary of the ``torch.ops.splitq.site_linear`` custom op (:meth:`SiteParams.to_op` /
:meth:`SiteParams.from_op`), which cannot take Python objects: the tensors travel as one
``list[Tensor]`` and every integer (widths, factor sides, ranks, bits) as one ``list[int]``.

A *site* is one input shared by ``M`` linears (q/k/v, gate/up, or a single o/down
projection). Their weights are concatenated along the output dim (``D = sum(out_splits)``
rows), as in vLLM's fused qkv / gate-up layers, so a site runs as one transform-and-quantize
pass plus one GEMM. Paths are always in the order vision-outlier, text-outlier, main.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from splitq_modifier.runtime.quant import (
    mma_weight_words,
    pack_mma_weight,
    pack_path_weight,
    packed_words,
    qmax_of,
    quantize_weight_per_channel,
)

__all__ = [
    "UNQUANTIZED",
    "SiteBranchParams",
    "SiteParams",
    "build_site_params",
    "flatten_factor_dims",
    "split_factors",
]

#: Activation bits that mean "not quantized" (weight-only SplitQ).
UNQUANTIZED = 16
#: Version of the op's integer encoding (first entry of :meth:`SiteParams.to_op`'s list).
_OP_META_VERSION = 1


def flatten_factor_dims(dims: Sequence[Sequence[int]]) -> list[int]:
    """Per-path factor sides -> 9 entries (3 slots per path, 0 = absent)."""
    out = []
    for p in range(3):
        f = [int(n) for n in dims[p]]
        if len(f) > 3:
            raise ValueError(f"path {p} has {len(f)} Kronecker factors; at most 3 are supported")
        out += f + [0] * (3 - len(f))
    return out


def split_factors(factors: Tensor, dims: Sequence[Sequence[int]]) -> list[list[Tensor]]:
    """Views of the flat ``factors`` tensor as per-path lists of square matrices."""
    out, off = [], 0
    for path in dims:
        mats = []
        for n in path:
            mats.append(factors[off : off + n * n].view(n, n))
            off += n * n
        out.append(mats)
    if off != factors.numel():
        raise ValueError(f"factors holds {factors.numel()} values, the factor sides need {off}")
    return out


@dataclass
class SiteBranchParams:
    """The low-rank branch (CWS or MAC) of every linear of a site, concatenated.

    Attributes:
        down: packed int32 (R, ceil(km * w_bits / 32)): the down factors of the linears,
            their ranks stacked (``R = sum(ranks)``).
        down_scale: fp32 (R,).
        up: packed int32 (D, ceil(max(ranks) * w_bits / 32)): row ``o`` of linear ``j`` holds
            its ``ranks[j]`` codes (zero codes after them).
        up_scale: fp32 (D,).
        ranks: rank of each linear's branch.
        w_bits: bits of the factors; act_bits: bits of the branch's hidden activations.
    """

    down: Tensor
    down_scale: Tensor
    up: Tensor
    up_scale: Tensor
    ranks: tuple[int, ...]
    w_bits: int = 4
    act_bits: int = 4

    def tensors(self) -> list[Tensor]:
        """``[down, down_scale, up, up_scale]``."""
        return [self.down, self.down_scale, self.up, self.up_scale]

    def to(self, device: torch.device | str) -> SiteBranchParams:
        """A copy with every tensor on ``device``."""
        down, down_scale, up, up_scale = (t.to(device) for t in self.tensors())
        return replace(self, down=down, down_scale=down_scale, up=up, up_scale=up_scale)


@dataclass
class SiteParams:
    """Everything a site needs at runtime besides its input and text mask.

    Attributes:
        sizes: path widths ``(kv, kt, km)``; ``d = sum(sizes)``.
        dims: Kronecker factor sides per path (``()`` = no factor, the path is only smoothed).
        out_splits: output widths of the site's linears; ``D = sum(out_splits)``.
        perm: int32 (d,): input channel of each position in path order.
        smooth: fp32 (d,): smoothing scale, path order.
        factors: fp32 flat: the factors of path 0, then 1, then 2, each row-major.
        act_clip: fp32 (3,): activation clipping ratio per path.
        w_packed / w_scale: per path, the int32 weights (D, mma_weight_words(k_p, w_bits_p))
            of the linears concatenated along the output dim, in the MMA block packing
            (:func:`~splitq_modifier.runtime.quant.pack_mma_weight`), and their fp32 (D,)
            scales.
        w_bits / a_bits: weight and activation bits per path (a_bits 16 = not quantized).
        cws / mac: optional branches; mac_input: 0 = the MAC branch reads the activation
            quantization residual, 1 = the quantized activation.
        bias: fp32 (D,) or None.
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

    @property
    def d_in(self) -> int:
        """Input width."""
        return int(sum(self.sizes))

    @property
    def d_out(self) -> int:
        """Total output width (all linears)."""
        return int(sum(self.out_splits))

    @property
    def quantized(self) -> bool:
        """Whether activations are quantized (False: a weight-only site)."""
        return int(self.a_bits[2]) < UNQUANTIZED

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        """Start of each path and the end: ``(0, kv, kv + kt, d)``."""
        kv, kt, km = (int(k) for k in self.sizes)
        return 0, kv, kv + kt, kv + kt + km

    def factor_mats(self) -> list[list[Tensor]]:
        """The Kronecker factors of each path as square matrices (views of ``factors``)."""
        return split_factors(self.factors, self.dims)

    def tensors(self) -> list[Tensor]:
        """Every tensor, in the order of :meth:`to_op` (absent branches and bias left out)."""
        ts = [self.perm, self.smooth, self.factors, self.act_clip, *self.w_packed, *self.w_scale]
        for br in (self.cws, self.mac):
            if br is not None:
                ts += br.tensors()
        if self.bias is not None:
            ts.append(self.bias)
        return ts

    def to(self, device: torch.device | str) -> SiteParams:
        """A copy with every tensor on ``device``."""
        return SiteParams.from_op([t.to(device) for t in self.tensors()], self.to_op()[1])

    # ---------------------------------------------------------------- the op boundary
    def to_op(self) -> tuple[list[Tensor], list[int]]:
        """``(tensors, meta)``: the op's two arguments besides the input, mask and dtype.

        ``meta`` = ``[version, M, has_cws, has_mac, has_bias, mac_input, *sizes,
        *factor sides (9, see :func:`flatten_factor_dims`), *w_bits, *a_bits, *out_splits
        (M), then per present branch: *ranks (M), w_bits, act_bits]``.
        """
        m = len(self.out_splits)
        meta = [_OP_META_VERSION, m, int(self.cws is not None), int(self.mac is not None),
                int(self.bias is not None), int(self.mac_input), *map(int, self.sizes),
                *flatten_factor_dims(self.dims), *map(int, self.w_bits), *map(int, self.a_bits),
                *map(int, self.out_splits)]  # fmt: skip
        for br in (self.cws, self.mac):
            if br is not None:
                meta += [*map(int, br.ranks), int(br.w_bits), int(br.act_bits)]
        return self.tensors(), meta

    @classmethod
    def from_op(cls, tensors: Sequence[Tensor], meta: Sequence[int]) -> SiteParams:
        """Inverse of :meth:`to_op` (no copies; works on fake tensors)."""
        meta = [int(v) for v in meta]
        if not meta or meta[0] != _OP_META_VERSION:
            raise ValueError(f"splitq::site_linear meta version {meta[:1]} is not supported")
        m, has_cws, has_mac, has_bias, mac_input = meta[1:6]
        sizes = tuple(meta[6:9])
        fd = meta[9:18]
        dims = tuple(tuple(n for n in fd[3 * p : 3 * p + 3] if n) for p in range(3))
        w_bits, a_bits = tuple(meta[18:21]), tuple(meta[21:24])
        out_splits = tuple(meta[24 : 24 + m])
        pos, ts = 24 + m, list(tensors)
        branches = []
        for present in (has_cws, has_mac):
            if not present:
                branches.append(None)
                continue
            ranks = tuple(meta[pos : pos + m])
            branches.append(SiteBranchParams(*ts[10:14], ranks, meta[pos + m], meta[pos + m + 1]))
            pos += m + 2
            del ts[10:14]
        return cls(sizes=sizes, dims=dims, out_splits=out_splits, perm=ts[0], smooth=ts[1],
                   factors=ts[2], act_clip=ts[3], w_packed=tuple(ts[4:7]),
                   w_scale=tuple(ts[7:10]), w_bits=w_bits, a_bits=a_bits, cws=branches[0],
                   mac=branches[1], mac_input=mac_input,
                   bias=ts[10] if has_bias else None)  # fmt: skip

    # ---------------------------------------------------------------- checks and sizes
    def validate(self) -> None:
        """Check shapes, dtypes and bit widths; ``ValueError`` naming the first mismatch."""
        d, big_d = self.d_in, self.d_out
        if len(self.sizes) != 3 or any(int(k) < 0 for k in self.sizes):
            raise ValueError(f"sizes must be three non-negative ints, got {self.sizes}")
        want_f = sum(n * n for n in flatten_factor_dims(self.dims))
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
            words = mma_weight_words(int(k), int(self.w_bits[p]))
            checks.append((f"w_packed[{p}]", self.w_packed[p], torch.int32, (big_d, words)))
            checks.append((f"w_scale[{p}]", self.w_scale[p], torch.float32, (big_d,)))
        for name, br in (("cws", self.cws), ("mac", self.mac)):
            if br is None:
                continue
            if len(br.ranks) != len(self.out_splits) or min(br.ranks) < 1:
                raise ValueError(f"{name}: need one rank >= 1 per linear, got {br.ranks}")
            qmax_of(br.w_bits)
            qmax_of(br.act_bits)
            r, rmax, km = sum(br.ranks), max(br.ranks), int(self.sizes[2])
            checks += [
                (f"{name}.down", br.down, torch.int32, (r, packed_words(km, br.w_bits))),
                (f"{name}.down_scale", br.down_scale, torch.float32, (r,)),
                (f"{name}.up", br.up, torch.int32, (big_d, packed_words(rmax, br.w_bits))),
                (f"{name}.up_scale", br.up_scale, torch.float32, (big_d,)),
            ]
        if self.bias is not None:
            checks.append(("bias", self.bias, torch.float32, (big_d,)))
        for name, t, dtype, shape in checks:
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(
                    f"{name} must be {dtype} {tuple(shape)}, got {t.dtype} {tuple(t.shape)}"
                )
        if self.mac_input not in (0, 1):
            raise ValueError(f"mac_input must be 0 or 1, got {self.mac_input}")
        quant = [int(b) < UNQUANTIZED for b in self.a_bits]
        if any(quant) and not all(quant):
            raise ValueError(f"activation bits must all be quantized or all 16: {self.a_bits}")
        for b in self.a_bits:
            if int(b) < UNQUANTIZED:
                qmax_of(b)

    def weight_bytes(self) -> int:
        """Bytes of every stored tensor (codes, scales, transforms, branches, bias)."""
        return int(sum(t.numel() * t.element_size() for t in self.tensors()))


# --------------------------------------------------------------------------------------------
# Building from dense tensors (freezing tools, tests, benchmarks)
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
    """Quantize and pack dense transformed path weights (concatenated rows, (D, k_p) each).

    ``mats``: per path, its Kronecker factors (square matrices); ``cws`` / ``mac``: per
    linear, the dense ``(down, up)`` factors of its branch; ``branch_bits``: (factor bits,
    hidden activation bits) of both branches.
    """
    packed, scales = [], []
    for w, b in zip(w_paths, w_bits, strict=True):
        q, s = quantize_weight_per_channel(w, b)
        packed.append(pack_mma_weight(q, b))
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
        bias=None if bias is None else bias.float(),
    )
    params.validate()
    return params
