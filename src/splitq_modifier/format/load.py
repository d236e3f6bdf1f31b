"""Loading ``splitq-packed`` checkpoints with transformers' ``from_pretrained``.

transformers 5 loads compressed-tensors checkpoints through ``CompressedTensorsHfQuantizer``
(``transformers.quantizers.quantizer_compressed_tensors``):

1. ``_process_model_before_weight_loading``: on the meta model, compressed-tensors'
   ``apply_quantization_config`` attaches each config group's scheme to the modules its
   targets match, and ``ModelCompressor.compress_model`` compresses the empty model, which
   gives every module the parameter names and shapes of its stored form
   (:class:`~splitq_modifier.format.compressor.SplitQPackedCompressor` derives them from the
   scheme); it also registers a forward pre-hook that decompresses the model on its first
   forward;
2. the checkpoint tensors are loaded into those parameters;
3. ``_process_model_after_weight_loading`` decompresses at once only if ``dequantize=True``.

Nothing there ever runs a custom forward, so ``import splitq_modifier`` replaces the
``"compressed-tensors"`` entry of ``transformers.quantizers.auto.AUTO_QUANTIZER_MAPPING`` with
:class:`SplitQCompressedTensorsHfQuantizer`, a subclass that behaves exactly like its parent
for checkpoints without SplitQ groups and, for ``splitq-packed`` ones:

- rejects an unknown format version when the config is read (before any weight is touched);
- before loading, checks the checkpoint's tensor names, shapes and dtypes (safetensors
  headers) against what the config's specs require, and fails naming the tensor;
- after loading, swaps each loaded linear for a :class:`FrozenSplitQLinear` built from the
  packed tensors (no dense weight is materialised), aliases site tensors of linears that
  share a site, re-attaches the modality-context hook (vision token ids from the config via
  :mod:`splitq_modifier.arch`), then decompresses the model's *other* compressed modules as
  usual (at load rather than on the first forward) and removes the decompress hook.
"""

from __future__ import annotations

import os

import torch
from compressed_tensors.quantization import QuantizationStatus
from torch import nn
from transformers.quantizers import auto as hf_auto
from transformers.quantizers.quantizer_compressed_tensors import CompressedTensorsHfQuantizer

from splitq_modifier.acc import FrozenLowRankBranch
from splitq_modifier.arch import get_arch, vision_token_ids
from splitq_modifier.format.spec import (
    FORMAT_NAME,
    LinearSpec,
    SplitQFormatError,
    is_splitq_scheme,
)
from splitq_modifier.split_linear import FrozenSplitQLinear, ModalityContext

__all__ = [
    "SplitQCompressedTensorsHfQuantizer",
    "check_checkpoint",
    "convert_loaded_model",
    "install_loader",
]

_FIX = (
    "The checkpoint's weights do not match its config.json: it is incomplete, corrupt, or "
    "the files come from different saves. Re-save the quantized model with "
    "model.save_pretrained(dir, save_compressed=True)."
)


def _splitq_modules(model: nn.Module) -> list[tuple[str, nn.Module, LinearSpec]]:
    out = []
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and is_splitq_scheme(scheme):
            out.append((name, module, LinearSpec.from_scheme(scheme, where=name)))
    return out


def _expected(module: nn.Module, spec: LinearSpec, name: str) -> dict:
    if isinstance(module, FrozenSplitQLinear):
        d_out, d_in = module.out_features, module.in_features
    else:
        d_out, d_in = module.out_features, module.in_features
    return spec.tensor_shapes(d_out, d_in, where=name)


def _header_shapes(checkpoint_files: list[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in checkpoint_files:
        if not str(file).endswith(".safetensors"):
            return {}
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                shapes[key] = (tuple(sl.get_shape()), sl.get_dtype())
    return shapes


_DTYPE_NAMES = {torch.int32: "I32", torch.float32: "F32"}


def _checkpoint_key(model: nn.Module, key: str) -> str:
    from compressed_tensors.quantization.quant_config import _map_to_checkpoint_names

    return _map_to_checkpoint_names(model, [key])[0]


def check_checkpoint(model: nn.Module, checkpoint_files: list[str] | None) -> None:
    """Check the checkpoint holds every splitq-packed tensor with the shape and dtype the
    config requires; raise :class:`SplitQFormatError` naming the tensors otherwise.

    Reads only the safetensors headers. Does nothing without safetensors files.
    """
    if not checkpoint_files:
        return
    header = _header_shapes([str(f) for f in checkpoint_files])
    if not header:
        return
    where = os.path.dirname(str(checkpoint_files[0]))
    problems = []
    for name, module, spec in _splitq_modules(model):
        for local, (shape, dtype) in _expected(module, spec, name).items():
            key = _checkpoint_key(model, f"{name}.{local}")
            if key not in header:
                problems.append(
                    f"tensor {key!r} is missing (expected {dtype} {shape} for splitq spec "
                    f"sizes={list(spec.sizes)} weight_bits={list(spec.weight_bits)})"
                )
                continue
            got_shape, got_dtype = header[key]
            if got_shape != shape or got_dtype != _DTYPE_NAMES.get(dtype, got_dtype):
                problems.append(
                    f"tensor {key!r} is {got_dtype} {got_shape} in the checkpoint, but the "
                    f"splitq spec in config.json (sizes={list(spec.sizes)}, "
                    f"weight_bits={list(spec.weight_bits)}, cws={spec.cws}, mac={spec.mac}) "
                    f"requires {_DTYPE_NAMES.get(dtype, dtype)} {shape}"
                )
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise SplitQFormatError(
            f"splitq-packed checkpoint {where}: " + "; ".join(problems[:3]) + more + ". " + _FIX
        )


def _tensor(module: nn.Module, local: str, shape, dtype, where: str) -> torch.Tensor:
    owner, _, attr = local.rpartition(".")
    holder = module.get_submodule(owner) if owner else module
    t = getattr(holder, attr, None)
    if t is None or t.device.type == "meta":
        raise SplitQFormatError(
            f"splitq-packed linear {where}: tensor {local!r} was not loaded from the "
            f"checkpoint (expected {dtype} {shape}). {_FIX}"
        )
    t = t.data if isinstance(t, nn.Parameter) else t
    if tuple(t.shape) != tuple(shape):
        raise SplitQFormatError(
            f"splitq-packed linear {where}: tensor {local!r} has shape {tuple(t.shape)}, "
            f"expected {shape}. {_FIX}"
        )
    if t.dtype != dtype:
        if dtype == torch.int32 or not t.is_floating_point():
            raise SplitQFormatError(
                f"splitq-packed linear {where}: tensor {local!r} is {t.dtype}, expected "
                f"{dtype}. {_FIX}"
            )
        t = t.to(dtype)  # a float tensor cast by a `dtype=` load argument
    return t


def _branch(module: nn.Module, prefix: str, spec, d_out: int, km: int, where: str):
    if spec is None:
        return None
    shapes = spec.tensor_shapes(km, d_out)
    ts = {k: _tensor(module, f"{prefix}.{k}", *shapes[k], where) for k in shapes}
    return FrozenLowRankBranch.from_packed(
        ts["down_packed"],
        ts["down_scale"],
        ts["up_packed"],
        ts["up_scale"],
        bits=spec.bits,
        input=spec.input,
        in_features=km,
    )


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), parent_name, attr


def convert_loaded_model(model: nn.Module, context: ModalityContext | None = None) -> int:
    """Swap every loaded splitq-packed linear for a :class:`FrozenSplitQLinear` running from
    its packed tensors, and attach the modality-context hook. Returns the number swapped."""
    from splitq_modifier.modifier import attach_modality_context

    context = context if context is not None else ModalityContext()
    todo = [
        (n, m, s) for n, m, s in _splitq_modules(model) if not isinstance(m, FrozenSplitQLinear)
    ]
    todo.sort(key=lambda item: item[2].site is not None)  # site owners first
    for name, module, spec in todo:
        d_out, d_in = module.out_features, module.in_features
        expected = spec.tensor_shapes(d_out, d_in, where=name)
        direct = {k: v for k, v in expected.items() if "." not in k}
        tensors = {k: _tensor(module, k, *v, name) for k, v in direct.items()}
        parent, parent_name, attr = _parent(model, name)
        owner = None
        if spec.site is not None:
            owner = getattr(parent, spec.site, None)
            if not isinstance(owner, FrozenSplitQLinear):
                raise SplitQFormatError(
                    f"splitq-packed linear {name}: its site tensors are stored on sibling "
                    f"{spec.site!r}, which is not a splitq-packed linear in {parent_name!r}. "
                    f"{_FIX}"
                )
        bias = getattr(module, "bias", None)
        new = FrozenSplitQLinear.from_packed(
            tensors,
            sizes=spec.sizes,
            act_bits=spec.act_bits,
            weight_bits=spec.weight_bits,
            out_features=d_out,
            num_factors=tuple(len(f) for f in spec.factors),
            bias=None if bias is None else bias.data,
            cws=_branch(module, "cws", spec.cws, d_out, spec.sizes[2], name),
            mac=_branch(module, "mac", spec.mac, d_out, spec.sizes[2], name),
            context=context,
            site_owner=owner,
            site_ref=spec.site,
        )
        new.quantization_scheme = module.quantization_scheme
        new.quantization_status = QuantizationStatus.COMPRESSED
        new.train(module.training)
        setattr(parent, attr, new)
    config = getattr(model, "config", None)
    if todo and config is not None and hasattr(model, "get_input_embeddings"):
        ids = vision_token_ids(config, get_arch(config))
        attach_modality_context(model, ids, context)
    return len(todo)


class SplitQCompressedTensorsHfQuantizer(CompressedTensorsHfQuantizer):
    """transformers' compressed-tensors quantizer, plus the ``splitq-packed`` load path.

    Identical to :class:`CompressedTensorsHfQuantizer` for checkpoints without splitq-packed
    config groups.
    """

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.splitq_specs: dict[str, LinearSpec] = {}
        ct_config = self.compressor.quantization_config
        if ct_config is not None:
            for group, scheme in ct_config.config_groups.items():
                if is_splitq_scheme(scheme):
                    where = f"quantization_config.config_groups[{group!r}]"
                    self.splitq_specs[group] = LinearSpec.from_scheme(scheme, where=where)
        if self.splitq_specs and getattr(quantization_config, "dequantize", False):
            raise SplitQFormatError(
                f"{FORMAT_NAME} linears cannot be dequantized to dense nn.Linear weights "
                "(their activations are transformed and quantized online): load without "
                "dequantize=True / run_compressed=False"
            )

    def _process_model_before_weight_loading(self, model, **kwargs):
        super()._process_model_before_weight_loading(model, **kwargs)
        if self.splitq_specs:
            check_checkpoint(model, kwargs.get("checkpoint_files"))

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.splitq_specs:
            return super()._process_model_after_weight_loading(model, **kwargs)
        convert_loaded_model(model)
        # the model's other compressed modules (e.g. a pack-quantized lm_head): decompress as
        # compressed-tensors does on the first forward (SplitQ linears are left as they are);
        # this also removes the decompress-on-first-forward hook
        self.compressor.decompress_model(model)
        return model


def install_loader() -> None:
    """Route transformers' ``compressed-tensors`` checkpoints through
    :class:`SplitQCompressedTensorsHfQuantizer` (idempotent)."""
    current = hf_auto.AUTO_QUANTIZER_MAPPING.get("compressed-tensors")
    if current is not None and issubclass(current, SplitQCompressedTensorsHfQuantizer):
        return
    hf_auto.AUTO_QUANTIZER_MAPPING["compressed-tensors"] = SplitQCompressedTensorsHfQuantizer
