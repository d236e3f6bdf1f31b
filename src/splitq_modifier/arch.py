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

__all__ = [
    "ArchSpec",
    "ARCHITECTURES",
    "GENERIC",
    "VISION_LAYERS",
    "VISION_SITES",
    "get_arch",
    "vision_token_ids",
    "find_sites",
    "is_decoder_layer",
    "is_vision_layer",
]

#: FlatQuant's four activation sites per decoder layer: linears reading the same input.
LLAMA_SITES: dict[str, tuple[str, ...]] = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn_out": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp_down": ("mlp.down_proj",),
}

#: Qwen3.5's hybrid layers: its gated-delta-net (linear attention) layers read the normed
#: residual stream with four projections (one site: one transform, one activation
#: quantization for all four) and project back with ``out_proj`` (a site of its own);
#: its full-attention layers and every MLP use the standard sites.
QWEN3_5_SITES: dict[str, tuple[str, ...]] = {
    **LLAMA_SITES,
    "linear_attn_in": (
        "linear_attn.in_proj_qkv",
        "linear_attn.in_proj_z",
        "linear_attn.in_proj_b",
        "linear_attn.in_proj_a",
    ),
    "linear_attn_out": ("linear_attn.out_proj",),
}

#: Vision-encoder blocks of the supported families (``quantize_vision``): Qwen-VL
#: ``visual.blocks.N``, CLIP / SigLIP / Idefics3 ``encoder.layers.N`` (under
#: ``vision_tower`` or ``vision_model``), Pixtral ``transformer.layers.N``, InternViT
#: ``encoder.layer.N``.
VISION_LAYERS = (
    r"(.*\.)?(visual\.blocks|(vision_tower|vision_model)\.(vision_model\.)?"
    r"(encoder\.layers?|transformer\.layers))\.\d+"
)

#: Vision-block sites, the union of the families' names (a block has only its own).
VISION_SITES: dict[str, tuple[str, ...]] = {
    "attn_in": (
        "attn.qkv",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "attention.q_proj",
        "attention.k_proj",
        "attention.v_proj",
    ),
    "attn_out": (
        "attn.proj",
        "self_attn.out_proj",
        "attention.o_proj",
        "attention.projection_layer",
    ),
    "mlp_in": (
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.fc1",
        "mlp.linear_fc1",
        "feed_forward.gate_proj",
        "feed_forward.up_proj",
    ),
    "mlp_down": ("mlp.down_proj", "mlp.fc2", "mlp.linear_fc2", "feed_forward.down_proj"),
}


@dataclass(frozen=True)
class ArchSpec:
    """What SplitQ needs to know about one VLM architecture.

    :param layers: regex (full match) of the language model's decoder-layer module names
    :param sites: site name -> linear names (relative to the decoder layer) sharing one input
    :param vision_token_attrs: config attributes holding the token ids that stand for image
        or video patches (the first one present on ``config`` or ``config.text_config`` wins
        per attribute; all present are used)
    :param vision_modules: names of the vision tower and projector modules (children of
        the model or of ``model.model``), for ignore patterns
    :param vision_layers: regex (full match) of the vision encoder's blocks, quantized with
        ``quantize_vision``
    :param vision_sites: site table of the vision blocks
    """

    layers: str = r"(.*\.)?language_model\.(model\.)?layers\.\d+"
    sites: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(LLAMA_SITES))
    vision_token_attrs: tuple[str, ...] = ("image_token_id", "video_token_id")
    vision_modules: tuple[str, ...] = ("vision_tower", "multi_modal_projector")
    vision_layers: str = VISION_LAYERS
    vision_sites: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(VISION_SITES))


_IMAGE_ATTRS = ("image_token_id", "image_token_index")
_IMAGE_VIDEO_ATTRS = _IMAGE_ATTRS + ("video_token_id", "video_token_index")
_QWEN_VISION = ("visual",)
_IDEFICS_VISION = ("vision_model", "connector")

#: model_type -> layout. Vision tokens per family (what ``input_ids`` holds where the
#: vision tower's features go): Qwen-VL ``<|image_pad|>`` / ``<|video_pad|>`` (the
#: ``<|vision_start|>`` / ``<|vision_end|>`` around them are text); LLaVA, LLaVA-NeXT,
#: LLaVA-OneVision ``<image>`` (and ``<video>``); Idefics3 / SmolVLM ``<image>`` (the
#: ``<fake_token_around_image>`` / ``<global-img>`` / ``<row_i_col_j>`` tags are text);
#: Mistral 3 ``[IMG]`` (``[IMG_BREAK]`` / ``[IMG_END]`` are text); InternVL
#: ``<IMG_CONTEXT>`` (``<img>`` / ``</img>`` are text, videos use the same token);
#: Gemma 3 ``<image_soft_token>`` (``<start_of_image>`` / ``<end_of_image>`` are text).
ARCHITECTURES: dict[str, ArchSpec] = {
    "qwen2_5_vl": ArchSpec(vision_modules=_QWEN_VISION),
    "qwen2_vl": ArchSpec(vision_modules=_QWEN_VISION),
    "qwen3_vl": ArchSpec(vision_modules=_QWEN_VISION),
    "qwen3_vl_moe": ArchSpec(vision_modules=_QWEN_VISION),
    "qwen3_5": ArchSpec(sites=dict(QWEN3_5_SITES), vision_modules=_QWEN_VISION),
    "qwen3_5_moe": ArchSpec(sites=dict(QWEN3_5_SITES), vision_modules=_QWEN_VISION),
    "llava": ArchSpec(vision_token_attrs=_IMAGE_ATTRS),
    "llava_next": ArchSpec(vision_token_attrs=_IMAGE_VIDEO_ATTRS),
    "llava_onevision": ArchSpec(vision_token_attrs=_IMAGE_VIDEO_ATTRS),
    "idefics3": ArchSpec(
        layers=r"(.*\.)?text_model\.(model\.)?layers\.\d+",
        vision_token_attrs=_IMAGE_ATTRS,
        vision_modules=_IDEFICS_VISION,
    ),
    "smolvlm": ArchSpec(
        layers=r"(.*\.)?text_model\.(model\.)?layers\.\d+",
        vision_token_attrs=_IMAGE_VIDEO_ATTRS,
        vision_modules=_IDEFICS_VISION,
    ),
    "mistral3": ArchSpec(vision_token_attrs=_IMAGE_ATTRS),
    "internvl": ArchSpec(vision_token_attrs=_IMAGE_ATTRS),
    "gemma3": ArchSpec(vision_token_attrs=_IMAGE_ATTRS),
}

GENERIC = ArchSpec(
    layers=r"(.*\.)?(language_model|text_model|model)\.(model\.)?layers\.\d+",
    vision_token_attrs=("image_token_id", "image_token_index", "video_token_id"),
    vision_modules=("visual", "vision_tower", "vision_model", "multi_modal_projector"),
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
    vision: bool = False,
) -> dict[str, list[tuple[str, torch.nn.Linear]]]:
    """Group the quantized linears of one decoder layer into activation sites.

    :param layer_name: full name of the decoder layer
    :param linears: full name -> linear, the linears selected by targets/ignore
    :param vision: the layer is a vision-encoder block (``spec.vision_sites``)
    :returns: site name -> [(full linear name, linear)], in table order; linears that are
        not in the table get a site of their own named after them
    """
    prefix = layer_name + "."
    rel = {n[len(prefix) :]: m for n, m in linears.items() if n.startswith(prefix)}
    sites: dict[str, list[tuple[str, torch.nn.Linear]]] = {}
    for site, members in (spec.vision_sites if vision else spec.sites).items():
        found = [(prefix + r, rel.pop(r)) for r in members if r in rel]
        if found:
            sites[site] = found
    for r, m in rel.items():
        sites[r] = [(prefix + r, m)]
    return sites


def is_decoder_layer(name: str, spec: ArchSpec) -> bool:
    """Whether ``name`` is a language-model decoder layer of this architecture."""
    return re.fullmatch(spec.layers, name) is not None


def is_vision_layer(name: str, spec: ArchSpec) -> bool:
    """Whether ``name`` is a vision-encoder block of this architecture."""
    return re.fullmatch(spec.vision_layers, name) is not None
