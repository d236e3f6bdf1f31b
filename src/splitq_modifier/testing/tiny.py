"""Tiny VLMs with planted modality-specific outliers, synthetic data and fidelity metrics.

No VLM weights can be downloaded in this project's CI, so tests, the quickstart and smoke
benchmarks build tiny random-weight models from transformers configs. Real VLMs carry
massive activations in a few channels, different for vision and text tokens;
:func:`plant_outliers` reproduces that: text tokens get large, token-varying values on a few
residual-stream channels (embedding columns), vision tokens large values on a few other
channels (projector output), so that MOCD has something real to find.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "TinyVLM",
    "build_tiny_vlm",
    "synthetic_samples",
    "calibration_dataset",
    "collate",
    "fidelity",
    "rtn_recipe",
    "ARCH_CHOICES",
    "clone_model",
    "make_tokenizer",
]

ARCH_CHOICES = ("qwen2_5_vl", "llava")


@dataclass
class TinyVLM:
    """A tiny VLM, the folder its config was saved to, and where outliers were planted."""

    model: nn.Module
    path: str
    arch: str
    image_token_id: int
    vision_channels: list[int]
    text_channels: list[int]
    vocab_size: int
    tokenizer: object = None


def _qwen(hidden: int, layers: int, vocab: int, intermediate: int, heads: int, kv_heads: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    half = hidden // heads // 2
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=vocab,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            rope_scaling={
                "type": "mrope",
                "mrope_section": [half - 2 * (half // 3), half // 3, half // 3],
            },
        ),
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
        image_token_id=vocab - 4,
        video_token_id=vocab - 3,
        vision_start_token_id=vocab - 2,
        vision_end_token_id=vocab - 1,
    )
    return Qwen2_5_VLForConditionalGeneration(cfg)


def _llava(hidden: int, layers: int, vocab: int, intermediate: int, heads: int, kv_heads: int):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        text_config=dict(
            model_type="llama",
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=vocab,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
        ),
        image_token_id=vocab - 4,
        vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(cfg)


def make_tokenizer(vocab: int):
    """A word-level tokenizer over ``t0 .. t{vocab-1}`` (no download), saved with the model
    and passed to ``oneshot(processor=...)``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t1")


def _projector_out(model: nn.Module, arch: str) -> nn.Linear:
    if arch == "qwen2_5_vl":
        return model.model.visual.merger.mlp[2]
    return model.model.multi_modal_projector.linear_2


def plant_outliers(
    model: nn.Module,
    arch: str,
    vision_channels: list[int],
    text_channels: list[int],
    magnitude: float = 50.0,
    seed: int = 0,
) -> None:
    """Plant massive, modality-specific activations, as real VLMs have them.

    Text tokens get large, token-varying values on ``text_channels`` (embedding columns
    whose size spans three decades from token to token, random sign); vision tokens get a
    large constant on ``vision_channels`` (projector output bias). Sizes are ``magnitude``
    times the typical ordinary entry (made O(1)). As in trained models, the linears that
    read the residual stream give those channels correspondingly small weights, so the
    model's function rests on the ordinary channels, which outlier-blind quantizers crush.
    """
    g = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        vocab, hidden = emb.shape
        size = magnitude  # ordinary channels are O(1), as in a trained residual stream
        # ordinary channels: each its own typical magnitude (log-normal, sigma 0.5) and
        # little token-to-token variation, so a channel's rank within a token is stable
        scale = torch.exp(0.5 * torch.randn(hidden, generator=g))
        jitter = torch.exp(0.1 * torch.randn(vocab, hidden, generator=g))
        emb.copy_(torch.sign(emb) * scale * jitter)
        for c in text_channels:
            # text outliers: size varies over three decades from token to token, so the
            # channel's rank within a token is unstable (what MOCD's text score measures)
            val = size * torch.exp(-6.9 * torch.rand(vocab, generator=g))
            sign = torch.where(torch.rand(vocab, generator=g) < 0.5, -1.0, 1.0)
            emb[:, c] = val * sign
        proj = _projector_out(model, arch)
        for c in vision_channels:
            proj.bias[c] = size * (1.0 + torch.rand((), generator=g))
        channels = list(vision_channels) + list(text_channels)
        for name, mod in model.named_modules():
            if "language_model" in name and name.endswith(READS_RESIDUAL):
                mod.weight[:, channels] /= magnitude


READS_RESIDUAL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def build_tiny_vlm(
    arch: str = "qwen2_5_vl",
    hidden: int = 128,
    layers: int = 2,
    vocab: int = 512,
    outliers: int = 3,
    magnitude: float = 50.0,
    seed: int = 0,
    path: str | None = None,
    intermediate: int | None = None,
    heads: int = 4,
    kv_heads: int = 2,
) -> TinyVLM:
    """Build a tiny random-weight VLM with planted outliers, saved to ``path``.

    The model is saved (weights and config) because llm-compressor's ``oneshot`` reads the
    config back from ``config.name_or_path``. ``outliers`` channels are planted per modality,
    disjoint, at fixed positions derived from ``seed``. ``intermediate`` (default
    ``2 * hidden``), ``heads`` and ``kv_heads`` set the language model's other widths (head
    dim = ``hidden / heads``), so real-width single layers can be built too.
    """
    if arch not in ARCH_CHOICES:
        raise ValueError(f"arch must be one of {ARCH_CHOICES}, got {arch!r}")
    torch.manual_seed(seed)
    inter = 2 * hidden if intermediate is None else intermediate
    model = (_qwen if arch == "qwen2_5_vl" else _llava)(
        hidden, layers, vocab, inter, heads, kv_heads
    )
    model.eval()
    with torch.no_grad():  # confident next-token predictions, as a trained LM makes
        model.lm_head.weight.mul_(20.0)
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(hidden, generator=g).tolist()
    vision_channels = sorted(perm[:outliers])
    text_channels = sorted(perm[outliers : 2 * outliers])
    if outliers:
        plant_outliers(model, arch, vision_channels, text_channels, magnitude, seed)
    if path is None:
        import tempfile

        path = tempfile.mkdtemp(prefix=f"splitq_tiny_{arch}_")
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer = make_tokenizer(vocab)
    tokenizer.save_pretrained(path)
    model.config.name_or_path = path
    return TinyVLM(
        model=model,
        path=path,
        arch=arch,
        image_token_id=model.config.image_token_id,
        vision_channels=vision_channels,
        text_channels=text_channels,
        vocab_size=vocab,
        tokenizer=tokenizer,
    )


def synthetic_samples(tiny: TinyVLM, n: int, seq_text: int = 24, seed: int = 0) -> list[dict]:
    """``n`` image-text samples (batch size 1): random pixels and random text tokens.

    The text is split around the image placeholder tokens; the number of placeholders
    matches what the vision tower produces for the image.
    """
    g = torch.Generator().manual_seed(seed)
    cfg = tiny.model.config
    n_text_vocab = tiny.vocab_size - 8
    out = []
    for _ in range(n):
        pre = torch.randint(0, n_text_vocab, (seq_text // 3,), generator=g)
        post = torch.randint(0, n_text_vocab, (seq_text - seq_text // 3,), generator=g)
        if tiny.arch == "qwen2_5_vl":
            grid = torch.tensor([[1, 4, 4]])
            n_img = 4  # 16 patches merged 2x2
            pixels = torch.randn(16, 3 * 2 * 14 * 14, generator=g)
            img = torch.cat(
                [
                    torch.tensor([cfg.vision_start_token_id]),
                    torch.full((n_img,), tiny.image_token_id),
                    torch.tensor([cfg.vision_end_token_id]),
                ]
            )
            extra = {"pixel_values": pixels, "image_grid_thw": grid}
        else:
            n_img = (56 // 14) ** 2
            img = torch.full((n_img,), tiny.image_token_id)
            extra = {"pixel_values": torch.randn(1, 3, 56, 56, generator=g)}
        ids = torch.cat([pre, img, post])[None]
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), **extra})
    return out


def calibration_dataset(samples: list[dict]):
    """A ``datasets.Dataset`` of the samples, for ``oneshot(dataset=ds, data_collator=collate)``."""
    from datasets import Dataset

    return Dataset.from_list([{k: v.tolist() for k, v in s.items()} for s in samples])


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Batch-size-1 collator for :func:`calibration_dataset` rows."""
    if len(rows) != 1:
        raise ValueError("the synthetic calibration set is batch size 1")
    row = rows[0]
    return {
        k: torch.tensor(v, dtype=torch.float32 if k == "pixel_values" else torch.long)
        for k, v in row.items()
    }


@torch.no_grad()
def fidelity(fp: nn.Module, quant: nn.Module, samples: list[dict], image_token_id: int) -> dict:
    """KL(FP || quantized) of next-token distributions and top-1 agreement, overall and
    split by vision / text positions."""
    stats = {k: [0.0, 0.0, 0] for k in ("all", "text", "vision")}  # kl, agree, count
    for s in samples:
        lf = fp(**s).logits.float().log_softmax(-1)[0]
        lq = quant(**s).logits.float().log_softmax(-1)[0]
        kl = (lf.exp() * (lf - lq)).sum(-1)
        agree = (lf.argmax(-1) == lq.argmax(-1)).float()
        vision = s["input_ids"][0] == image_token_id
        for key, m in (("all", torch.ones_like(vision)), ("text", ~vision), ("vision", vision)):
            stats[key][0] += float(kl[m].sum())
            stats[key][1] += float(agree[m].sum())
            stats[key][2] += int(m.sum())
    out = {}
    for key, (kl, agree, cnt) in stats.items():
        if cnt:
            out[f"kl_{key}"] = kl / cnt
            out[f"top1_{key}"] = agree / cnt
    return out


def rtn_recipe(weight_bits: int, activation_bits: int) -> list:
    """llm-compressor's own round-to-nearest on the same linears SplitQ quantizes:
    per-channel symmetric int weights, per-token dynamic symmetric int activations."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    acts = None
    if activation_bits < 16:
        acts = dict(
            num_bits=activation_bits, type="int", symmetric=True, strategy="token", dynamic=True
        )
    return [
        QuantizationModifier(
            config_groups={
                "group_0": dict(
                    targets=["re:.*language_model.*layers.*_proj$"],
                    weights=dict(
                        num_bits=weight_bits, type="int", symmetric=True, strategy="channel"
                    ),
                    input_activations=acts,
                )
            },
        )
    ]


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy (the FP reference kept beside a model that oneshot modifies in place)."""
    return copy.deepcopy(model)
