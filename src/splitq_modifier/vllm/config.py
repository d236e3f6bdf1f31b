"""vLLM quantization config for ``splitq-packed`` checkpoints.

A SplitQ checkpoint's ``config.json`` says ``quant_method: compressed-tensors`` and keeps its
SplitQ groups under ``quantization_config.splitq_config_groups`` behind guards for stock
loaders (:mod:`splitq_modifier.format.guard`). vLLM asks every registered method's
``override_quantization_method`` first; :class:`SplitQConfig` claims such a checkpoint, so it
loads with no ``quantization=`` argument. Its layers:

- a linear whose module (or, for vLLM's fused ``qkv_proj`` / ``gate_up_proj``, whose member
  modules, from the model's ``packed_modules_mapping``) a SplitQ group targets gets
  :class:`~splitq_modifier.vllm.linear.SplitQLinearMethod`;
- everything else (attention's kv cache, an ``lm_head`` another modifier quantized, the
  vision tower, unquantized linears) goes to vLLM's own ``CompressedTensorsConfig`` built
  from the checkpoint's other config groups.

Group targets name the transformers modules (``re:^model\\.language_model\\.layers\\.\\d+...``);
vLLM's module names can differ (``language_model.model.layers...``), so a vLLM prefix is
also tried through the inverse of the prefix and substring renames of the model's
``hf_to_vllm_mapper`` (which vLLM hands to :meth:`SplitQConfig.apply_vllm_mapper`).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.layers.quantization import (
    QUANTIZATION_METHODS,
    register_quantization_config,
)
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
    CompressedTensorsConfig,
)

from splitq_modifier.format.guard import (
    SPLITQ_GROUPS_KEY,
    decode_quantization_config,
    is_encoded,
)
from splitq_modifier.format.spec import SPEC_KEY, LinearSpec, SplitQFormatError, is_splitq_scheme

__all__ = ["METHOD_NAME", "SplitQConfig", "SplitQGroup", "register_config"]

#: vLLM quantization method name of SplitQ checkpoints.
METHOD_NAME = "splitq"
#: Methods a user may name (``quantization=...``) and still have SplitQ claim the checkpoint.
_CLAIMABLE = (None, METHOD_NAME, "compressed-tensors")


@dataclass(frozen=True)
class SplitQGroup:
    """One SplitQ config group: its name, targets and spec."""

    name: str
    targets: tuple[str, ...]
    spec: LinearSpec

    def matches(self, name: str) -> bool:
        """Whether ``name`` (a checkpoint module name) is one of the group's targets."""
        for t in self.targets:
            if t.startswith("re:"):
                if re.match(t[3:], name) is not None:
                    return True
            elif t == name:
                return True
        return False


def _splitq_groups(qc: dict) -> dict[str, dict]:
    """The SplitQ config groups of a decoded ``quantization_config`` dict."""
    return {k: g for k, g in (qc.get("config_groups") or {}).items() if is_splitq_scheme(g)}


def _parse_group(name: str, group: dict) -> SplitQGroup:
    where = f"quantization_config.{SPLITQ_GROUPS_KEY}[{name!r}]"
    try:
        spec_dict = group["weights"]["observer_kwargs"][SPEC_KEY]
    except (KeyError, TypeError) as e:
        raise SplitQFormatError(
            f"{where} has format splitq-packed but no weights.observer_kwargs[{SPEC_KEY!r}] "
            "entry: the config was not written by splitq_modifier"
        ) from e
    targets = tuple(str(t) for t in group.get("targets") or ())
    if not targets:
        raise SplitQFormatError(f"{where} has no targets")
    return SplitQGroup(name, targets, LinearSpec.from_dict(spec_dict, where))


class _InversePrefixRenames:
    """Checkpoint-name candidates of a vLLM module name: the inverse of the prefix and
    substring renames of a model's ``hf_to_vllm_mapper``."""

    def __init__(self) -> None:
        self.prefix: list[tuple[str, str]] = []  # (vllm, checkpoint)
        self.substr: list[tuple[str, str]] = []

    def add(self, mapper: Any) -> None:
        for orig, new in (getattr(mapper, "orig_to_new_prefix", None) or {}).items():
            if new is not None:
                self.prefix.append((new, orig))
        for orig, new in (getattr(mapper, "orig_to_new_substr", None) or {}).items():
            if new is not None:
                self.substr.append((new, orig))

    def candidates(self, name: str) -> list[str]:
        out = [name]
        for new, orig in self.prefix:
            if name.startswith(new):
                out.append(orig + name[len(new) :])
        for new, orig in self.substr:
            for cand in list(out):
                if new in cand:
                    out.append(cand.replace(new, orig, 1))
        return list(dict.fromkeys(out))


class SplitQConfig(QuantizationConfig):
    """vLLM quantization config of a ``splitq-packed`` checkpoint (see the module doc).

    :param groups: the SplitQ config groups
    :param other: vLLM's compressed-tensors config of the checkpoint's other groups (kv cache
        scheme, other modifiers' linears); it gets every layer that is not a SplitQ linear
    """

    def __init__(self, groups: list[SplitQGroup], other: CompressedTensorsConfig) -> None:
        super().__init__()
        self.groups = list(groups)
        self.other = other
        self._renames = _InversePrefixRenames()
        self._modality = None  # per-process text-mask state, made on first use

    # ------------------------------------------------------------------ vLLM interface
    def get_name(self) -> str:
        """The vLLM method name, ``"splitq"``."""
        return METHOD_NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        """Activation dtypes the site op accepts."""
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        """GPU capability the Triton kernels need (int8 tensor-core ``tl.dot``)."""
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        """The config lives in ``config.json``'s ``quantization_config``."""
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SplitQConfig:
        """Build from ``config.json``'s ``quantization_config`` (the file form or the decoded
        one); raise :class:`SplitQFormatError` for malformed or unknown-version groups."""
        qc = decode_quantization_config(config)
        splitq = _splitq_groups(qc)
        if not splitq:
            raise SplitQFormatError("quantization_config has no splitq-packed config groups")
        groups = [_parse_group(name, g) for name, g in splitq.items()]
        rest = copy.deepcopy(qc)
        rest["config_groups"] = {k: g for k, g in qc["config_groups"].items() if k not in splitq}
        return cls(groups, CompressedTensorsConfig.from_config(rest))

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: dict[str, Any], user_quant: str | None, hf_config: Any = None
    ) -> str | None:
        """Claim ``compressed-tensors`` checkpoints that carry SplitQ groups."""
        if not isinstance(hf_quant_cfg, dict):
            return None
        if hf_quant_cfg.get("quant_method") != "compressed-tensors" or user_quant not in _CLAIMABLE:
            return None
        if is_encoded(hf_quant_cfg) or _splitq_groups(hf_quant_cfg):
            return METHOD_NAME
        return None

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        """Remember the model's renames (to match vLLM names against the group targets) and
        pass them on to the compressed-tensors config of the other layers."""
        self._renames.add(hf_to_vllm_mapper)
        self.other.apply_vllm_mapper(hf_to_vllm_mapper)

    def maybe_update_config(
        self, model_name: str, hf_config: Any = None, revision: str | None = None
    ) -> None:
        """Passed on to the compressed-tensors config of the other layers."""
        self.other.maybe_update_config(model_name, hf_config=hf_config, revision=revision)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        """SplitQ for the linears the SplitQ groups target, the compressed-tensors method
        for every other layer."""
        self.other.packed_modules_mapping = self.packed_modules_mapping
        if isinstance(layer, LinearBase):
            spec = self.site_spec(prefix)
            if spec is not None:
                from splitq_modifier.vllm.linear import SplitQLinearMethod

                return SplitQLinearMethod(self, spec, prefix)
        return self.other.get_quant_method(layer, prefix)

    # ------------------------------------------------------------------ matching
    def spec_of(self, name: str) -> LinearSpec | None:
        """The spec of the module called ``name`` in vLLM (None: not a SplitQ linear)."""
        for cand in self._renames.candidates(name):
            hits = [g for g in self.groups if g.matches(cand)]
            if len(hits) > 1:
                raise SplitQFormatError(
                    f"module {cand} is targeted by several splitq-packed groups: "
                    f"{[g.name for g in hits]}"
                )
            if hits:
                return hits[0].spec
        return None

    def site_spec(self, prefix: str) -> LinearSpec | None:
        """The owner spec of the site that vLLM layer ``prefix`` runs, after checking that
        the layer's members are exactly the site's linears in the site's order; None for a
        layer no SplitQ group targets."""
        parent, _, short = prefix.rpartition(".")
        members = list(self.packed_modules_mapping.get(short, [short]))
        names = [f"{parent}.{m}" if parent else m for m in members]
        specs = [self.spec_of(n) for n in names]
        if all(s is None for s in specs):
            return None
        if any(s is None for s in specs):
            done = [n for n, s in zip(names, specs) if s is not None]
            raise SplitQFormatError(
                f"vLLM layer {prefix} fuses {members}, but only {done} are splitq-packed "
                "linears: a SplitQ site's linears are quantized together"
            )
        owner = specs[0]
        if owner.index != 0 or tuple(members) != tuple(owner.members[: len(members)]):
            raise SplitQFormatError(
                f"vLLM layer {prefix} runs {members}, but the checkpoint stores them as "
                f"linears {list(owner.members)} of one site (index {owner.index}): vLLM's "
                "layer does not match the site, so this architecture cannot be served"
            )
        if len(members) == 1 and len(owner.members) > 1:
            raise SplitQFormatError(
                f"vLLM runs {prefix} as a layer of its own, but the checkpoint stores it with "
                f"its site {list(owner.members)} (their weights concatenated on "
                f"{owner.members[0]}): this architecture's vLLM model does not fuse the site"
            )
        if len(members) > 1 and len(members) != len(owner.members):
            raise SplitQFormatError(
                f"vLLM layer {prefix} fuses {members}, but the site has linears "
                f"{list(owner.members)}"
            )
        for j, s in enumerate(specs[1:], start=1):
            if s.index != j or s.members != owner.members or s.out_splits != owner.out_splits:
                raise SplitQFormatError(
                    f"vLLM layer {prefix}: member {members[j]} is recorded as linear "
                    f"{s.index} of site {list(s.members)}, not of {list(owner.members)}"
                )
        return owner

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_modality"] = None  # process-local tensors
        return state


def register_config(cls: type[SplitQConfig]) -> None:
    """Register ``cls`` as vLLM quantization method ``"splitq"`` (idempotent)."""
    from vllm.model_executor.layers.quantization import get_quantization_config

    if METHOD_NAME in QUANTIZATION_METHODS:
        try:
            if get_quantization_config(METHOD_NAME) is cls:
                return
        except (ValueError, KeyError):
            pass
    register_quantization_config(METHOD_NAME)(cls)
