"""What the ``splitq-packed`` format records about one SplitQ linear, and the tensors it stores.

Each SplitQ linear is saved under one compressed-tensors ``QuantizationScheme`` whose
``weights.observer_kwargs["splitq"]`` holds a :class:`LinearSpec`: its site (path widths,
bits, Kronecker factor sizes, the output widths and names of the site's linears, branch
ranks), its position in the site, and the format version. The site's first linear (the
owner) stores every tensor of the site; the spec fixes the name, shape and dtype of each
(:meth:`LinearSpec.tensor_shapes`), so they can be checked against the model's own
``nn.Linear`` (``d_out x d_in``, known on the meta model transformers builds before loading)
and against the checkpoint's headers before any weight is read.

Version 3 (this one) stores a site's tensors once, on its owner, with the linears' weights
concatenated along the output dim, each path's weights in the MMA block packing
(``splitq_modifier.runtime.quant.pack_mma_weight``: 64-code blocks laid out for the int8
tensor-core GEMM). Version 2 is the same with the path weights in the dense packing
(``pack_path_weight``); it is still read: :mod:`.load` repacks its path weights when the model
is loaded (:data:`CONVERTED_VERSIONS`). Version 1 (one set of packed weights per linear, sites
linked by aliasing) is no longer read: re-save such a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

from splitq_modifier.runtime.modules import SiteBranch, SplitQSiteLinear
from splitq_modifier.runtime.quant import dense_to_mma

__all__ = [
    "FORMAT_NAME",
    "CONVERTED_VERSIONS",
    "FORMAT_VERSION",
    "SUPPORTED_VERSIONS",
    "SPEC_KEY",
    "SplitQFormatError",
    "BranchSpec",
    "LinearSpec",
    "is_splitq_scheme",
    "upgrade_site_tensors",
]

#: The compressed-tensors format name (``CompressionFormat.splitq_packed``).
FORMAT_NAME = "splitq-packed"
#: Version written by this package.
FORMAT_VERSION = 3
#: Versions this package reads.
SUPPORTED_VERSIONS = (2, 3)
#: Versions read by converting their tensors at load time (version 2: path weights in the
#: dense packing, repacked to the MMA block packing).
CONVERTED_VERSIONS = (2,)
#: Key of the SplitQ spec in ``QuantizationArgs.observer_kwargs``.
SPEC_KEY = "splitq"


class SplitQFormatError(ValueError):
    """A ``splitq-packed`` checkpoint or config that cannot be saved, read or loaded."""


def _version_hint() -> str:
    from splitq_modifier import __version__

    return (
        f"splitq_modifier {__version__} reads splitq-packed format version(s) "
        f"{list(SUPPORTED_VERSIONS)}"
    )


@dataclass(frozen=True)
class BranchSpec:
    """The low-rank branches (CWS or MAC) of a site: rank per linear, bits, MAC input kind."""

    ranks: tuple[int, ...]
    bits: int
    input: str = "residual"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"ranks": list(self.ranks), "bits": self.bits, "input": self.input}


@dataclass(frozen=True)
class LinearSpec:
    """What fixes a SplitQ linear's stored tensors, besides its ``d_out x d_in``.

    :param sizes: path widths ``(k_v, k_t, k_m)`` of its site
    :param weight_bits: weight bits per path
    :param act_bits: activation bits per path (None = not quantized)
    :param factors: side lengths of each path's Kronecker factors
    :param out_splits: output widths of the site's linears, owner first
    :param members: attribute names of the site's linears in their parent, owner first
    :param index: this linear's position in the site (0 = the owner, which stores the tensors)
    :param bias: whether the site stores a (concatenated) bias
    :param cws: the site's CWS branches, or None
    :param mac: the site's MAC branches, or None
    :param vision_token_ids: token ids that marked vision positions during calibration
    :param version: format version
    """

    sizes: tuple[int, int, int]
    weight_bits: tuple[int, int, int]
    act_bits: tuple[int | None, int | None, int | None]
    factors: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    out_splits: tuple[int, ...]
    members: tuple[str, ...]
    index: int = 0
    bias: bool = False
    cws: BranchSpec | None = None
    mac: BranchSpec | None = None
    vision_token_ids: tuple[int, ...] = ()
    version: int = FORMAT_VERSION

    @property
    def site(self) -> str | None:
        """Attribute name of the linear storing this one's site tensors (None: itself)."""
        return None if self.index == 0 else self.members[0]

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_module(cls, module: SplitQSiteLinear) -> LinearSpec:
        """The spec of an in-memory SplitQ linear."""
        o = module.owner

        def branch(b: SiteBranch | None) -> BranchSpec | None:
            return None if b is None else BranchSpec(tuple(b.ranks), b.bits, b.input)

        return cls(
            sizes=tuple(o.sizes),
            weight_bits=tuple(o.w_bits),
            act_bits=tuple(o.a_bits),
            factors=tuple(o.dims),
            out_splits=tuple(o.out_splits),
            members=tuple(o.members),
            index=module.index,
            bias=o.site_bias is not None,
            cws=branch(o.cws),
            mac=branch(o.mac),
            vision_token_ids=() if o.context is None else tuple(o.context.vision_ids),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (stored in ``observer_kwargs["splitq"]``)."""
        return {
            "format": FORMAT_NAME,
            "version": self.version,
            "sizes": list(self.sizes),
            "weight_bits": list(self.weight_bits),
            "act_bits": list(self.act_bits),
            "factors": [list(f) for f in self.factors],
            "out_splits": list(self.out_splits),
            "members": list(self.members),
            "index": self.index,
            "bias": self.bias,
            "cws": None if self.cws is None else self.cws.to_dict(),
            "mac": None if self.mac is None else self.mac.to_dict(),
            "vision_token_ids": list(self.vision_token_ids),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "") -> LinearSpec:
        """Parse :meth:`to_dict`'s form; raise :class:`SplitQFormatError` naming the problem."""
        at = f" ({where})" if where else ""
        if not isinstance(data, dict):
            raise SplitQFormatError(f"splitq-packed spec{at} must be a dict, got {data!r}")
        version = data.get("version")
        if version not in SUPPORTED_VERSIONS:
            raise SplitQFormatError(
                f"unknown splitq-packed format version {version!r}{at}: {_version_hint()}. "
                "Upgrade splitq_modifier to read this checkpoint, or re-save the model with "
                "this version."
            )
        try:

            def branch(d: dict | None) -> BranchSpec | None:
                if d is None:
                    return None
                ranks = tuple(int(r) for r in d["ranks"])
                return BranchSpec(ranks, int(d["bits"]), str(d.get("input", "residual")))

            spec = cls(
                sizes=tuple(int(k) for k in data["sizes"]),
                weight_bits=tuple(int(b) for b in data["weight_bits"]),
                act_bits=tuple(None if b is None else int(b) for b in data["act_bits"]),
                factors=tuple(tuple(int(n) for n in f) for f in data["factors"]),
                out_splits=tuple(int(k) for k in data["out_splits"]),
                members=tuple(str(m) for m in data["members"]),
                index=int(data["index"]),
                bias=bool(data["bias"]),
                cws=branch(data.get("cws")),
                mac=branch(data.get("mac")),
                vision_token_ids=tuple(int(i) for i in data.get("vision_token_ids", ())),
                version=int(version),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SplitQFormatError(f"malformed splitq-packed spec{at}: {e!r} in {data}") from e
        spec.check(where)
        return spec

    def check(self, where: str = "") -> None:
        """Internal consistency (lengths, bit ranges, factor sizes, members, ranks)."""
        at = f" ({where})" if where else ""

        def bad(msg: str) -> SplitQFormatError:
            return SplitQFormatError(f"splitq-packed spec{at}: {msg}")

        if not (len(self.sizes) == len(self.weight_bits) == len(self.act_bits) == 3):
            raise bad("need three paths")
        if len(self.factors) != 3:
            raise bad("need factors for three paths")
        for p, (k, f) in enumerate(zip(self.sizes, self.factors)):
            prod = 1
            for n in f:
                prod *= n
            if k < 0 or (f and prod != k) or len(f) > 3:
                raise bad(f"path {p} of width {k} cannot have Kronecker factors {list(f)}")
        for b in [*self.weight_bits, *(a for a in self.act_bits if a is not None)]:
            if not 2 <= b <= 8:
                raise bad(f"bit width {b} not in [2, 8]")
        if not self.out_splits or len(self.members) != len(self.out_splits):
            raise bad(f"members {list(self.members)} do not match outputs {self.out_splits}")
        if min(self.out_splits) < 1 or not 0 <= self.index < len(self.members):
            raise bad(f"bad outputs {list(self.out_splits)} or index {self.index}")
        for br in (self.cws, self.mac):
            if br is None:
                continue
            if len(br.ranks) != len(self.members) or min(br.ranks) < 1 or not 2 <= br.bits <= 8:
                raise bad(f"bad branch {br}")
        if self.mac is not None and self.mac.input not in ("residual", "act"):
            raise bad(f"bad MAC input {self.mac.input!r}")

    # ------------------------------------------------------------------ schemes
    def scheme(self, targets: list[str]) -> QuantizationScheme:
        """The compressed-tensors scheme recording this spec (main-path bits in the args)."""
        a_main = self.act_bits[2]
        return QuantizationScheme(
            targets=list(targets),
            weights=QuantizationArgs(
                num_bits=self.weight_bits[2],
                type="int",
                symmetric=True,
                strategy="channel",
                dynamic=False,
                observer_kwargs={SPEC_KEY: self.to_dict()},
            ),
            input_activations=None
            if a_main is None
            else QuantizationArgs(
                num_bits=a_main, type="int", symmetric=True, strategy="token", dynamic=True
            ),
            format=FORMAT_NAME,
        )

    @classmethod
    def from_scheme(cls, scheme: QuantizationScheme, where: str = "") -> LinearSpec:
        """The spec recorded in a scheme (raises :class:`SplitQFormatError` if absent)."""
        kwargs = {} if scheme.weights is None else scheme.weights.observer_kwargs
        if SPEC_KEY not in kwargs:
            at = f" ({where})" if where else ""
            raise SplitQFormatError(
                f"scheme{at} has format splitq-packed but no weights.observer_kwargs"
                f"[{SPEC_KEY!r}] entry: the config was not written by splitq_modifier"
            )
        return cls.from_dict(kwargs[SPEC_KEY], where)

    # ------------------------------------------------------------------ tensors
    def tensor_shapes(
        self, d_out: int, d_in: int, where: str = ""
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Local name -> (shape, dtype) of every tensor stored for this ``d_out x d_in``
        linear in this spec's format version: the whole site's for the owner, nothing for the
        other members."""
        at = f" {where}" if where else ""
        if sum(self.sizes) != d_in or self.out_splits[self.index] != d_out:
            raise SplitQFormatError(
                f"splitq-packed linear{at}: the config describes a {self.out_splits[self.index]}"
                f" x {sum(self.sizes)} linear (path widths {list(self.sizes)}), but the model's"
                f" linear is {d_out} x {d_in} (the config does not belong to this model)"
            )
        if self.index:
            return {}
        out = SplitQSiteLinear.tensor_shapes(
            self.sizes, self.factors, self.out_splits, self.weight_bits, self.bias,
            dense_paths=self.version in CONVERTED_VERSIONS,
        )  # fmt: skip
        big_d = sum(self.out_splits)
        for name, br in (("cws", self.cws), ("mac", self.mac)):
            if br is not None:
                shapes = SiteBranch.tensor_shapes(br.ranks, self.sizes[2], big_d, br.bits)
                out.update({f"{name}.{k}": v for k, v in shapes.items()})
        return out

    def build_owner(
        self,
        tensors: dict[str, torch.Tensor],
        out_splits: tuple[int, ...] | None = None,
        context: Any = None,
    ) -> SplitQSiteLinear:
        """The site owner from its stored tensors (local names as :meth:`tensor_shapes`;
        branch tensors as ``cws.*`` / ``mac.*``), converted from this spec's format version
        first; ``out_splits``: this process's rows of the site (tensor parallelism). Raises
        ``ValueError`` on tensors that do not fit the spec."""
        direct = {k: v for k, v in tensors.items() if "." not in k}
        upgrade_site_tensors(direct, self)

        def branch(kind: str, b: BranchSpec | None) -> SiteBranch | None:
            if b is None:
                return None
            ts = [tensors[f"{kind}.{k}"] for k in ("down_packed", "down_scale", "up_packed",
                                                    "up_scale")]  # fmt: skip
            return SiteBranch(*ts, b.ranks, b.bits, b.input)

        return SplitQSiteLinear.owner_from_tensors(
            direct,
            sizes=self.sizes,
            dims=self.factors,
            out_splits=tuple(out_splits or self.out_splits),
            w_bits=self.weight_bits,
            a_bits=self.act_bits,
            members=self.members,
            cws=branch("cws", self.cws),
            mac=branch("mac", self.mac),
            context=context,
        )


def is_splitq_scheme(scheme: Any) -> bool:
    """Whether a QuantizationScheme (or its dict form) uses the splitq-packed format."""
    fmt = scheme.get("format") if isinstance(scheme, dict) else getattr(scheme, "format", None)
    return str(getattr(fmt, "value", fmt)) == FORMAT_NAME


def upgrade_site_tensors(tensors: dict[str, torch.Tensor], spec: LinearSpec) -> None:
    """Convert a site owner's loaded tensors from ``spec.version`` to :data:`FORMAT_VERSION`
    in place (version 2: path weights repacked from the dense to the MMA block packing; the
    branch factors keep the dense packing in every version)."""
    if spec.version not in CONVERTED_VERSIONS:
        return
    for p, k in enumerate(spec.sizes):
        name = f"weight_packed_{p}"
        if int(k) and name in tensors:
            tensors[name] = dense_to_mma(tensors[name], spec.weight_bits[p], int(k))
