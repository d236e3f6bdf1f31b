"""More VLM families: tiny Qwen3.5 (hybrid gated-delta-net + attention layers), Idefics3
(SmolVLM), Mistral 3, InternVL, LLaVA-OneVision and Gemma 3, each calibrated with SplitQ on
image + text inputs made by the family's own processor class (offline tokenizer and PIL
image processor), saved, and reloaded in one fresh process.

Checks: the vision positions SplitQ saw equal the image tokens the processor inserted (the
family's feature-carrying token, counted independently of ``arch.py``), the text positions
are all the others, the architecture table covers the family (decoder layers, sites,
sequential target), and the reloaded model gives the in-memory logits within 1e-4 relative.
"""

from __future__ import annotations

import re

import pytest
import torch
from _toolkit import REL_TOL, calibrate_family, one_torch_thread, reload_fresh  # noqa: F401

import splitq_modifier  # noqa: F401
from splitq_modifier.arch import ARCHITECTURES, get_arch, is_decoder_layer
from splitq_modifier.runtime import SplitQSiteLinear
from splitq_modifier.testing.families import FAMILIES, register_offline_processors

#: family -> (LM decoder-layer class, tiny LM layers)
CASES = {
    "qwen3_5": ("Qwen3_5DecoderLayer", 2),
    "idefics3": ("LlamaDecoderLayer", 1),
    "mistral3": ("MistralDecoderLayer", 1),
    "internvl": ("Qwen2DecoderLayer", 1),
    "llava_onevision": ("Qwen2DecoderLayer", 1),
    "gemma3": ("Gemma3DecoderLayer", 1),
}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> dict:
    register_offline_processors()
    root = tmp_path_factory.mktemp("families")
    return {family: calibrate_family(family, root, CASES[family][1]) for family in CASES}


@pytest.fixture(scope="module")
def reloaded(calibrated) -> dict:
    return reload_fresh([c["save_dir"] for c in calibrated.values()])


def test_every_tiny_family_has_a_table_entry():
    assert set(FAMILIES) <= set(ARCHITECTURES)


@pytest.mark.parametrize("family", list(CASES))
def test_vision_positions_equal_the_image_tokens(family, calibrated):
    c = calibrated[family]
    sites = {k: v for k, v in c["modifier"].report.items() if "vision" in v}
    assert sites and c["image_tokens"] > 0
    for name, site in sites.items():
        assert site["num_vision_tokens"] == c["image_tokens"], name
        assert site["num_text_tokens"] == c["tokens"] - c["image_tokens"], name


@pytest.mark.parametrize("family", list(CASES))
def test_language_model_is_quantized_and_vision_tower_is_not(family, calibrated):
    c = calibrated[family]
    model, spec = c["model"], get_arch(c["model"].config)
    assert c["targets"] == [CASES[family][0]]
    lm_linears = [
        n
        for n, m in model.named_modules()
        if any(is_decoder_layer(n.rsplit(".", k)[0], spec) for k in (1, 2))
        and isinstance(m, (torch.nn.Linear, SplitQSiteLinear))
    ]
    quantized = {n for n, m in model.named_modules() if isinstance(m, SplitQSiteLinear)}
    assert lm_linears and set(lm_linears) == quantized
    roots = "|".join(map(re.escape, spec.vision_modules))
    assert not [n for n in quantized if re.search(rf"(^|\.)({roots})\.", n)]


def test_qwen3_5_linear_attention_layers_have_their_own_sites(calibrated):
    report = calibrated["qwen3_5"]["modifier"].report
    types = calibrated["qwen3_5"]["model"].config.text_config.layer_types
    assert types == ["linear_attention", "full_attention"]
    lin = report["model.language_model.layers.0.linear_attn_in"]
    assert lin["linears"] == [
        "linear_attn.in_proj_qkv",
        "linear_attn.in_proj_z",
        "linear_attn.in_proj_b",
        "linear_attn.in_proj_a",
    ]
    assert report["model.language_model.layers.0.linear_attn_out"]["linears"] == [
        "linear_attn.out_proj"
    ]
    assert "model.language_model.layers.0.attn_in" not in report
    assert report["model.language_model.layers.1.attn_in"]["linears"] == [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
    ]


@pytest.mark.parametrize("family", list(CASES))
def test_reload_gives_the_in_memory_logits(family, calibrated, reloaded):
    c = calibrated[family]
    info = reloaded[c["save_dir"]]
    assert info["rel_err"] <= REL_TOL, f"{family}: relative logit error {info['rel_err']:.3g}"
    in_memory = sorted(n for n, m in c["model"].named_modules() if isinstance(m, SplitQSiteLinear))
    assert info["splitq_linears"] == in_memory
    assert c["tiny"].image_token_id in info["vision_ids"]
    assert info["has_image_processor"]
