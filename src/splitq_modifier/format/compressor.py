"""The ``splitq-packed`` compressor, registered with compressed-tensors' ``BaseCompressor``.

A SplitQ linear is already stored in its compressed form in memory
(:class:`~splitq_modifier.runtime.SplitQSiteLinear`: the site's owner holds packed int32 codes,
scales and fixed transforms of the whole site), so compressing it changes no tensor:
:meth:`SplitQPackedCompressor.compress` checks the tensors against the scheme's spec and keeps
the ones the format stores. Its other job is the load path: transformers first builds the
model on the meta device, lets compressed-tensors attach the schemes to the plain
``nn.Linear`` modules and compresses that empty model, so ``compress`` turns a meta
``weight`` into meta tensors of every stored name and shape (derived from the scheme alone:
the whole site's on the owner, none on the other members, whose weight and bias live in the
owner's concatenated tensors); the checkpoint is then loaded into them, and
:mod:`splitq_modifier.format.load` swaps the modules for ``SplitQSiteLinear``.
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors.base import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme, QuantizationStatus
from compressed_tensors.utils import get_direct_state_dict, replace_direct_state_dict
from torch import nn

from splitq_modifier.format.spec import FORMAT_NAME, LinearSpec, SplitQFormatError
from splitq_modifier.runtime.modules import SplitQSiteLinear

__all__ = ["SplitQPackedCompressor", "BranchHolder"]

#: compressed-tensors' own per-module quantization parameters, dropped by ``compress``.
_CT_QPARAM_PREFIXES = ("weight_scale", "weight_zero_point", "weight_global_scale", "weight_g_idx")
_CT_QPARAM_PREFIXES += ("input_", "output_")


class BranchHolder(nn.Module):
    """Holds a low-rank branch's tensors on a not-yet-converted ``nn.Linear`` during loading."""


class SplitQPackedCompressor(BaseCompressor):
    """``splitq-packed``: per-path packed int weights, scales, site transforms and branches.

    See ``docs/format.md`` for the tensors. Only :class:`SplitQSiteLinear` modules (made by
    ``SplitQModifier``) can be compressed into this format; there is no dense equivalent to
    decompress to, because activations are transformed and quantized online.
    """

    @classmethod
    def compression_param_names(cls, scheme: QuantizationScheme) -> tuple[str, ...]:
        """Local names of the tensors stored for a linear with this scheme (besides bias)."""
        spec = LinearSpec.from_scheme(scheme)
        return tuple(spec.tensor_shapes(1, sum(spec.sizes)))

    @classmethod
    def compress(
        cls, state_dict: dict[str, torch.Tensor], scheme: QuantizationScheme
    ) -> dict[str, torch.Tensor]:
        """The stored tensors of one SplitQ linear (local names; branch tensors as ``cws.*``).

        - A meta ``weight`` (transformers' empty model before loading): meta tensors of every
          stored name, shape and dtype, derived from the scheme and the weight's shape (the
          linear's own ``bias`` is dropped: the site stores a concatenated ``site_bias``).
        - The tensors of a ``SplitQSiteLinear`` (``weight_packed_*`` ...): checked against
          the scheme and returned as they are (they are already packed).
        - A real dense ``weight``: an error (SplitQ weights come from calibration).
        """
        spec = LinearSpec.from_scheme(scheme)
        state = dict(state_dict)  # may hold None entries (a linear without bias): kept as is
        weight = state.get("weight")
        if weight is not None:
            if weight.device.type != "meta":
                raise SplitQFormatError(
                    "a dense weight cannot be compressed to splitq-packed: SplitQ linears are "
                    "produced by SplitQModifier (oneshot), which leaves SplitQSiteLinear "
                    "modules that are saved as they are"
                )
            d_out, d_in = weight.shape
            out = {
                k: v
                for k, v in state.items()
                if k not in ("weight", "bias") and not k.startswith(_CT_QPARAM_PREFIXES)
            }
            for name, (shape, dtype) in spec.tensor_shapes(d_out, d_in).items():
                out[name] = torch.empty(shape, dtype=dtype, device="meta")
            return out
        expected = spec.tensor_shapes(spec.out_splits[spec.index], sum(spec.sizes))
        out = {}
        for name, (shape, dtype) in expected.items():
            t = state.get(name)
            if t is None:
                raise SplitQFormatError(f"splitq-packed compress: missing tensor {name!r}")
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise SplitQFormatError(
                    f"splitq-packed compress: {name!r} is {t.dtype} {tuple(t.shape)}, the "
                    f"scheme expects {dtype} {shape}"
                )
            out[name] = t
        return out

    @classmethod
    def decompress(
        cls, state_dict: dict[str, torch.Tensor], scheme: QuantizationScheme
    ) -> dict[str, torch.Tensor]:
        """Identity: the packed tensors are the runtime form (the ``splitq::site_linear`` op reads
        them), and no dense ``nn.Linear`` weight reproduces a SplitQ linear."""
        LinearSpec.from_scheme(scheme)
        return dict(state_dict)

    @classmethod
    def compress_module(cls, module: nn.Module) -> None:
        """Compress in place: a ``SplitQSiteLinear`` is checked and marked compressed (its
        tensors already are the stored form); a meta ``nn.Linear`` (load path) gets the stored
        tensors as empty meta parameters, branch tensors in ``cws`` / ``mac`` children."""
        scheme = module.quantization_scheme
        if isinstance(module, SplitQSiteLinear):
            state = get_direct_state_dict(module)
            for name in ("cws", "mac"):
                child = getattr(module, name, None) if module.is_owner else None
                if child is not None:
                    state.update({f"{name}.{k}": v for k, v in child.state_dict().items()})
            cls.compress(state, scheme)
            module.quantization_status = QuantizationStatus.COMPRESSED
            return
        compressed = cls.compress(get_direct_state_dict(module), scheme)
        direct = {k: v for k, v in compressed.items() if "." not in k}
        replace_direct_state_dict(module, direct)
        if "bias" not in module._parameters:  # the site stores a concatenated bias instead
            module.register_parameter("bias", None)
        for name in ("cws", "mac"):
            sub = {k.split(".", 1)[1]: v for k, v in compressed.items() if k.startswith(name + ".")}
            if sub:
                holder = BranchHolder()
                for k, v in sub.items():
                    holder.register_parameter(k, nn.Parameter(v, requires_grad=False))
                setattr(module, name, holder)
        module.quantization_status = QuantizationStatus.COMPRESSED

    @classmethod
    def decompress_module(cls, module: nn.Module) -> None:
        """No-op on a ``SplitQSiteLinear`` (it runs from the packed tensors); an error on a
        linear that was loaded but never converted (the package's loader did not run)."""
        if isinstance(module, SplitQSiteLinear):
            return
        raise SplitQFormatError(
            "a splitq-packed linear was not converted to SplitQSiteLinear after loading: "
            "`import splitq_modifier` before calling from_pretrained (it registers the loader)"
        )

    @classmethod
    def can_compress(cls, module_type: type, scheme: QuantizationScheme) -> bool:
        """Matches SplitQ linears only."""
        return isinstance(module_type, type) and issubclass(module_type, SplitQSiteLinear)


def register_compressor() -> type[SplitQPackedCompressor]:
    """Register :class:`SplitQPackedCompressor` under ``splitq-packed`` (idempotent)."""
    try:
        existing = BaseCompressor.get_value_from_registry(FORMAT_NAME)
    except (KeyError, ValueError):
        existing = None
    if existing is None:
        BaseCompressor.register(name=FORMAT_NAME)(SplitQPackedCompressor)
    return BaseCompressor.get_value_from_registry(FORMAT_NAME)
