"""Patches of llm-compressor (listed with their reasons in :mod:`splitq_modifier.integrations`).

Nothing here imports llm-compressor at module import: :func:`after_import` waits for it.
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.util
import sys
import weakref
from collections.abc import Callable
from typing import Any

from loguru import logger

__all__ = [
    "after_import",
    "install_partition_fix",
    "register_modifier",
    "wrap_save_pretrained",
]


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback`` right after module ``name`` finishes importing (once)."""

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_call(module) -> None:
            exec_module(module)
            self.callback()

        spec.loader.exec_module = exec_and_call
        return spec


def after_import(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback`` once module ``name`` is imported (at once if it already is)."""
    if name in sys.modules:
        callback()
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, callback))


def register_modifier() -> None:
    """``ModifierFactory.register("SplitQModifier", SplitQModifier)`` (idempotent)."""
    partial = sys.modules.get("splitq_modifier.modifier")
    if partial is not None and not hasattr(partial, "SplitQModifier"):
        # llm-compressor is being imported by splitq_modifier.modifier itself: the class does
        # not exist yet, and the module registers it once it is defined
        return
    from llmcompressor.modifiers.factory import ModifierFactory

    from splitq_modifier.modifier import SplitQModifier

    ModifierFactory.register("SplitQModifier", SplitQModifier)


def install_partition_fix() -> bool:
    """Make llm-compressor's "identical dataset on every rank" path give disjoint shares.

    llm-compressor 0.14 detects that every rank was given the same ``Dataset`` and builds its
    sampler over this rank's partition, but then builds the ``DataLoader`` over the *full*
    dataset, so the partition's indices ``0 .. N/R - 1`` select the same first ``N/R``
    samples on every rank (measured: on 2 ranks with 16 samples both ranks calibrated on
    samples 0-7). This wrapper partitions the dataset before the loader is built, so each
    rank gets samples ``[rank N/R, (rank+1) N/R)``. It changes nothing outside distributed
    runs with identical datasets; returns whether it is installed.
    """
    from llmcompressor.datasets import utils as ds_utils

    from splitq_modifier.distributed import rank_and_world

    original = ds_utils.format_calibration_data
    if getattr(original, "_splitq_partition_fix", False):
        return True
    same = getattr(ds_utils, "_is_dist_and_same_ds", None)
    bounds = getattr(ds_utils, "_get_partition_start_end", None)
    if same is None or bounds is None:
        return False

    def format_calibration_data(args, tokenized_dataset, processor):
        if tokenized_dataset is not None and same(tokenized_dataset):
            rank, world = rank_and_world()
            total = args.num_calibration_samples or len(tokenized_dataset)
            total = min(total, len(tokenized_dataset))
            start, end = bounds(total, rank, world)
            logger.info(
                f"SplitQ: identical calibration datasets on {world} ranks; rank {rank} "
                f"calibrates on samples [{start}, {end})"
            )
            tokenized_dataset = tokenized_dataset.select(range(start, end))
            if dataclasses.is_dataclass(args):
                args = dataclasses.replace(args, num_calibration_samples=end - start)
        return original(args, tokenized_dataset, processor)

    format_calibration_data._splitq_partition_fix = True
    ds_utils.format_calibration_data = format_calibration_data
    return True


def wrap_save_pretrained(model: Any, after_save: Callable[[Any, str], None]) -> None:
    """Make ``model.save_pretrained(dir, ...)`` call ``after_save(model, dir)`` once it has
    saved (wrapping oneshot's own wrapper, which it installs on the model instance; once per
    model: a second call replaces ``after_save``)."""
    model._splitq_after_save = after_save
    current = model.save_pretrained
    if getattr(current, "_splitq_wrapped", False):
        return
    model_ref = weakref.ref(model)

    def save_pretrained(save_directory, *args, **kwargs):
        out = current(save_directory, *args, **kwargs)
        owner = model_ref()
        hook = getattr(owner, "_splitq_after_save", None)
        if hook is not None:
            hook(owner, str(save_directory))
        return out

    save_pretrained._splitq_wrapped = True
    # llm-compressor marks its wrapper so that it does not wrap it twice
    save_pretrained._overridden = getattr(current, "_overridden", False)
    save_pretrained.__doc__ = current.__doc__
    model.save_pretrained = save_pretrained
