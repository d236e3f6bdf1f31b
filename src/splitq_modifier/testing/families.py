"""Tiny models of every supported VLM family, with offline processors.

No weights, tokenizers or processors can be downloaded in this project's CI, yet the
examples and tests must run the real code path: a processor's chat template,
``processor(text, images)``, the model's own image-token expansion, oneshot, save and reload.
:func:`build_tiny_family` builds, for one family (``model_type``):

- a tokenizer trained here from a small caption corpus (``tokenizers`` BPE, byte level),
  with the family's special tokens (image placeholder, image start/end, ...) and the
  tokenizer attributes its processor reads (``image_token``, ``boi_token``, ...);
- the family's processor class around a PIL image processor built from defaults (there is
  no torchvision here) and that tokenizer, with a small chat template;
- a random-weight model from a tiny config of the family's transformers class, whose token
  ids are the tokenizer's;

and saves all of it to one folder, which the examples then treat like a hub checkout.

Processors that take a video processor (Qwen-VL, InternVL, LLaVA-OneVision) need
torchvision for it; :func:`offline_processor_class` derives a subclass without one,
registered with ``AutoProcessor`` by :func:`register_offline_processors` so that a saved
folder reloads with ``AutoProcessor.from_pretrained``.

``FAMILIES`` lists what is built; ``splitq_modifier.arch.ARCHITECTURES`` holds the layout
each family needs for SplitQ (decoder layers, sites, vision token attributes).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "FAMILIES",
    "Family",
    "TinyFamily",
    "build_tiny_family",
    "caption_images",
    "offline_processor_class",
    "register_offline_processors",
    "train_tokenizer",
    "write_image_folder",
]

#: Chat-template turn markers of every tiny tokenizer (the family's own markers do not
#: matter to SplitQ; its image placeholders do).
TURN_START, TURN_END, PAD = "<|im_start|>", "<|im_end|>", "<pad>"

_WORDS = (
    "a an the dog cat man woman child girl boy red blue green yellow white black small big "
    "runs sits stands plays holds looks walks on in of with at near under over grass street "
    "water ball bike car tree house beach field snow two three young old picture image shows "
    "what does describe people group playing standing wearing shirt hat jacket"
).split()


def _corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def train_tokenizer(specials: list[str], named: dict[str, str], vocab_size: int = 360):
    """A byte-level BPE tokenizer trained on a small caption corpus.

    :param specials: the family's special tokens (each becomes one id, never split)
    :param named: tokenizer attribute -> special token (e.g. ``{"image_token": "<image>"}``),
        the named special tokens processors read (``tokenizer.image_token``,
        ``tokenizer.image_token_id``)
    :param vocab_size: target vocabulary size, special tokens included
    :returns: a ``PreTrainedTokenizerFast`` (pad ``<pad>``, eos ``<|im_end|>``)
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = [PAD, "<|endoftext|>", TURN_START, TURN_END]
    all_specials = base + [s for s in specials if s not in base]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, len(all_specials) + 300),
        special_tokens=all_specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=TURN_END,
        pad_token=PAD,
        extra_special_tokens=dict(named),
    )


def chat_template(image_placeholder: str) -> str:
    """A minimal chat template: turns between ``<|im_start|>``/``<|im_end|>``, each image
    part of a message written as ``image_placeholder`` (what the family's processor
    expands into image tokens)."""
    return (
        "{% for m in messages %}" + TURN_START + "{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for p in m['content'] %}{% if p['type'] == 'image' %}" + image_placeholder + ""
        "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
        + TURN_END
        + "\n{% endfor %}{% if add_generation_prompt %}"
        + TURN_START
        + "assistant\n{% endif %}"
    )


# --------------------------------------------------------------------------- processors
_OFFLINE: dict[str, type] = {}

#: PIL image processors ``AutoImageProcessor`` cannot resolve by name without torchvision.
_PIL_IMAGE_PROCESSORS = (
    ("transformers.models.idefics3.image_processing_pil_idefics3", "Idefics3ImageProcessorPil"),
)


def _offline_classes() -> dict[str, type]:
    """The offline processor classes, by name (defined on first use)."""
    if _OFFLINE:
        return _OFFLINE
    from transformers import (
        InternVLProcessor,
        LlavaOnevisionProcessor,
        Qwen2_5_VLProcessor,
        Qwen3VLProcessor,
    )

    # ProcessorMixin derives a processor's attributes from its __init__ parameters and
    # passes saved kwargs (image_seq_length, ...) by the code object's argument names, so
    # each class spells out its base's parameters, without video_processor.
    class OfflineQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(
                image_processor, tokenizer, None, chat_template=chat_template, **kwargs
            )

    class OfflineQwen3VLProcessor(Qwen3VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(
                image_processor, tokenizer, None, chat_template=chat_template, **kwargs
            )

    class OfflineInternVLProcessor(InternVLProcessor):
        def __init__(
            self,
            image_processor=None,
            tokenizer=None,
            image_seq_length: int = 256,
            chat_template=None,
            **kwargs,
        ):
            super().__init__(
                image_processor, tokenizer, None, image_seq_length, chat_template, **kwargs
            )

    class OfflineLlavaOnevisionProcessor(LlavaOnevisionProcessor):
        def __init__(
            self,
            image_processor=None,
            tokenizer=None,
            num_image_tokens=None,
            vision_feature_select_strategy=None,
            chat_template=None,
            image_token="<image>",
            video_token="<video>",
            vision_aspect_ratio="anyres_max_9",
            **kwargs,
        ):
            super().__init__(
                image_processor,
                tokenizer,
                None,
                num_image_tokens,
                vision_feature_select_strategy,
                chat_template,
                image_token,
                video_token,
                vision_aspect_ratio,
                **kwargs,
            )

    class OfflinePixtralProcessor(pixtral_processor_class()):
        """PixtralProcessor under another name: ``AutoProcessor`` resolves the name
        ``PixtralProcessor`` to transformers' torchvision-gated placeholder."""

    for cls in (
        OfflineQwen2_5_VLProcessor,
        OfflineQwen3VLProcessor,
        OfflineInternVLProcessor,
        OfflineLlavaOnevisionProcessor,
        OfflinePixtralProcessor,
    ):
        cls.__module__ = __name__
        _OFFLINE[cls.__name__] = cls
    return _OFFLINE


def offline_processor_class(base: str) -> type:
    """The offline stand-in for transformers processor class ``base`` (a class name).

    Processors that take a video processor (Qwen-VL, InternVL, LLaVA-OneVision) need
    torchvision for it; their stand-ins have only ``image_processor`` and ``tokenizer``
    attributes, so they save and reload without one. Pixtral's stand-in only differs by
    name. Images are processed exactly as by ``base``.
    """
    classes = _offline_classes()
    name = f"Offline{base}"
    if name not in classes:
        raise ValueError(f"no offline processor for {base!r}; have {sorted(classes)}")
    return classes[name]


def register_offline_processors() -> None:
    """Make ``AutoProcessor.from_pretrained(dir)`` find the offline processor classes named
    in saved ``processor_config.json`` files. Call it in any process that reloads a tiny
    folder.

    ``AutoProcessor.register`` ignores registrations for transformers' own config classes
    (transformers 5.17), so each class is registered under a string key of its own; the
    lookup by class name (``processor_class_from_name``) searches those too. The same goes
    for PIL image processors that transformers' lazy modules only offer as torchvision
    placeholders without torchvision (Idefics3's, in 5.17).
    """
    import importlib

    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    for module, name in _PIL_IMAGE_PROCESSORS:
        cls = getattr(importlib.import_module(module), name)
        IMAGE_PROCESSOR_MAPPING.register(f"splitq-offline-{name}", {"pil": cls}, exist_ok=True)

    for name, cls in _offline_classes().items():
        PROCESSOR_MAPPING.register(f"splitq-{name}", cls, exist_ok=True)


# --------------------------------------------------------------------------- configs
def _text(hidden: int, layers: int, vocab: int, **extra) -> dict:
    heads = 4
    return dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=hidden // heads,
        vocab_size=vocab,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
        **extra,
    )


def _mrope(hidden: int, rotary_fraction: float = 1.0) -> dict:
    half = int(hidden // 4 * rotary_fraction) // 2
    return {"mrope_section": [half - 2 * (half // 3), half // 3, half // 3]}


def _cfg_qwen2_5_vl(ids: dict, hidden: int, layers: int, vocab: int):
    from transformers import Qwen2_5_VLConfig

    text = _text(hidden, layers, vocab)
    text["rope_scaling"] = {"type": "mrope", **_mrope(hidden)}
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            fullatt_block_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def _qwen3_vision(hidden: int) -> dict:
    return dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=hidden,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=64,
    )


def _qwen3_ids(ids: dict) -> dict:
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def _cfg_qwen3_vl(ids: dict, hidden: int, layers: int, vocab: int):
    from transformers import Qwen3VLConfig

    text = _text(hidden, layers, vocab)
    text["rope_parameters"] = {"rope_type": "default", "mrope_interleaved": True, **_mrope(hidden)}
    vision = dict(_qwen3_vision(hidden), deepstack_visual_indexes=[0])
    return Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen3_ids(ids))


def _cfg_qwen3_5(ids: dict, hidden: int, layers: int, vocab: int):
    from transformers import Qwen3_5Config

    layers = max(layers, 2)  # at least one gated-delta-net layer and one attention layer
    text = _text(
        hidden,
        layers,
        vocab,
        layer_types=["linear_attention"] * (layers - 1) + ["full_attention"],
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
    )
    text["rope_parameters"] = {
        "rope_type": "default",
        "mrope_interleaved": True,
        "partial_rotary_factor": 0.5,
        **_mrope(hidden, 0.5),
    }
    return Qwen3_5Config(text_config=text, vision_config=_qwen3_vision(hidden), **_qwen3_ids(ids))


def _cfg_llava(ids: dict, hidden: int, layers: int, vocab: int):
    from transformers import LlavaConfig

    return LlavaConfig(
        text_config=dict(_text(hidden, layers, vocab), model_type="llama"),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
        ),
        image_token_id=ids["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,  # the one vision layer's output feeds the projector
    )


def _cfg_idefics3(ids: dict, hidden: int, layers: int, vocab: int):
    from transformers import Idefics3Config

    return Idefics3Config(
        text_config=dict(_text(hidden, layers, vocab), model_type="llama"),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        scale_factor=2,
        image_token_id=ids["<image>"],
        pad_token_id=None,
    )


def _cfg_mistral3(ids: dict, hidden: int, layers: int, vocab: int):
    from transformers import Mistral3Config

    return Mistral3Config(
        text_config=dict(_text(hidden, layers, vocab), model_type="mistral", sliding_window=None),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            head_dim=16,
            image_size=64,
            patch_size=8,
        ),
        image_token_index=ids["[IMG]"],
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )


def _cfg_internvl(ids: dict, hidden: int, layers: int, vocab: int):
    from transformers import InternVLConfig

    return InternVLConfig(
        text_config=dict(_text(hidden, layers, vocab), model_type="qwen2"),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=[32, 32],
            patch_size=[8, 8],
        ),
        image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=4,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def _cfg_llava_onevision(ids: dict, hidden: int, layers: int, vocab: int):
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(
        text_config=dict(_text(hidden, layers, vocab), model_type="qwen2"),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
    )


def _cfg_gemma3(ids: dict, hidden: int, layers: int, vocab: int):
    from transformers import Gemma3Config

    text = _text(hidden, layers, vocab, sliding_window=16, query_pre_attn_scalar=hidden // 4)
    text["layer_types"] = (["sliding_attention"] * (layers - 1) + ["full_attention"])[:layers]
    return Gemma3Config(
        text_config=text,
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        mm_tokens_per_image=4,
        image_token_index=ids["<image_soft_token>"],
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
    )


# --------------------------------------------------------------------------- processors
def _proc_qwen(cls_name: str, patch: int):
    def build(tokenizer, template):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        image = Qwen2VLImageProcessorPil(
            patch_size=patch,
            merge_size=2,
            temporal_patch_size=2,
            min_pixels=(4 * patch) ** 2,
            max_pixels=(8 * patch) ** 2,
        )
        cls = offline_processor_class(cls_name)
        return cls(image_processor=image, tokenizer=tokenizer, chat_template=template)

    return build


def _proc_llava(tokenizer, template):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    return LlavaProcessor(
        image_processor=image,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )


def _proc_idefics3(tokenizer, template):
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    image = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32}
    )
    return Idefics3Processor(
        image_processor=image, tokenizer=tokenizer, image_seq_len=4, chat_template=template
    )


def pixtral_processor_class() -> type:
    """transformers' ``PixtralProcessor`` (Mistral 3's processor), importable without
    torchvision.

    transformers 5.17's ``processing_pixtral`` imports one helper,
    ``get_resize_output_image_size``, from the torchvision image-processor module, so the
    processor cannot be imported without torchvision although the PIL image processor
    defines the same helper. Where that import fails, the module is imported once with the
    PIL module standing in for the torchvision one (then the stand-in is removed again).
    """
    import importlib
    import sys

    name = "transformers.models.pixtral.processing_pixtral"
    try:
        return importlib.import_module(name).PixtralProcessor
    except ImportError:
        pass
    from transformers.models.pixtral import image_processing_pil_pixtral as pil

    tv_name = "transformers.models.pixtral.image_processing_pixtral"
    sys.modules[tv_name] = pil
    try:
        return importlib.import_module(name).PixtralProcessor
    finally:
        if sys.modules.get(tv_name) is pil:
            del sys.modules[tv_name]


def _proc_mistral3(tokenizer, template):
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    cls = offline_processor_class("PixtralProcessor")
    image = PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size=8)
    return cls(
        image_processor=image,
        tokenizer=tokenizer,
        patch_size=8,
        spatial_merge_size=2,
        chat_template=template,
    )


def _proc_internvl(tokenizer, template):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil,
    )

    image = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=False)
    cls = offline_processor_class("InternVLProcessor")
    return cls(
        image_processor=image, tokenizer=tokenizer, image_seq_length=4, chat_template=template
    )


def _proc_llava_onevision(tokenizer, template):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    image = LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32},
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]],
    )
    cls = offline_processor_class("LlavaOnevisionProcessor")
    return cls(
        image_processor=image,
        tokenizer=tokenizer,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=template,
    )


def _proc_gemma3(tokenizer, template):
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    image = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    return Gemma3Processor(
        image_processor=image, tokenizer=tokenizer, image_seq_length=4, chat_template=template
    )


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Family:
    """How to build a tiny model and offline processor of one VLM family.

    :param model_type: ``config.model_type`` (the key of :data:`FAMILIES` and of
        ``splitq_modifier.arch.ARCHITECTURES``)
    :param model_class: transformers model class name
    :param config: transformers config class name
    :param processor: transformers processor class name
    :param video_processor: the processor class takes a video processor (replaced by
        :func:`offline_processor_class`)
    :param specials: special tokens of the tokenizer
    :param named: tokenizer attribute -> special token, as the processor reads them
    :param image_placeholder: what the chat template writes for one image
    :param image_token: the token whose positions carry image features in the LM
    :param image_sizes: (width, height) of the test images (cycled over samples)
    :param notes: what is particular about the family
    """

    model_type: str
    model_class: str
    config: str
    processor: str
    video_processor: bool
    specials: tuple[str, ...]
    named: dict[str, str]
    image_placeholder: str
    image_token: str
    make_config: Callable[..., object]
    make_processor: Callable[..., object]
    image_sizes: tuple[tuple[int, int], ...] = ((64, 64),)
    notes: str = ""


_QWEN_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
_QWEN_NAMED = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"

FAMILIES: dict[str, Family] = {
    "qwen2_5_vl": Family(
        "qwen2_5_vl",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLConfig",
        "Qwen2_5_VLProcessor",
        True,
        _QWEN_SPECIALS,
        _QWEN_NAMED,
        _QWEN_IMAGE,
        "<|image_pad|>",
        _cfg_qwen2_5_vl,
        _proc_qwen("Qwen2_5_VLProcessor", 14),
        image_sizes=((56, 56), (84, 56), (56, 112)),
    ),
    "qwen3_vl": Family(
        "qwen3_vl",
        "Qwen3VLForConditionalGeneration",
        "Qwen3VLConfig",
        "Qwen3VLProcessor",
        True,
        _QWEN_SPECIALS,
        _QWEN_NAMED,
        _QWEN_IMAGE,
        "<|image_pad|>",
        _cfg_qwen3_vl,
        _proc_qwen("Qwen3VLProcessor", 16),
        image_sizes=((64, 64), (96, 64), (64, 128)),
        notes="deepstack: vision features are also added to the first LM layers' outputs",
    ),
    "qwen3_5": Family(
        "qwen3_5",
        "Qwen3_5ForConditionalGeneration",
        "Qwen3_5Config",
        "Qwen3VLProcessor",
        True,
        _QWEN_SPECIALS,
        _QWEN_NAMED,
        _QWEN_IMAGE,
        "<|image_pad|>",
        _cfg_qwen3_5,
        _proc_qwen("Qwen3VLProcessor", 16),
        image_sizes=((64, 64), (96, 64)),
        notes="hybrid: gated-delta-net (linear attention) layers and full-attention layers",
    ),
    "llava": Family(
        "llava",
        "LlavaForConditionalGeneration",
        "LlavaConfig",
        "LlavaProcessor",
        False,
        ("<image>",),
        {"image_token": "<image>"},
        "<image>\n",
        "<image>",
        _cfg_llava,
        _proc_llava,
        image_sizes=((56, 56), (80, 60)),
    ),
    "idefics3": Family(
        "idefics3",
        "Idefics3ForConditionalGeneration",
        "Idefics3Config",
        "Idefics3Processor",
        False,
        ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")
        + tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
        {"image_token": "<image>"},
        "<image>",
        "<image>",
        _cfg_idefics3,
        _proc_idefics3,
        image_sizes=((32, 32), (48, 40)),
        notes="SmolVLM (v1) checkpoints are this model type",
    ),
    "mistral3": Family(
        "mistral3",
        "Mistral3ForConditionalGeneration",
        "Mistral3Config",
        "PixtralProcessor",
        False,
        ("[IMG]", "[IMG_BREAK]", "[IMG_END]"),
        {"image_token": "[IMG]"},
        "[IMG]",
        "[IMG]",
        _cfg_mistral3,
        _proc_mistral3,
        image_sizes=((32, 32), (64, 32), (32, 48)),
        notes="[IMG_BREAK] / [IMG_END] are embedded text tokens; only [IMG] carries features",
    ),
    "internvl": Family(
        "internvl",
        "InternVLForConditionalGeneration",
        "InternVLConfig",
        "InternVLProcessor",
        True,
        ("<img>", "</img>", "<IMG_CONTEXT>", "<video>"),
        {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        "<IMG_CONTEXT>\n",
        "<IMG_CONTEXT>",
        _cfg_internvl,
        _proc_internvl,
        image_sizes=((32, 32), (40, 48)),
    ),
    "llava_onevision": Family(
        "llava_onevision",
        "LlavaOnevisionForConditionalGeneration",
        "LlavaOnevisionConfig",
        "LlavaOnevisionProcessor",
        True,
        ("<image>", "<video>"),
        {"image_token": "<image>", "video_token": "<video>"},
        "<image>\n",
        "<image>",
        _cfg_llava_onevision,
        _proc_llava_onevision,
        image_sizes=((32, 32), (64, 32), (32, 64)),
        notes="anyres: the image-token count depends on the image's aspect ratio",
    ),
    "gemma3": Family(
        "gemma3",
        "Gemma3ForConditionalGeneration",
        "Gemma3Config",
        "Gemma3Processor",
        False,
        ("<start_of_image>", "<end_of_image>", "<image_soft_token>"),
        {
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        "<start_of_image>",
        "<image_soft_token>",
        _cfg_gemma3,
        _proc_gemma3,
        image_sizes=((32, 32), (48, 32)),
        notes="<start_of_image> / <end_of_image> are embedded text tokens around the soft tokens",
    ),
}


# --------------------------------------------------------------------------- building
@dataclass
class TinyFamily:
    """A tiny model of one family, its offline processor and the folder holding both."""

    family: Family
    model: nn.Module
    processor: object
    path: str

    @property
    def image_token_id(self) -> int:
        """Id of the token whose positions carry image features."""
        return self.processor.tokenizer.convert_tokens_to_ids(self.family.image_token)


def build_tiny_family(
    model_type: str,
    path: str,
    hidden: int = 64,
    layers: int = 1,
    seed: int = 0,
) -> TinyFamily:
    """Build a tiny random-weight model of ``model_type`` with its offline processor, and
    save both to ``path`` (a folder that loads with ``AutoModelForImageTextToText`` and
    ``AutoProcessor`` once :func:`register_offline_processors` ran).

    :param model_type: a key of :data:`FAMILIES`
    :param hidden: language-model width (head dim ``hidden / 4``)
    :param layers: language-model decoder layers (Qwen3.5: at least 2, one of each kind)
    """
    import transformers

    fam = FAMILIES.get(model_type)
    if fam is None:
        raise ValueError(f"no tiny family {model_type!r}; choices: {sorted(FAMILIES)}")
    tokenizer = train_tokenizer(list(fam.specials), fam.named)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in fam.specials}
    vocab = len(tokenizer)
    vocab += -vocab % 16
    config = fam.make_config(ids, hidden, layers, vocab)
    torch.manual_seed(seed)
    model = getattr(transformers, fam.model_class)(config).eval()
    with torch.no_grad():  # confident next-token predictions, as a trained LM makes
        model.lm_head.weight.mul_(20.0)
    processor = fam.make_processor(tokenizer, chat_template(fam.image_placeholder))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    model.config.name_or_path = path
    return TinyFamily(fam, model, processor, path)


def caption_images(
    n: int, sizes: tuple[tuple[int, int], ...] = ((64, 64),), seed: int = 0
) -> list[tuple[Image.Image, str]]:
    """``n`` (PIL image, caption) pairs: smooth random colour fields with a caption each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    words = random.Random(seed)
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        corners = rng.uniform(0, 255, size=(2, 2, 3))
        yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
        img = (
            corners[0, 0] * ((1 - yy) * (1 - xx))[..., None]
            + corners[0, 1] * ((1 - yy) * xx)[..., None]
            + corners[1, 0] * (yy * (1 - xx))[..., None]
            + corners[1, 1] * (yy * xx)[..., None]
            + rng.normal(0, 8, size=(h, w, 3))
        )
        caption = " ".join(words.choice(_WORDS) for _ in range(words.randint(5, 10)))
        out.append((Image.fromarray(img.clip(0, 255).astype("uint8")), caption))
    return out


def write_image_folder(
    path: str, n: int, sizes: tuple[tuple[int, int], ...] = ((64, 64),), seed: int = 0
) -> str:
    """Write ``n`` captioned images as a ``datasets`` image folder (PNG files plus
    ``metadata.jsonl`` with ``file_name`` and ``text``), the layout a user's own folder of
    images takes. Returns ``path``."""
    import json

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metadata.jsonl"), "w") as f:
        for i, (img, caption) in enumerate(caption_images(n, sizes, seed)):
            name = f"img_{i:04d}.png"
            img.save(os.path.join(path, name))
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return path
