"""vLLM linear method of a SplitQ activation site.

vLLM fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``; a SplitQ site is the
same group of linears (its owner stores every tensor of the site with the linears' output
rows concatenated, owner first, in vLLM's fused order). So one vLLM layer runs one site:

- :meth:`SplitQLinearMethod.create_weights` registers one parameter per stored tensor, with
  the names, shapes and dtypes the package's own spec functions give
  (:meth:`LinearSpec.tensor_shapes`, which uses :meth:`SplitQSiteLinear.tensor_shapes` and
  :meth:`SiteBranch.tensor_shapes`) for this rank's rows; branch tensors live in ``cws`` /
  ``mac`` child modules, as in the checkpoint;
- each parameter's ``weight_loader`` checks the checkpoint tensor against the spec's full
  shape and copies this rank's rows (:mod:`.shard`) or the whole tensor;
- :meth:`~SplitQLinearMethod.process_weights_after_loading` builds the site's
  :class:`SiteParams` through :meth:`SplitQSiteLinear.owner_from_tensors` (no copy) and checks
  the values (``perm`` a permutation, finite positive scales, ...);
- :meth:`~SplitQLinearMethod.apply` is one ``torch.ops.splitq.site_linear`` call.

Row-parallel sites (o_proj, down_proj with tensor parallelism) all-gather their input and
compute a block of output rows (see :mod:`.shard`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearMethodBase,
    RowParallelLinear,
)
from vllm.model_executor.utils import set_weight_attrs

from splitq_modifier.format.spec import LinearSpec, SplitQFormatError
from splitq_modifier.format.validate import describe_problems, site_value_problems
from splitq_modifier.runtime import site_linear
from splitq_modifier.vllm.modality import MASK_BUFFER, make_text_mask
from splitq_modifier.vllm.shard import (
    ShardLayout,
    check_shardable,
    column_layout,
    full_layout,
    row_layout,
)

__all__ = ["SplitQLinearMethod", "layer_layout"]

#: Shard ids under which vLLM's fused layers receive the owner's tensors (q_proj -> "q",
#: gate_proj -> 0) or a layer's own tensors (None).
_OWNER_SHARD_IDS = (None, "q", 0)


def layer_layout(
    layer: nn.Module, spec: LinearSpec, output_partition_sizes: list[int]
) -> ShardLayout:
    """The rows of the site that this rank of ``layer`` computes."""
    tp_size = int(getattr(layer, "tp_size", 1) or 1)
    tp_rank = int(getattr(layer, "tp_rank", 0) or 0)
    if tp_size == 1:
        if sum(output_partition_sizes) != sum(spec.out_splits):
            raise SplitQFormatError(
                f"vLLM layer {getattr(layer, 'prefix', '')} computes outputs "
                f"{list(output_partition_sizes)}, but its splitq-packed site's linears have "
                f"{list(spec.out_splits)} (the config does not belong to this model)"
            )
        return full_layout(spec.out_splits)
    check_shardable(spec.version, tp_size, getattr(layer, "prefix", ""))
    if isinstance(layer, RowParallelLinear):
        return row_layout(spec.out_splits, tp_rank, tp_size)
    if isinstance(layer, ColumnParallelLinear):
        return column_layout(spec.out_splits, output_partition_sizes, tp_rank, tp_size)
    raise NotImplementedError(
        f"splitq-packed sites run on vLLM's column- and row-parallel linears; "
        f"{type(layer).__name__} with tensor parallelism is not supported"
    )


class SplitQLinearMethod(LinearMethodBase):
    """Runs one SplitQ site on a vLLM linear layer (see the module docstring).

    :param config: the model's :class:`~splitq_modifier.vllm.config.SplitQConfig`
    :param spec: the spec of the site's owner
    :param prefix: the layer's name in vLLM (for error messages)
    """

    def __init__(self, config: Any, spec: LinearSpec, prefix: str) -> None:
        self.config = config
        self.spec = spec
        self.prefix = prefix

    # ------------------------------------------------------------------ weights
    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        """Register this rank's tensors of the site on ``layer`` (shapes from the spec)."""
        spec, where = self.spec, self.prefix
        if int(input_size) != sum(spec.sizes):
            raise SplitQFormatError(
                f"splitq-packed linear {where}: the config describes a site reading "
                f"{sum(spec.sizes)} inputs (path widths {list(spec.sizes)}), but vLLM's layer "
                f"reads {input_size} (the config does not belong to this model)"
            )
        layout = layer_layout(layer, spec, list(output_partition_sizes))
        full = spec.tensor_shapes(spec.out_splits[0], int(input_size), where=where)
        local_spec = dataclasses.replace(spec, out_splits=layout.out_splits)
        local = local_spec.tensor_shapes(layout.out_splits[0], int(input_size), where=where)
        sharded = {}
        for name, (shape, dtype) in local.items():
            fshape, fdtype = full[name]
            if fdtype != dtype:
                raise SplitQFormatError(f"{where}.{name}: dtype {dtype} vs {fdtype}")
            if shape == fshape and layout.is_full:
                sharded[name] = False
            elif (
                fshape[0] == layout.total
                and shape[0] == layout.width
                and tuple(shape[1:]) == tuple(fshape[1:])
            ):
                sharded[name] = True
            elif shape == fshape:
                sharded[name] = False
            else:
                raise SplitQFormatError(
                    f"splitq-packed linear {where}: tensor {name!r} of shape {fshape} is not "
                    f"stored one row per output, so it cannot be split over "
                    f"{getattr(layer, 'tp_size', 1)} tensor-parallel ranks"
                )
        for name, (shape, dtype) in local.items():
            holder = layer
            owner_name, _, attr = name.rpartition(".")
            if owner_name:
                holder = getattr(layer, owner_name, None)
                if holder is None:
                    holder = nn.Module()
                    layer.add_module(owner_name, holder)
            param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            holder.register_parameter(attr, param)
            set_weight_attrs(
                param,
                {"weight_loader": self._loader(name, full[name][0], sharded[name], layout)},
            )
        layer.splitq_layout = layout
        layer.splitq_local_spec = local_spec
        layer.splitq_tensor_names = tuple(local)
        if spec.mac is not None:
            layer.register_buffer(MASK_BUFFER, self._text_mask(), persistent=False)

    def _text_mask(self) -> torch.Tensor:
        """The config's per-process text-mask buffer (made on first use)."""
        cfg = self.config
        if cfg._modality is None:
            cfg._modality = make_text_mask()
        return cfg._modality

    def _loader(self, name: str, full_shape: tuple[int, ...], sharded: bool, layout: ShardLayout):
        where = self.prefix

        def weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None):
            if shard_id is None:
                shard_id = getattr(loaded, "shard_id", None)
            if shard_id not in _OWNER_SHARD_IDS:
                raise SplitQFormatError(
                    f"splitq-packed linear {where}: got tensor {name!r} for fused member "
                    f"{shard_id!r}; a site stores its tensors on its first linear only"
                )
            if tuple(loaded.shape) != tuple(full_shape) or loaded.dtype != param.dtype:
                raise SplitQFormatError(
                    f"splitq-packed linear {where}: checkpoint tensor {name!r} is "
                    f"{loaded.dtype} {tuple(loaded.shape)}, but the config's splitq spec "
                    f"requires {param.dtype} {tuple(full_shape)}"
                )
            if sharded and not layout.is_full:
                loaded = torch.cat([loaded.narrow(0, s, n) for s, n in layout.rows])
            param.data.copy_(loaded)

        return weight_loader

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Build the site's :class:`SiteParams` from the loaded tensors and check them."""
        spec, local = self.spec, layer.splitq_local_spec
        tensors = {}
        for name in layer.splitq_tensor_names:
            holder, _, attr = name.rpartition(".")
            tensors[name] = getattr(layer.get_submodule(holder) if holder else layer, attr).data

        try:
            owner = spec.build_owner(tensors, out_splits=local.out_splits)
        except ValueError as e:
            raise SplitQFormatError(f"splitq-packed linear {self.prefix}: {e}") from e
        problems = site_value_problems(owner)
        if problems:
            raise SplitQFormatError(
                f"splitq-packed linear {self.prefix}: {describe_problems(self.prefix, problems)}"
                ". The stored values are corrupt (the model would give wrong outputs)."
            )
        layer.splitq_params = owner.params()
        bias = getattr(layer, "bias", None)
        if isinstance(bias, torch.Tensor):
            # the site's bias is added inside the op (``site_bias``); vLLM's own bias
            # parameter of the layer is not in the checkpoint and must add nothing
            bias.data.zero_()

    # ------------------------------------------------------------------ forward
    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One ``splitq::site_linear`` call: the outputs of this rank's rows of the site
        (row-parallel with tensor parallelism: all-gather the input first, return the full
        width with the other ranks' columns zero, for the layer's all-reduce)."""
        layout: ShardLayout = layer.splitq_layout
        if layout.gather_input:
            from vllm.distributed import tensor_model_parallel_all_gather

            x = tensor_model_parallel_all_gather(x.contiguous(), dim=-1)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        mask = getattr(layer, MASK_BUFFER, None)
        if mask is not None:
            mask = mask[: x2.shape[0]]
        y = site_linear(x2, layer.splitq_params, mask, out_dtype=x.dtype)
        if layout.gather_input:
            lo = layout.out_offset
            y = F.pad(y, (lo, layout.total - lo - layout.width))
        return y.reshape(*lead, y.shape[-1])
