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
:class:`SplitQCompressedTensorsHfQuantizer` (:mod:`splitq_modifier.integrations`), a subclass
that behaves exactly like its parent for checkpoints without SplitQ groups and, for
``splitq-packed`` ones:

- rejects an unknown format version when the config is read (before any weight is touched);
- before loading, checks each SplitQ config group against the model's linears, each
  safetensors file against its header (truncation), and the checkpoint's tensor names, shapes
  and dtypes against what the config's specs require (missing, extra, mis-shaped tensors),
  failing naming the file, module and tensor (:mod:`.validate`);
- after loading, checks the values of each site's tensors (``perm`` a permutation, finite
  scales and factors, ...) before the model is returned;
- converts an older format version it still reads (version 2: path weights repacked from
  the dense packing to the MMA block packing, :func:`upgrade_site_tensors`), and records the
  current version in the loaded model's schemes and config, so that saving it again writes
  a current checkpoint;
- after loading, swaps each loaded linear for a :class:`SplitQSiteLinear` built from the
  packed tensors (no dense weight is materialised; a site's owner holds its tensors, the
  other members point at it), re-attaches the modality-context hook (with the vision token ids
  recorded in the specs at save time), then decompresses the model's *other* compressed modules as
  usual (at load rather than on the first forward) and removes the decompress hook.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationStatus
from torch import nn
from transformers.quantizers.quantizer_compressed_tensors import CompressedTensorsHfQuantizer
from transformers.utils.quantization_config import CompressedTensorsConfig

from splitq_modifier.format.spec import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SPEC_KEY,
    LinearSpec,
    SplitQFormatError,
    is_splitq_scheme,
)
from splitq_modifier.format.validate import (
    check_model_against_specs,
    describe_problems,
    read_safetensors_header,
    site_value_problems,
)
from splitq_modifier.runtime.modules import (
    ModalityContext,
    SplitQSiteLinear,
    attach_modality_context,
)

__all__ = [
    "SplitQCompressedTensorsHfQuantizer",
    "check_checkpoint",
    "convert_loaded_model",
    "upgrade_config_versions",
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
    return spec.tensor_shapes(module.out_features, module.in_features, where=name)


def _header_shapes(checkpoint_files: list[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of every tensor of the checkpoint's safetensors files (each file
    checked for truncation first); empty when a file is not safetensors."""
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in checkpoint_files:
        if not str(file).endswith(".safetensors"):
            return {}
        shapes.update(read_safetensors_header(str(file)))
    return shapes


def _owning_module(key: str, names: set[str]) -> str | None:
    """The SplitQ module (in ``names``) a tensor key belongs to: its own parent or, for a
    branch tensor (``...q_proj.cws.up_packed``), its grandparent."""
    parent = key.rpartition(".")[0]
    if parent in names:
        return parent
    grand = parent.rpartition(".")[0]
    return grand if grand in names else None


_DTYPE_NAMES = {torch.int32: "I32", torch.float32: "F32"}


def check_checkpoint(
    model: nn.Module, checkpoint_files: list[str] | None, hf_quantizer: Any = None
) -> None:
    """Check the checkpoint holds every splitq-packed tensor with the shape and dtype the
    config requires; raise :class:`SplitQFormatError` naming the tensors otherwise.

    Runs on the meta model before loading and reads only the safetensors headers; does
    nothing without safetensors files (transformers then reports missing tensors itself).
    """
    if not checkpoint_files:
        return
    header = _header_shapes([str(f) for f in checkpoint_files])
    if not header:
        return
    from splitq_modifier.integrations.transformers import key_maps

    to_model, to_checkpoint = key_maps(model, header, hf_quantizer)
    header = {to_model(k): v for k, v in header.items()}
    where = os.path.dirname(str(checkpoint_files[0]))
    problems = []
    modules = _splitq_modules(model)
    expected_keys: set[str] = set()
    for name, module, spec in modules:
        expected_keys.update(f"{name}.{k}" for k in _expected(module, spec, name))
    names = {name for name, _, _ in modules}
    for key in sorted(header):
        owner = _owning_module(key, names)
        if owner is not None and key not in expected_keys:
            ckpt = to_checkpoint(key)
            shown = repr(ckpt) if ckpt == key else f"{ckpt!r} (module tensor {key!r})"
            problems.append(
                f"tensor {shown} is not part of splitq-packed linear {owner} (extra: its "
                "config.json spec stores no such tensor)"
            )
    for name, module, spec in modules:
        desc = (
            f"config.json's splitq spec (sizes={list(spec.sizes)}, "
            f"weight_bits={list(spec.weight_bits)}, outputs={list(spec.out_splits)}, "
            f"cws_ranks={None if spec.cws is None else list(spec.cws.ranks)}, "
            f"mac_ranks={None if spec.mac is None else list(spec.mac.ranks)})"
        )
        for local, (shape, dtype) in _expected(module, spec, name).items():
            key = f"{name}.{local}"
            ckpt = to_checkpoint(key)
            shown = repr(ckpt) if ckpt == key else f"{ckpt!r} (module tensor {key!r})"
            want = _DTYPE_NAMES.get(dtype, str(dtype))
            if key not in header:
                problems.append(f"tensor {shown} is missing ({desc} requires {want} {shape})")
                continue
            got_shape, got_dtype = header[key]
            if got_shape != shape or got_dtype != want:
                problems.append(
                    f"tensor {shown} is {got_dtype} {got_shape} in the checkpoint, but "
                    f"{desc} requires {want} {shape}"
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


def _owner_from_tensors(
    name: str, spec: LinearSpec, tensors: dict, context: ModalityContext
) -> SplitQSiteLinear:
    """The site owner built from its loaded tensors, after checking their values."""
    try:
        owner = spec.build_owner(tensors, context=context)
    except ValueError as e:  # shapes the header check could not see (no safetensors files)
        raise SplitQFormatError(f"splitq-packed linear {name}: {e}. {_FIX}") from e
    problems = site_value_problems(owner)
    if problems:
        raise SplitQFormatError(
            f"splitq-packed linear {name}: {describe_problems(name, problems)}. The stored "
            f"values are corrupt (a model with them would give wrong outputs). {_FIX}"
        )
    return owner


def upgrade_config_versions(config_groups: dict) -> int:
    """Record :data:`FORMAT_VERSION` in every splitq-packed scheme of ``config_groups`` (after
    :func:`convert_loaded_model` converted the tensors); returns the number changed."""
    changed = 0
    for scheme in config_groups.values():
        if not is_splitq_scheme(scheme):
            continue
        data = scheme.weights.observer_kwargs[SPEC_KEY]
        if data.get("version") != FORMAT_VERSION:
            data["version"] = FORMAT_VERSION
            changed += 1
    return changed


def _upgraded_scheme(module: nn.Module, spec: LinearSpec) -> Any:
    """The module's scheme, with the current format version if it was converted."""
    scheme = module.quantization_scheme
    if spec.version == FORMAT_VERSION:
        return scheme
    return replace(spec, version=FORMAT_VERSION).scheme(list(scheme.targets))


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), parent_name, attr


def convert_loaded_model(model: nn.Module, context: ModalityContext | None = None) -> int:
    """Swap every loaded splitq-packed linear for a :class:`SplitQSiteLinear` running from
    its packed tensors, and attach the modality-context hook. Returns the number swapped."""
    context = context if context is not None else ModalityContext()
    vision_ids: tuple[int, ...] = ()
    todo = [(n, m, s) for n, m, s in _splitq_modules(model) if not isinstance(m, SplitQSiteLinear)]
    todo.sort(key=lambda item: item[2].index > 0)  # site owners first
    for name, module, spec in todo:
        d_out, d_in = module.out_features, module.in_features
        expected = spec.tensor_shapes(d_out, d_in, where=name)
        parent, parent_name, attr = _parent(model, name)
        if spec.members[spec.index] != attr:
            raise SplitQFormatError(
                f"splitq-packed linear {name}: config.json records it as member "
                f"{spec.members[spec.index]!r} of its site. {_FIX}"
            )
        if spec.index == 0:
            tensors = {k: _tensor(module, k, *v, name) for k, v in expected.items()}
            new = _owner_from_tensors(name, spec, tensors, context)
        else:
            owner = getattr(parent, spec.site, None)
            if not isinstance(owner, SplitQSiteLinear) or not owner.is_owner:
                raise SplitQFormatError(
                    f"splitq-packed linear {name}: its site tensors are stored on sibling "
                    f"{spec.site!r}, which is not a splitq-packed site owner in "
                    f"{parent_name!r}. {_FIX}"
                )
            if owner.members != spec.members or owner.out_splits != spec.out_splits:
                raise SplitQFormatError(
                    f"splitq-packed linear {name}: config.json's site {list(spec.members)} "
                    f"does not match the one stored on {spec.site!r}. {_FIX}"
                )
            new = SplitQSiteLinear.member(owner, spec.index, spec.site)
        vision_ids = vision_ids or spec.vision_token_ids
        new.quantization_scheme = _upgraded_scheme(module, spec)
        new.quantization_status = QuantizationStatus.COMPRESSED
        new.train(module.training)
        setattr(parent, attr, new)
    if todo and hasattr(model, "get_input_embeddings"):
        attach_modality_context(model, list(vision_ids), context)
    return len(todo)


def drop_trivial_offload(model: nn.Module) -> int:
    """Remove compressed-tensors' offloading wrappers that move nothing.

    Loading dispatches every module with an offload cache, even when its tensors are kept
    where they run (onload device = offload device, e.g. everything on one GPU or on CPU).
    Such a cache still routes every tensor access through a ``.to()`` call, about a dozen per
    SplitQ site per forward, pure overhead at decode time. Modules really offloaded (to CPU
    or disk while running on a GPU) keep their wrappers. Returns the number unwrapped.
    """
    from compressed_tensors.offload.cache.base import OffloadCache
    from compressed_tensors.offload.module import remove_module_offload

    done = 0
    for module in model.modules():
        cache = module._parameters
        if not isinstance(cache, OffloadCache):
            continue
        on, off = getattr(cache, "onload_device", None), getattr(cache, "offload_device", None)
        if off is not None and str(off) != "disk" and torch.device(on) == torch.device(off):
            remove_module_offload(module)
            done += 1
    return done


def _other_quantized(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from compressed_tensors.quantization.utils import is_module_quantized

    return [
        (n, m)
        for n, m in model.named_modules()
        if is_module_quantized(m) and not isinstance(m, SplitQSiteLinear)
    ]


class SplitQCompressedTensorsHfQuantizer(CompressedTensorsHfQuantizer):
    """transformers' compressed-tensors quantizer, plus the ``splitq-packed`` load path.

    Identical to :class:`CompressedTensorsHfQuantizer` for checkpoints without splitq-packed
    config groups.
    """

    def __init__(self, quantization_config: CompressedTensorsConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.splitq_specs: dict[str, LinearSpec] = {}
        ct_config = self.compressor.quantization_config
        if ct_config is not None:
            for group, scheme in ct_config.config_groups.items():
                if is_splitq_scheme(scheme):
                    where = f"quantization_config group {group!r}"
                    self.splitq_specs[group] = LinearSpec.from_scheme(scheme, where=where)
        if self.splitq_specs and not quantization_config.is_quantization_compressed:
            raise SplitQFormatError(
                f"{FORMAT_NAME} checkpoints have quantization_status 'compressed' (SplitQ linears "
                "are only stored packed); this config.json says "
                f"{ct_config.quantization_status!r}. Re-save the quantized model with "
                "model.save_pretrained(dir, save_compressed=True)."
            )
        if self.splitq_specs and getattr(quantization_config, "dequantize", False):
            raise SplitQFormatError(
                f"{FORMAT_NAME} linears cannot be dequantized to dense nn.Linear weights "
                "(their activations are transformed and quantized online): load without "
                "dequantize=True / run_compressed=False"
            )

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        if self.splitq_specs:
            qc = self.compressor.quantization_config
            check_model_against_specs(model, qc.config_groups, qc.ignore)
        super()._process_model_before_weight_loading(model, **kwargs)
        if self.splitq_specs:
            check_checkpoint(model, kwargs.get("checkpoint_files"), self)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if not self.splitq_specs:
            return super()._process_model_after_weight_loading(model, **kwargs)
        convert_loaded_model(model)
        upgrade_config_versions(self.compressor.quantization_config.config_groups)
        self.splitq_specs = {
            g: replace(spec, version=FORMAT_VERSION) for g, spec in self.splitq_specs.items()
        }
        # the model's other compressed modules (e.g. a pack-quantized lm_head): decompress as
        # compressed-tensors does on the first forward (SplitQ linears are left as they are);
        # this also removes the decompress-on-first-forward hook
        self.compressor.decompress_model(model)
        if not _other_quantized(model):  # nothing was decompressed: the model still is packed
            self.compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED
        drop_trivial_offload(model)
        return model

    def get_state_dict_and_metadata(
        self, model: nn.Module
    ) -> tuple[dict[str, torch.Tensor] | None, dict]:
        """transformers' ``save_pretrained`` of a loaded SplitQ model: SplitQ linears as they
        are, the model's other (decompressed) quantized modules compressed again with their own
        format, and ``quantization_status: compressed``, so the saved folder loads again."""
        if not self.splitq_specs:
            return super().get_state_dict_and_metadata(model)
        from compressed_tensors.compressors.base import BaseCompressor
        from compressed_tensors.utils import get_direct_state_dict

        state = model.state_dict()
        for name, module in _other_quantized(model):
            if getattr(module, "quantization_status", None) == QuantizationStatus.COMPRESSED:
                continue
            scheme = module.quantization_scheme
            fmt = getattr(scheme.format, "value", scheme.format)
            direct = {k: v for k, v in get_direct_state_dict(module).items() if v is not None}
            compressed = BaseCompressor.get_value_from_registry(fmt).compress(direct, scheme)
            for k in direct:
                state.pop(f"{name}.{k}", None)
            state.update({f"{name}.{k}": v for k, v in compressed.items()})
        self.compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED
        return state, {}
