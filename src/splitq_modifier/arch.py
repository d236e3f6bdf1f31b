"""Architecture table: where SplitQ's activation sites are and which tokens are vision.

Everything model-specific lives in :data:`ARCHITECTURES`, keyed by ``config.model_type``.
Adding a model is one entry. A model not in the table uses :data:`GENERIC` (language-model
decoder layers found by name, one site per linear that is not in the standard layout) and
gets a warning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from loguru import logger

__all__ = ["ArchSpec", "ARCHITECTURES", "GENERIC", "get_arch", "vision_token_ids", "find_sites"]

#: FlatQuant's four activation sites per decoder layer: linears reading the same input.
LLAMA_SITES: dict[str, tuple[str, ...]] = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn_out": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp_down": ("mlp.down_proj",),
}


@dataclass(frozen=True)
class ArchSpec:
    """What SplitQ needs to know about one VLM architecture.

    :param layers: regex (full match) of the language model's decoder-layer module names
    :param sites: site name -> linear names (relative to the decoder layer) sharing one input
    :param vision_token_attrs: config attributes holding the token ids that stand for image
        or video patches (the first one present on ``config`` or ``config.text_config`` wins
        per attribute; all present are used)
    """

    layers: str = r"(.*\.)?language_model\.(model\.)?layers\.\d+"
    sites: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(LLAMA_SITES))
    vision_token_attrs: tuple[str, ...] = ("image_token_id", "video_token_id")


ARCHITECTURES: dict[str, ArchSpec] = {
    "qwen2_5_vl": ArchSpec(),
    "qwen2_vl": ArchSpec(),
    "qwen3_vl": ArchSpec(),
    "llava": ArchSpec(vision_token_attrs=("image_token_id", "image_token_index")),
    "llava_next": ArchSpec(vision_token_attrs=("image_token_id", "image_token_index")),
    "gemma3": ArchSpec(vision_token_attrs=("image_token_id", "image_token_index")),
}

GENERIC = ArchSpec(
    layers=r"(.*\.)?(language_model|text_model|model)\.(model\.)?layers\.\d+",
    vision_token_attrs=("image_token_id", "image_token_index", "video_token_id"),
)


def get_arch(config) -> ArchSpec:
    """The table entry for ``config.model_type`` (generic fallback with a warning)."""
    spec = ARCHITECTURES.get(getattr(config, "model_type", None))
    if spec is None:
        logger.warning(
            f"SplitQ: model_type {getattr(config, 'model_type', None)!r} is not in the "
            "architecture table; using the generic layout (add an entry to "
            "splitq_modifier.arch.ARCHITECTURES for exact sites and vision tokens)"
        )
        return GENERIC
    return spec


def vision_token_ids(config, spec: ArchSpec) -> list[int]:
    """Token ids that mark vision (image or video) positions in ``input_ids``."""
    ids = []
    for attr in spec.vision_token_attrs:
        for cfg in (config, getattr(config, "text_config", None)):
            value = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(value, int) and value not in ids:
                ids.append(value)
                break
    return ids


def find_sites(
    layer_name: str,
    linears: dict[str, torch.nn.Linear],
    spec: ArchSpec,
) -> dict[str, list[tuple[str, torch.nn.Linear]]]:
    """Group the quantized linears of one decoder layer into activation sites.

    :param layer_name: full name of the decoder layer
    :param linears: full name -> linear, the linears selected by targets/ignore
    :returns: site name -> [(full linear name, linear)], in table order; linears that are
        not in the table get a site of their own named after them
    """
    prefix = layer_name + "."
    rel = {n[len(prefix) :]: m for n, m in linears.items() if n.startswith(prefix)}
    sites: dict[str, list[tuple[str, torch.nn.Linear]]] = {}
    for site, members in spec.sites.items():
        found = [(prefix + r, rel.pop(r)) for r in members if r in rel]
        if found:
            sites[site] = found
    for r, m in rel.items():
        sites[r] = [(prefix + r, m)]
    return sites


def is_decoder_layer(name: str, spec: ArchSpec) -> bool:
    """Whether ``name`` is a language-model decoder layer of this architecture."""
    return re.fullmatch(spec.layers, name) is not None
