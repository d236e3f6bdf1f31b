"""Checks of a ``splitq-packed`` checkpoint, each naming the file, module and tensor at fault.

They run on the load path (``SplitQCompressedTensorsHfQuantizer`` in :mod:`.load`)
in this order, so a bad checkpoint stops before any weight is used:

1. :func:`read_safetensors_header` (before loading, per file): the 8-byte length, the JSON
   header and the data size it implies against the file's size (truncated, padded or
   corrupt files), without reading tensor data;
2. :func:`check_model_against_specs` (before loading, on the meta model): every module a
   SplitQ config group targets is a linear whose ``d_out x d_in`` and attribute name agree
   with the group's spec (a config that does not belong to this model);
3. ``check_checkpoint`` (:mod:`.load`, before loading): the header's tensor names, shapes and
   dtypes against the specs: missing, extra, mis-shaped and wrong-dtype tensors;
4. :func:`site_value_problems` (after loading, before the model is returned): the values of
   each site's tensors: ``perm`` a permutation of ``range(d_in)``, finite scales, smoothing,
   factors, clipping and bias, positive scales and smoothing, clipping ratios in (0, 1].

All checks are vectorised (a handful of reductions per site), so they cost nothing next to
reading the weights. The calibration path runs :func:`site_value_problems` on every frozen
site too (:mod:`splitq_modifier.checks`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch
from torch import nn

from splitq_modifier.format.spec import LinearSpec, SplitQFormatError, is_splitq_scheme

__all__ = [
    "read_safetensors_header",
    "check_model_against_specs",
    "site_value_problems",
    "describe_problems",
]

_REPAIR = (
    "Copy the checkpoint again (a download or copy was cut short), or re-save the quantized "
    "model with model.save_pretrained(dir, save_compressed=True)."
)


def read_safetensors_header(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, dtype name) from a safetensors file's header, after checking
    that the file is exactly as long as its header says.

    Raises :class:`SplitQFormatError` naming the file (and the first tensor whose data lies
    past the end) for a truncated, padded or corrupt file.
    """
    size = os.path.getsize(path)
    where = f"checkpoint file {path}"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SplitQFormatError(
                f"{where} is {size} bytes long: too short for a safetensors file "
                f"(truncated or empty). {_REPAIR}"
            )
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise SplitQFormatError(
                f"{where} is truncated: its header needs {n} bytes but the file has "
                f"{size - 8} after the length field. {_REPAIR}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        spans = {k: tuple(int(o) for o in v["data_offsets"][:2]) for k, v in entries.items()}
        shapes = {k: (tuple(map(int, v["shape"])), str(v["dtype"])) for k, v in entries.items()}
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise SplitQFormatError(
            f"{where} has a corrupt header ({type(e).__name__}: {e}). {_REPAIR}"
        ) from e
    data = size - 8 - n
    end = max((b for _, b in spans.values()), default=0)
    if end > data:
        cut = sorted((a, k) for k, (a, b) in spans.items() if b > data)
        names = ", ".join(repr(k) for _, k in cut[:3]) + (" ..." if len(cut) > 3 else "")
        raise SplitQFormatError(
            f"{where} is truncated: {size} bytes, but its header places tensor data up to byte "
            f"{8 + n + end}; {len(cut)} tensor(s) lie past the end ({names}). {_REPAIR}"
        )
    if end < data:
        raise SplitQFormatError(
            f"{where} has {data - end} bytes after its last tensor that its header does not "
            f"describe (corrupt, or two files were concatenated). {_REPAIR}"
        )
    return shapes


def check_model_against_specs(
    model: nn.Module, schemes: dict[str, object], ignore: Iterable[str] | None = None
) -> None:
    """Check the modules each SplitQ config group targets against the group's spec.

    Runs on the meta model transformers builds before loading: every targeted module must be
    an ``nn.Linear`` of the spec's ``d_out x d_in`` with the attribute name the spec records.
    Raises :class:`SplitQFormatError` naming the group and the module.
    """
    from compressed_tensors.utils import match_named_modules

    for group, scheme in schemes.items():
        if not is_splitq_scheme(scheme):
            continue
        at = f"quantization_config group {group!r}"
        spec = LinearSpec.from_scheme(scheme, where=at)
        targets = list(getattr(scheme, "targets", None) or [])
        found = 0
        for name, module in match_named_modules(model, targets, list(ignore or [])):
            found += 1
            if not isinstance(module, nn.Linear):
                raise SplitQFormatError(
                    f"splitq-packed {at} targets {name} ({type(module).__name__}), which is not a "
                    "linear layer: the config does not belong to this model"
                )
            spec.tensor_shapes(module.out_features, module.in_features, where=name)
            attr = name.rpartition(".")[2]
            if spec.members[spec.index] != attr:
                raise SplitQFormatError(
                    f"splitq-packed linear {name}: {at} records it as member "
                    f"{spec.members[spec.index]!r} of a site {list(spec.members)}: the config "
                    "does not belong to this model"
                )
        if not found:
            raise SplitQFormatError(
                f"splitq-packed {at} matches no module of this model (targets {targets}): "
                "the config does not belong to this model"
            )


def _count(mask: torch.Tensor) -> int:
    return int(mask.sum())


def site_value_problems(owner: nn.Module) -> list[tuple[str, str]]:
    """What is wrong with the values of a site owner's tensors: ``(tensor, problem)`` pairs,
    the tensor by its local name (``perm``, ``weight_scale_2``, ``cws.up_scale``); empty when
    nothing is.

    ``owner`` is a :class:`~splitq_modifier.runtime.SplitQSiteLinear` site owner.
    """
    out: list[tuple[str, str]] = []
    d = int(owner.in_features)
    perm = owner.perm
    if perm.numel() != d:
        out.append(("perm", f"has {perm.numel()} entries for {d} input channels"))
    elif d:
        p = perm.long()
        bad = (p < 0) | (p >= d)
        if bool(bad.any()):
            out.append(
                (
                    "perm",
                    f"is not a permutation of range({d}): {_count(bad)} entries outside it "
                    f"(e.g. {int(p[bad][0])})",
                )
            )
        else:
            counts = torch.bincount(p, minlength=d)
            if bool((counts != 1).any()):
                dup = (counts > 1).nonzero().flatten()
                miss = (counts == 0).nonzero().flatten()
                out.append(
                    (
                        "perm",
                        f"is not a permutation of range({d}): {dup.numel()} channels repeated "
                        f"(e.g. {dup[:3].tolist()}), {miss.numel()} missing "
                        f"(e.g. {miss[:3].tolist()})",
                    )
                )

    def floats(name: str, t: torch.Tensor | None, positive: bool = False) -> None:
        if t is None or t.numel() == 0:
            return
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            nan = _count(torch.isnan(t))
            inf = t.numel() - _count(finite) - nan
            out.append((name, f"has {nan} NaN and {inf} infinite values (of {t.numel()})"))
        elif positive and bool((t <= 0).any()):
            out.append((name, f"has {_count(t <= 0)} values <= 0 (of {t.numel()})"))

    floats("smooth", owner.smooth, positive=True)
    floats("factors", owner.factors)
    clip = owner.act_clip
    floats("act_clip", clip)
    if bool(torch.isfinite(clip).all()) and bool(((clip <= 0) | (clip > 1)).any()):
        out.append(("act_clip", f"must hold ratios in (0, 1], got {clip.tolist()}"))
    for p, k in enumerate(owner.sizes):
        if k:
            floats(f"weight_scale_{p}", getattr(owner, f"weight_scale_{p}"), positive=True)
    floats("site_bias", owner.site_bias)
    for kind in ("cws", "mac"):
        branch = getattr(owner, kind, None)
        if branch is not None:
            floats(f"{kind}.down_scale", branch.down_scale, positive=True)
            floats(f"{kind}.up_scale", branch.up_scale, positive=True)
    return out


def describe_problems(module_name: str, problems: list[tuple[str, str]]) -> str:
    """``tensor 'NAME.perm' is not ...; tensor ...`` for :func:`site_value_problems`' output."""
    return "; ".join(f"tensor '{module_name}.{t}' {msg}" for t, msg in problems)
