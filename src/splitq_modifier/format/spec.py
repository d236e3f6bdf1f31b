"""What the ``splitq-packed`` format records about one SplitQ linear, and the tensors it stores.

Each SplitQ linear is saved under one compressed-tensors ``QuantizationScheme`` whose
``weights.observer_kwargs["splitq"]`` holds a :class:`LinearSpec`: path widths, bits, Kronecker
factor sizes, branch ranks, which sibling holds the site tensors, and the format version.
Together with the shape of the model's own ``nn.Linear`` (``d_out x d_in``, known on the meta
model transformers builds before loading), it fixes the name, shape and dtype of every tensor
the checkpoint must hold for that linear (:meth:`LinearSpec.tensor_shapes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

from splitq_modifier.acc import FrozenLowRankBranch
from splitq_modifier.split_linear import FrozenSplitQLinear

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SUPPORTED_VERSIONS",
    "SPEC_KEY",
    "SplitQFormatError",
    "BranchSpec",
    "LinearSpec",
    "is_splitq_scheme",
]

#: The compressed-tensors format name (``CompressionFormat.splitq_packed``).
FORMAT_NAME = "splitq-packed"
#: Version written by this package.
FORMAT_VERSION = 1
#: Versions this package reads.
SUPPORTED_VERSIONS = (1,)
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
    """A low-rank branch: its rank, bits (factors and activations) and MAC input kind."""

    rank: int
    bits: int
    input: str = "residual"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"rank": self.rank, "bits": self.bits, "input": self.input}

    def tensor_shapes(self, km: int, d_out: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Local name -> (shape, dtype) of the branch tensors."""
        return FrozenLowRankBranch.tensor_shapes(self.rank, km, d_out, self.bits)


@dataclass(frozen=True)
class LinearSpec:
    """Everything, besides ``d_out`` and ``d_in``, that fixes a SplitQ linear's stored tensors.

    :param sizes: path widths ``(k_v, k_t, k_m)``
    :param weight_bits: weight bits per path
    :param act_bits: activation bits per path (None = not quantized)
    :param factors: side lengths of each path's Kronecker factors
    :param site: attribute name of the sibling linear that stores this linear's site tensors
        (``perm``, ``act_clip``, ``smooth_*``, ``factor_*``), or None when it stores them
    :param cws: the CWS branch, or None
    :param mac: the MAC branch, or None
    :param version: format version
    """

    sizes: tuple[int, int, int]
    weight_bits: tuple[int, int, int]
    act_bits: tuple[int | None, int | None, int | None]
    factors: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    site: str | None = None
    cws: BranchSpec | None = None
    mac: BranchSpec | None = None
    version: int = FORMAT_VERSION

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_module(cls, module: FrozenSplitQLinear) -> LinearSpec:
        """The spec of an in-memory linear (its ``site_ref`` decides ``site``)."""

        def branch(b: FrozenLowRankBranch | None) -> BranchSpec | None:
            return None if b is None else BranchSpec(b.rank, b.bits, b.input)

        return cls(
            sizes=tuple(module.sizes),
            weight_bits=tuple(module.weight_bits),
            act_bits=tuple(module.act_bits),
            factors=module.factor_dims(),
            site=module.site_ref,
            cws=branch(module.cws),
            mac=branch(module.mac),
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
            "site": self.site,
            "cws": None if self.cws is None else self.cws.to_dict(),
            "mac": None if self.mac is None else self.mac.to_dict(),
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
            sizes = tuple(int(k) for k in data["sizes"])
            wbits = tuple(int(b) for b in data["weight_bits"])
            abits = tuple(None if b is None else int(b) for b in data["act_bits"])
            factors = tuple(tuple(int(n) for n in f) for f in data["factors"])

            def branch(d: dict | None) -> BranchSpec | None:
                if d is None:
                    return None
                return BranchSpec(int(d["rank"]), int(d["bits"]), str(d.get("input", "residual")))

            spec = cls(
                sizes=sizes,
                weight_bits=wbits,
                act_bits=abits,
                factors=factors,
                site=data.get("site"),
                cws=branch(data.get("cws")),
                mac=branch(data.get("mac")),
                version=int(version),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SplitQFormatError(f"malformed splitq-packed spec{at}: {e!r} in {data}") from e
        spec.check(where)
        return spec

    def check(self, where: str = "") -> None:
        """Internal consistency (lengths, bit ranges, factor sizes)."""
        at = f" ({where})" if where else ""
        if not (len(self.sizes) == len(self.weight_bits) == len(self.act_bits) == 3):
            raise SplitQFormatError(f"splitq-packed spec{at}: need three paths")
        if len(self.factors) != 3:
            raise SplitQFormatError(f"splitq-packed spec{at}: need factors for three paths")
        for p, (k, f) in enumerate(zip(self.sizes, self.factors)):
            prod = 1
            for n in f:
                prod *= n
            if k < 0 or (f and prod != k):
                raise SplitQFormatError(
                    f"splitq-packed spec{at}: path {p} of width {k} cannot have Kronecker "
                    f"factors {list(f)}"
                )
        for b in [*self.weight_bits, *(a for a in self.act_bits if a is not None)]:
            if not 2 <= b <= 8:
                raise SplitQFormatError(f"splitq-packed spec{at}: bit width {b} not in [2, 8]")
        for br in (self.cws, self.mac):
            if br is not None and (br.rank < 1 or not 2 <= br.bits <= 8):
                raise SplitQFormatError(f"splitq-packed spec{at}: bad branch {br}")
        if self.mac is not None and self.mac.input not in ("residual", "act"):
            raise SplitQFormatError(f"splitq-packed spec{at}: bad MAC input {self.mac.input!r}")

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
        """Local name -> (shape, dtype) of every tensor stored for a ``d_out x d_in`` linear
        (besides its ``bias``, which the model's own linear defines)."""
        if sum(self.sizes) != d_in:
            at = f" {where}" if where else ""
            raise SplitQFormatError(
                f"splitq-packed linear{at}: path widths {list(self.sizes)} sum to "
                f"{sum(self.sizes)}, but the model's linear has {d_in} input features (the "
                "config does not belong to this model architecture)"
            )
        out = FrozenSplitQLinear.tensor_shapes(
            self.sizes, self.weight_bits, d_out, self.factors, site_tensors=self.site is None
        )
        for name, br in (("cws", self.cws), ("mac", self.mac)):
            if br is not None:
                for k, v in br.tensor_shapes(self.sizes[2], d_out).items():
                    out[f"{name}.{k}"] = v
        return out


def is_splitq_scheme(scheme: Any) -> bool:
    """Whether a QuantizationScheme (or its dict form) uses the splitq-packed format."""
    fmt = scheme.get("format") if isinstance(scheme, dict) else getattr(scheme, "format", None)
    return str(getattr(fmt, "value", fmt)) == FORMAT_NAME
