"""SplitQModifier through llm-compressor: recipes, oneshot on tiny VLMs, validation errors."""

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.recipe import Recipe
from pydantic import ValidationError

import splitq_modifier  # noqa: F401  (registers the modifier)
from splitq_modifier import SplitQModifier
from splitq_modifier.mocd import jaccard
from splitq_modifier.runtime import SplitQSiteLinear
from splitq_modifier.testing.tiny import (
    build_tiny_vlm,
    calibration_dataset,
    clone_model,
    collate,
    fidelity,
    synthetic_samples,
)

W4A4_YAML = """
splitq_stage:
  splitq_modifiers:
    SplitQModifier:
      weight_bits: 4
      activation_bits: 4
      epochs: 1
"""


def _oneshot(tiny, recipe, n=6):
    samples = synthetic_samples(tiny, n)
    oneshot(
        model=tiny.model,
        dataset=calibration_dataset(samples),
        data_collator=collate,
        recipe=recipe,
        num_calibration_samples=n,
        processor=tiny.tokenizer,
    )


def test_yaml_recipe_resolves_registered_modifier():
    recipe = Recipe.create_instance(W4A4_YAML)
    (mod,) = recipe.modifiers
    assert isinstance(mod, SplitQModifier) and mod.weight_bits == 4 and mod.epochs == 1


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("weight_bits", 1, "weight_bits"),
        ("activation_bits", 32, "activation_bits"),
        ("vision_outlier_ratio", 0.9, "vision_outlier_ratio"),
        ("channel_selection", "biggest", "channel_selection"),
        ("wieght_bits", 4, "wieght_bits"),
        ("num_clusters", 0, "num_clusters"),
    ],
)
def test_bad_recipe_field_fails_at_parse_time(field, value, match):
    with pytest.raises(ValidationError, match=match):
        SplitQModifier(**{field: value})
    yaml = f"s_stage:\n  s_modifiers:\n    SplitQModifier:\n      {field}: {value!r}\n"
    with pytest.raises(ValidationError, match=match):
        Recipe.create_instance(yaml)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llava"])
def test_yaml_recipe_runs_through_oneshot(arch, tmp_path):
    tiny = build_tiny_vlm(arch, hidden=64, layers=2, path=str(tmp_path / "m"))
    fp = clone_model(tiny.model)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(W4A4_YAML)
    _oneshot(tiny, str(recipe_file))
    layers = tiny.model.model.language_model.layers
    frozen = [m for m in layers.modules() if isinstance(m, SplitQSiteLinear)]
    assert len(frozen) == 2 * 7  # q k v o gate up down in each layer
    # the vision tower and lm_head stay in full precision
    assert not any(isinstance(m, SplitQSiteLinear) for m in tiny.model.lm_head.modules())
    ev = synthetic_samples(tiny, 2, seed=99)
    with torch.no_grad():
        logits = tiny.model(**ev[0]).logits
    assert torch.isfinite(logits).all()
    f = fidelity(fp, tiny.model, ev, tiny.image_token_id)
    assert f["top1_all"] > 0.5


def test_mocd_recovers_planted_channels_in_oneshot(tmp_path):
    tiny = build_tiny_vlm("qwen2_5_vl", hidden=128, layers=1, outliers=3, path=str(tmp_path))
    mod = SplitQModifier(epochs=0, cws_rank_ratio=0, mac_rank_ratio=0)
    _oneshot(tiny, [mod], n=8)
    site = mod.report["model.language_model.layers.0.attn_in"]
    assert jaccard(torch.tensor(site["vision"]), torch.tensor(tiny.vision_channels)) >= 0.9
    assert jaccard(torch.tensor(site["text"]), torch.tensor(tiny.text_channels)) >= 0.9


def test_combined_recipe_with_builtin_modifier(tmp_path):
    from llmcompressor.modifiers.quantization import QuantizationModifier

    tiny = build_tiny_vlm("llava", hidden=64, layers=1, path=str(tmp_path))
    recipe = [
        SplitQModifier(epochs=1),
        QuantizationModifier(targets=["lm_head"], scheme="W8A8"),
    ]
    _oneshot(tiny, recipe, n=4)
    assert hasattr(tiny.model.lm_head, "quantization_scheme")
    assert isinstance(tiny.model.model.language_model.layers[0].mlp.down_proj, SplitQSiteLinear)


def test_no_targets_is_a_clear_error(tmp_path):
    tiny = build_tiny_vlm("llava", hidden=64, layers=1, path=str(tmp_path))
    with pytest.raises(ValueError, match="found no language-model linears"):
        _oneshot(tiny, [SplitQModifier(targets=["re:.*nonexistent.*"], epochs=0)], n=2)
