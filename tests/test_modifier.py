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


@pytest.mark.parametrize("rule", ["mocd_error", "mocd"])  # the default, the paper's
def test_selection_recovers_planted_channels_in_oneshot(tmp_path, rule):
    tiny = build_tiny_vlm("qwen2_5_vl", hidden=128, layers=1, outliers=3, path=str(tmp_path))
    mod = SplitQModifier(epochs=0, cws_rank_ratio=0, mac_rank_ratio=0, channel_selection=rule)
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


def _owners(model) -> dict[str, SplitQSiteLinear]:
    mods = model.named_modules()
    return {n: m for n, m in mods if isinstance(m, SplitQSiteLinear) and m.is_owner}


def test_site_rotations_depend_on_the_site_name_only(tmp_path):
    """A site's initial rotations derive from the recipe's seed and its module name: leaving
    layer 0 out (so the report records fewer sites before layer 1) does not change layer 1's
    factors. With no training the stored factors are exactly the initial rotations."""
    factors = []
    for ignore in ([], ["re:.*layers\\.0\\..*"]):
        tiny = build_tiny_vlm("llava", hidden=64, layers=2, path=str(tmp_path / str(len(ignore))))
        mod = SplitQModifier(epochs=0, ignore=ignore, weight_rounding="rtn")
        _oneshot(tiny, [mod], n=2)
        owners = _owners(tiny.model)
        factors.append({n: m.factors.clone() for n, m in owners.items() if ".layers.1." in n})
    assert factors[0].keys() == factors[1].keys() and len(factors[0]) == 4
    for name in factors[0]:
        assert torch.equal(factors[0][name], factors[1][name]), name
    a, b = (factors[0][n] for n in sorted(factors[0])[:2])
    assert not torch.equal(a[: min(len(a), len(b))], b[: min(len(a), len(b))])  # per-site seeds


def test_aux_bits_floor_reaches_the_branches(tmp_path):
    """aux_bits_floor below 4 applies to the outlier paths and to the CWS/MAC branches."""
    tiny = build_tiny_vlm("llava", hidden=64, layers=1, path=str(tmp_path))
    mod = SplitQModifier(weight_bits=3, activation_bits=3, aux_bits_floor=3, epochs=0)
    _oneshot(tiny, [mod], n=2)
    for name, owner in _owners(tiny.model).items():
        p = owner.params()
        assert p.w_bits == (3, 3, 3) and p.a_bits == (3, 3, 3), name
        for br in (p.cws, p.mac):
            assert br is not None and br.w_bits == 3 and br.act_bits == 3, name


def test_adaptive_widths_end_to_end(tmp_path):
    """outlier_widths: adaptive chooses each site's widths within the layer's fixed budget,
    finds the planted channels at the attention input, and records the choice."""
    tiny = build_tiny_vlm("qwen2_5_vl", hidden=128, layers=1, outliers=3, path=str(tmp_path))
    mod = SplitQModifier(epochs=0, outlier_widths="adaptive", channel_selection="mocd_error",
                         cws_rank_ratio=0, mac_rank_ratio=0)  # fmt: skip
    _oneshot(tiny, [mod], n=8)
    sites = {k: v for k, v in mod.report.items() if "vision" in v}
    assert len(sites) == 4
    spent = sum(len(v["vision"]) + len(v["text"]) for v in sites.values())
    budget = sum(sum(v["adaptive"]["fixed_widths"]) for v in sites.values())
    assert spent <= budget
    site = sites["model.language_model.layers.0.attn_in"]
    assert set(tiny.vision_channels) <= set(site["vision"])
    assert set(tiny.text_channels) <= set(site["text"])
    assert site["adaptive"]["proxy_error"] <= site["adaptive"]["fixed_proxy_error"]
