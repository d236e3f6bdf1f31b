"""How a ``splitq-packed`` checkpoint's ``config.json`` makes a stock loader fail in one line.

Without ``import splitq_modifier``, compressed-tensors' ``CompressionFormat`` enum has no
``splitq-packed`` member, and transformers validates ``quantization_config`` with pydantic
before any other step of ``from_pretrained``: every SplitQ config group would fail twice
(once per branch of ``QuantizationScheme | list[str]``), each error listing the whole enum.
No code of this package runs at that point, so only the file can shape the error. On disk:

- the SplitQ config groups live under ``quantization_config.splitq_config_groups`` (a key
  compressed-tensors' ``QuantizationConfig`` ignores), unchanged: ``format: splitq-packed``,
  the spec in ``weights.observer_kwargs.splitq``; ``config_groups`` keeps the groups of the
  model's other quantized modules (e.g. an ``int-quantized`` lm_head);
- ``kv_cache_scheme`` is wrapped as ``{GUARD_MESSAGE: <the real kv_cache_scheme or null>}``.
  ``QuantizationArgs`` forbids unknown keys, so a stock loader stops with exactly one
  validation error whose location *is* the message::

      1 validation error for QuantizationConfig
      kv_cache_scheme.splitq-packed checkpoint: run `import splitq_modifier` before from_pretrained
        Extra inputs are not permitted [type=extra_forbidden, input_value=None, input_type=NoneType]

  It fails even when ``config_groups`` is left empty, so no stock reader (transformers,
  compressed-tensors, vLLM) loads the SplitQ linears as something else;
- ``transform_config`` is replaced by ``{"config_groups": {VLLM_GUARD_MESSAGE: null}}`` and
  its real value (if any) kept under ``splitq_transform_config``. transformers and
  compressed-tensors' ``QuantizationConfig`` do not read ``transform_config`` (the error above
  stays the only one), but a stock vLLM validates it with compressed-tensors'
  ``TransformConfig`` when it builds its engine config, before the model, so it stops with
  one validation error whose location names the vLLM plugin to install::

      1 validation error for TransformConfig
      config_groups.splitq-packed checkpoint: to serve it with vLLM, install ...
        Input should be a valid dictionary or instance of TransformScheme [type=model_type, ...]

  (without it, vLLM's first error is an unrelated ``NotImplementedError: Currently supported
  kv cache quantization is num_bits=8, type=float, however received num_bits=None,
  type=None``, raised by the kv-cache guard above while the model is built).

``import splitq_modifier`` registers :class:`SplitQCompressedTensorsConfig` as transformers'
``compressed-tensors`` quantization config (``AUTO_QUANTIZATION_CONFIG_MAPPING``, the registry
transformers dispatches ``quant_method`` through): it decodes the file form before
validation and encodes it again in ``to_dict`` (what transformers' ``save_pretrained`` writes).
llm-compressor's ``save_pretrained(dir, save_compressed=True)`` writes it through
:func:`splitq_modifier.format.save.install_save_hook`. Checkpoints written before this
encoding (SplitQ groups in ``config_groups``) decode unchanged and still load.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers.utils.quantization_config import CompressedTensorsConfig

from splitq_modifier.format.spec import FORMAT_NAME, is_splitq_scheme

__all__ = [
    "GUARD_FIELD",
    "GUARD_MESSAGE",
    "SPLITQ_GROUPS_KEY",
    "VLLM_GUARD_FIELD",
    "VLLM_GUARD_MESSAGE",
    "SplitQCompressedTensorsConfig",
    "decode_quantization_config",
    "encode_quantization_config",
    "is_encoded",
]

#: The ``quantization_config`` field that carries the message for stock loaders.
GUARD_FIELD = "kv_cache_scheme"
#: What a stock loader prints (the location of its single validation error).
GUARD_MESSAGE = f"{FORMAT_NAME} checkpoint: run `import splitq_modifier` before from_pretrained"
#: Where the SplitQ config groups are stored in ``config.json``.
SPLITQ_GROUPS_KEY = "splitq_config_groups"
#: The ``quantization_config`` field that carries the message for a stock vLLM.
VLLM_GUARD_FIELD = "transform_config"
#: What a stock vLLM prints (the location of its single validation error).
VLLM_GUARD_MESSAGE = (
    f"{FORMAT_NAME} checkpoint: to serve it with vLLM, install the splitq-modifier package "
    "(its vLLM plugin) in vLLM's environment"
)
#: Where the real ``transform_config`` is kept while the guard occupies its place.
SPLITQ_TRANSFORM_KEY = "splitq_transform_config"
_MISSING = object()


def _guard_value(qc: dict) -> tuple[bool, Any]:
    """``(is_guard, wrapped value)`` of ``qc[GUARD_FIELD]``."""
    value = qc.get(GUARD_FIELD)
    if isinstance(value, dict) and len(value) == 1:
        (key,) = value
        if isinstance(key, str) and key.startswith(FORMAT_NAME):
            return True, value[key]
    return False, value


def _is_vllm_guard(value: Any) -> bool:
    if not isinstance(value, dict) or list(value) != ["config_groups"]:
        return False
    groups = value["config_groups"]
    return isinstance(groups, dict) and any(
        isinstance(k, str) and k.startswith(FORMAT_NAME) for k in groups
    )


def is_encoded(qc: Any) -> bool:
    """Whether a ``quantization_config`` dict is in the file form written by this package."""
    return isinstance(qc, dict) and (
        SPLITQ_GROUPS_KEY in qc or _guard_value(qc)[0] or _is_vllm_guard(qc.get(VLLM_GUARD_FIELD))
    )


def encode_quantization_config(qc: dict) -> dict:
    """The ``config.json`` form of a ``quantization_config`` dict (see the module docstring).

    A dict without SplitQ groups, or one already encoded, is returned unchanged (a copy).
    """
    qc = copy.deepcopy(qc)
    if is_encoded(qc):
        return qc
    groups = qc.get("config_groups") or {}
    splitq = {k: g for k, g in groups.items() if is_splitq_scheme(g)}
    if not splitq:
        return qc
    qc["config_groups"] = {k: g for k, g in groups.items() if k not in splitq}
    qc[SPLITQ_GROUPS_KEY] = splitq
    qc[GUARD_FIELD] = {GUARD_MESSAGE: qc.get(GUARD_FIELD)}
    real = qc.pop(VLLM_GUARD_FIELD, _MISSING)
    if real is not _MISSING:
        qc[SPLITQ_TRANSFORM_KEY] = real
    qc[VLLM_GUARD_FIELD] = {"config_groups": {VLLM_GUARD_MESSAGE: None}}
    return qc


def decode_quantization_config(qc: dict) -> dict:
    """Inverse of :func:`encode_quantization_config`: SplitQ groups back in
    ``config_groups`` (first, as at save time) and the real ``kv_cache_scheme``. A dict that
    is not encoded is returned unchanged (a copy)."""
    qc = copy.deepcopy(qc)
    if not is_encoded(qc):
        return qc
    splitq = qc.pop(SPLITQ_GROUPS_KEY, None) or {}
    others = qc.get("config_groups") or {}
    qc["config_groups"] = {**splitq, **{k: g for k, g in others.items() if k not in splitq}}
    guarded, value = _guard_value(qc)
    if guarded:
        qc[GUARD_FIELD] = value
    if _is_vllm_guard(qc.get(VLLM_GUARD_FIELD)):
        del qc[VLLM_GUARD_FIELD]
        if SPLITQ_TRANSFORM_KEY in qc:
            qc[VLLM_GUARD_FIELD] = qc.pop(SPLITQ_TRANSFORM_KEY)
    return qc


class SplitQCompressedTensorsConfig(CompressedTensorsConfig):
    """transformers' ``CompressedTensorsConfig`` that reads and writes the file form.

    Identical to its parent for configs without SplitQ groups. Its class name is the
    parent's (transformers compares quantization config classes by name when a
    ``quantization_config=CompressedTensorsConfig(...)`` argument meets a checkpoint's config).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **decode_quantization_config(kwargs))

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` form (SplitQ groups encoded)."""
        return encode_quantization_config(super().to_dict())


SplitQCompressedTensorsConfig.__name__ = CompressedTensorsConfig.__name__
