"""Vision-encoder quantization (``SplitQModifier(quantize_vision=True)``, paper appendix A.4)
on tiny Qwen2.5-VL and LLaVA, through the examples' flow, with save and fresh-process reload.

Inside the vision encoder every token is vision: each vision-block site splits into the
vision-outlier path and the main path only (no text path, no MAC branch), its statistics see
every patch (Qwen2.5-VL: the ``t*h*w`` patches of each image, before the 2x2 merge; CLIP:
the patches plus the class token), and the blocks are calibrated before the language model
(whose layers then calibrate on the quantized vision features).
"""

from __future__ import annotations

import pytest
import torch
from _toolkit import REL_TOL, calibrate_family, one_torch_thread, reload_fresh  # noqa: F401

import splitq_modifier  # noqa: F401
from splitq_modifier import SplitQModifier
from splitq_modifier.arch import get_arch, is_vision_layer
from splitq_modifier.runtime import SplitQSiteLinear
from splitq_modifier.testing.families import register_offline_processors
from splitq_modifier.toolkit import vision_ignore_patterns

FAMILIES = ("qwen2_5_vl", "llava")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> dict:
    register_offline_processors()
    root = tmp_path_factory.mktemp("vision_encoder")
    return {f: calibrate_family(f, root, quantize_vision=True, ignore=[]) for f in FAMILIES}


@pytest.fixture(scope="module")
def reloaded(calibrated) -> dict:
    return reload_fresh([c["save_dir"] for c in calibrated.values()])


def _vision_sites(c: dict) -> dict:
    spec = get_arch(c["model"].config)
    return {
        k: v
        for k, v in c["modifier"].report.items()
        if "vision" in v and is_vision_layer(k.rsplit(".", 1)[0], spec)
    }


def _patches(c: dict) -> int:
    if c["tiny"].family.model_type == "qwen2_5_vl":  # pixel rows = t*h*w patches per image
        return sum(len(r["pixel_values"]) for r in c["calib"])
    cfg = c["model"].config.vision_config  # CLIP: patches + class token per image
    return len(c["calib"]) * ((cfg.image_size // cfg.patch_size) ** 2 + 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_sites_have_no_text_path_and_see_every_patch(family, calibrated):
    c = calibrated[family]
    sites = _vision_sites(c)
    assert len(sites) == 4  # attention in/out, MLP in/out of the one vision block
    for name, site in sites.items():
        assert site["sizes"][1] == 0 and site["text"] == [], name
        assert site["sizes"][0] >= 1 and len(site["vision"]) == site["sizes"][0], name
        assert site["num_text_tokens"] == 0, name
        assert site["num_vision_tokens"] == _patches(c), name
    lm = {k: v for k, v in c["modifier"].report.items() if "vision" in v and k not in sites}
    assert lm and all(v["sizes"][1] > 0 for v in lm.values())  # the LM keeps its text path


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_blocks_are_quantized_first_without_mac(family, calibrated):
    c = calibrated[family]
    model, spec = c["model"], get_arch(c["model"].config)
    layers = [k for k, v in c["modifier"].report.items() if "loss_before" in v]
    kinds = [c["modifier"].report[k]["kind"] for k in layers]
    assert kinds == ["vision", "language"]  # one vision block, then one decoder layer
    owners = {n: m for n, m in model.named_modules() if isinstance(m, SplitQSiteLinear)}
    vision = {n: m for n, m in owners.items() if is_vision_layer(n.rsplit(".", 2)[0], spec)}
    lm = {n: m for n, m in owners.items() if n not in vision}
    assert vision and lm
    for n, m in vision.items():
        if m.is_owner:
            assert m.mac is None and m.sizes[1] == 0, n
    assert any(m.is_owner and m.mac is not None for m in lm.values())
    # the projector / merger after the blocks stays in full precision
    plain = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert plain and all(not is_vision_layer(n.rsplit(".", 2)[0], spec) for n in plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_reload_gives_the_in_memory_logits(family, calibrated, reloaded):
    c = calibrated[family]
    info = reloaded[c["save_dir"]]
    assert info["rel_err"] <= REL_TOL, f"{family}: relative logit error {info['rel_err']:.3g}"
    spec = get_arch(c["model"].config)
    reloaded_vision = [
        n for n in info["splitq_linears"] if is_vision_layer(n.rsplit(".", 2)[0], spec)
    ]
    in_memory = sorted(n for n, m in c["model"].named_modules() if isinstance(m, SplitQSiteLinear))
    assert info["splitq_linears"] == in_memory and reloaded_vision


def test_vision_ignore_with_quantize_vision_is_a_clear_error(calibrated, tmp_path):
    from llmcompressor import oneshot

    from splitq_modifier.toolkit import collate_one

    c = calibrated["llava"]
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(c["tiny"].path)
    recipe = [SplitQModifier(quantize_vision=True, ignore=vision_ignore_patterns(model))]
    with pytest.raises(ValueError, match="quantize_vision=True\\) found no vision-encoder"):
        oneshot(
            model=model,
            dataset=c["calib"],
            recipe=recipe,
            data_collator=collate_one,
            num_calibration_samples=1,
            processor=c["tiny"].processor,
        )
