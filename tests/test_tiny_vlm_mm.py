"""The ``mm`` tiny VLM (benchmarks/train_tiny_vlm.py, ``outlier_guard="scale_lock"``): its planted
vision and text outliers must survive training. Quick mode only (a few seconds per model)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks import train_tiny_vlm as tv


@pytest.fixture(scope="module")
def trained():
    """Quick-mode models trained with and without the guard, with their outlier reports."""
    torch.set_num_threads(1)
    out = {}
    for preset in ("mm", "default"):
        cfg = tv._cfg_from_args(0, True, None, preset)
        model, planted, task = tv.train(cfg, progress=False, log_every=0)
        report = tv.planted_outlier_report(
            model, task.calibration_samples(32), planted.text_channels, planted.vision_channels
        )
        out[preset] = (model, planted, task, report)
    return out


def test_fields_added_later_leave_old_cache_keys_alone():
    """A field added after the cache format (the outlier guard, the text outlier mode) enters
    a model's key only away from its default, so the models trained before it keep their
    keys: the table of those defaults matches the dataclass, a non-default value changes the
    key and the default gives it back; any ordinary field changes it."""
    base = tv._cfg_from_args(0, False, None)
    defaults = {f.name: f.default for f in dataclasses.fields(tv.TinyVLMConfig)}
    others = {"outlier_guard": "scale_lock", "text_outlier_mode": "transient"}
    assert set(tv._KEY_OPTIONAL_DEFAULTS) == set(others)
    for name, default in tv._KEY_OPTIONAL_DEFAULTS.items():
        assert defaults[name] == default == getattr(base, name), name
        alt = dataclasses.replace(base, **{name: others[name]})
        assert alt.cache_key() != base.cache_key(), name
        assert dataclasses.replace(alt, **{name: default}).cache_key() == base.cache_key()
    assert dataclasses.replace(base, steps=base.steps + 1).cache_key() != base.cache_key()
    mm = tv._cfg_from_args(0, False, None, "mm")
    assert mm.outlier_guard == "scale_lock" and mm.cache_key() != base.cache_key()


def test_scale_lock_makes_the_loss_blind_to_the_ordinary_scales():
    # the mechanism: with the locks installed, scaling the projector output, the ordinary
    # embedding columns, the ordinary norm weights or a residual write changes nothing the
    # language model sees
    # (whatever upstream of linear_2 does to its output scale is divided out the same way)
    cfg = tv._cfg_from_args(0, True, None, "mm")
    model, planted = tv.build_model(cfg)
    tv.ScaleLocks(model, planted, cfg.vision_outlier_scale)
    model.train()  # batch statistics (eval mode would use the running ones)
    batch = tv.collate(tv.SyntheticVQATask(cfg).eval_samples(8))
    with torch.no_grad():
        ref = tv.answer_logits(model, batch)
        lin2 = model.model.multi_modal_projector.linear_2
        lin2.weight.mul_(7.0)  # also the planted rows' token-varying part
        not_vision = torch.ones(cfg.text_hidden, dtype=torch.bool)
        not_vision[planted.vision_channels] = False
        lin2.bias[not_vision] *= 7.0
        not_text = torch.ones(cfg.text_hidden, dtype=torch.bool)
        not_text[planted.text_channels] = False
        model.get_input_embeddings().weight[:, not_text] *= 5.0
        layer = model.model.language_model.layers[0]
        layer.input_layernorm.weight[not_text & not_vision] *= 3.0
        layer.self_attn.o_proj.weight.mul_(4.0)
        layer.mlp.down_proj.weight.mul_(0.5)
        got = tv.answer_logits(model, batch)
    assert torch.allclose(got, ref, atol=1e-3, rtol=1e-3)


def test_planted_channels_stay_largest_after_training(trained):
    model, planted, _, report = trained["mm"]
    assert len(report) == 2 * model.config.text_config.num_hidden_layers
    for site, by_modality in report.items():
        vision, text = by_modality["vision"], by_modality["text"]
        # on every vision token the planted vision channels are the largest |x|, and per
        # channel they stay well above every other channel; the text ones likewise per channel
        assert vision["tokens_planted_top"] == 1.0, site
        assert vision["ratio_to_rest"] > 2.0, site
        assert text["ratio_to_rest"] > 1.5, site
        assert text["ratio_to_median"] > 3.0, site


def test_without_the_guard_the_vision_outliers_are_outgrown(trained):
    # the same check on the unguarded model fails: the projector scales the ordinary vision
    # channels past the frozen planted ones (what the guard is for)
    report = trained["default"][3]
    first = report["layers.0.self_attn.q_proj"]["vision"]
    assert first["tokens_planted_top"] < 0.5
    assert first["ratio_to_rest"] < 1.5


def test_folded_model_is_stock_and_frozen(trained):
    model, planted, task, _ = trained["mm"]
    # no hooks left: the saved model is a plain LlavaForConditionalGeneration
    proj = model.model.multi_modal_projector.linear_2
    assert not proj._forward_hooks
    assert not model.get_input_embeddings()._forward_hooks
    # the planted values are frozen and nothing writes into the planted channels
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tv.restore_planted(model, planted)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for layer in model.model.language_model.layers:
        assert not layer.self_attn.o_proj.weight[planted.channels].any()
        assert not layer.mlp.down_proj.weight[planted.channels].any()
    # the folded projector: ordinary vision channels at unit RMS, planted ones at +-scale
    cfg = task.config
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=tv.reference_images(cfg, 64))
    y = torch.cat(list(feats.pooler_output))
    vision = planted.vision_channels
    ordinary = torch.ones(y.shape[-1], dtype=torch.bool)
    ordinary[vision] = False
    assert y[:, ordinary].pow(2).mean().sqrt() == pytest.approx(1.0, rel=0.1)
    assert torch.allclose(
        y[:, vision].mean(0), planted.vision_bias, rtol=0.1, atol=0.1 * cfg.vision_outlier_scale
    )


def test_transient_preset_plants_text_outliers_that_come_and_go():
    # the fourth trained model (--preset transient): 8 text outlier channels, each large on
    # about a third of the vocabulary and far below the ordinary entries elsewhere (its rank
    # within a token jumps between the top and the bottom half), 2 vision outlier channels;
    # the older presets' planted values are unchanged (persistent: large on every token)
    full = tv._cfg_from_args(0, False, None, "transient")
    assert full.text_hidden >= 256 and full.outlier_guard == "scale_lock"
    assert (full.n_text_outliers, full.n_vision_outliers) == (8, 2)
    cfg = tv._cfg_from_args(0, True, {"n_text_outliers": 8}, "transient")  # small, same planting
    model, planted = tv.build_model(cfg)
    assert len(planted.text_channels) == 8
    emb = model.get_input_embeddings().weight.detach()
    ordinary = torch.ones(cfg.text_hidden, dtype=torch.bool)
    ordinary[planted.text_channels] = False
    rms = emb[:, ordinary].pow(2).mean().sqrt()
    mag = emb[:, planted.text_channels].abs() / rms
    large = mag > 0.25 * cfg.text_outlier_scale
    assert ((large.float().mean(0) > 0.1) & (large.float().mean(0) < 0.7)).all()
    assert (mag[~large] <= 1.0 + 1e-6).all() and (mag[~large] < 0.1).float().mean() > 0.5
    mm, planted_mm = tv.build_model(tv._cfg_from_args(0, True, None, "mm"))
    persistent = planted_mm.text_values.abs() / tv.TinyVLMConfig().text_outlier_scale
    assert persistent.min() >= 0.25 - 1e-6
    assert tv._cfg_from_args(0, False, None, "mm").cache_key() == "e2e54759f6e9e4c2"
