"""Fast checks of the tiny-VLM fidelity benchmark model (benchmarks/train_tiny_vlm.py, --quick)."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch

from benchmarks import train_tiny_vlm as tv


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Quick-mode model trained once into a temporary cache."""
    cache = tmp_path_factory.mktemp("tiny_vlm_cache")
    model, task = tv.load_or_train(seed=0, quick=True, cache_dir=cache, n_eval=300, progress=False)
    return model, task, cache


def test_build_is_deterministic():
    cfg = tv._cfg_from_args(0, True, None)
    m1, p1 = tv.build_model(cfg)
    m2, p2 = tv.build_model(cfg)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    assert p1.text_channels == p2.text_channels and p1.vision_channels == p2.vision_channels
    assert not set(p1.text_channels) & set(p1.vision_channels)
    other, _ = tv.build_model(tv._cfg_from_args(1, True, None))
    assert not torch.equal(other.get_input_embeddings().weight, m1.get_input_embeddings().weight)

    a, b = tv.SyntheticVQATask(cfg).eval_samples(20), tv.SyntheticVQATask(cfg).eval_samples(20)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["input_ids"], y["input_ids"])
        assert torch.equal(x["pixel_values"], y["pixel_values"])
        assert x["answer_token"] == y["answer_token"]
    # splits are different streams
    c = tv.SyntheticVQATask(cfg).calibration_samples(20)
    assert not all(
        torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(a, c, strict=True)
    )


def test_sample_format_and_image_tokens():
    cfg = tv._cfg_from_args(0, True, None)
    task = tv.SyntheticVQATask(cfg)
    hf_cfg = tv.build_hf_config(cfg)
    for s in task.eval_samples(50):
        ids = s["input_ids"]
        assert int((ids == hf_cfg.image_token_id).sum()) == cfg.num_image_tokens
        assert s["pixel_values"].shape == (3, cfg.image_size, cfg.image_size)
        assert s["answer_position"] == len(ids) - 1
        assert s["answer_token"] in tv.ANSWER_TOKEN_IDS
        assert s["labels"][s["answer_position"]] == s["answer_token"]


def test_answers_depend_on_the_image():
    task = tv.SyntheticVQATask(tv._cfg_from_args(0, True, None))
    answers = defaultdict(set)
    for s in task.eval_samples(2000):
        answers[tuple(s["input_ids"].tolist())].add(s["answer_token"])
    frequent = [q for q, a in answers.items() if len(a) > 1]
    # nearly every question text occurs with several answers: the image decides
    assert len(frequent) >= 0.8 * len(answers)
    qtypes = {s["qtype"] for s in task.eval_samples(500)}
    assert qtypes == set(tv.QUESTION_TYPES)


def test_quick_model_trains_and_caches(quick):
    model, task, cache = quick
    meta = task.meta
    assert (task.model_dir / "meta.json").exists()
    assert (task.model_dir / "config.json").exists()
    assert json.loads((task.model_dir / "meta.json").read_text())["seed"] == 0
    assert meta["planted_text_channels"] and meta["planted_vision_channels"]
    samples = task.eval_samples(300)
    acc = tv.evaluate_accuracy(model, samples)
    assert acc == pytest.approx(meta["fp_accuracy"])
    # far above guessing among the 17 answer words (~6%); the quick model learns at least the
    # answer priors of each question type (it is too short to learn much grounding)
    assert acc > 0.2
    # the second call loads from the cache: same weights, no retraining
    model2, task2 = tv.load_or_train(seed=0, quick=True, cache_dir=cache, progress=False)
    assert task2.model_dir == task.model_dir
    for (k, v), (_, w) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert torch.equal(v, w), k


def test_planted_channels_in_hidden_states(quick):
    model, task, _ = quick
    text_ch = task.meta["planted_text_channels"]
    vision_ch = task.meta["planted_vision_channels"]

    # as built (before training): both modalities' planted channels dominate the input hidden
    # state, each on its own modality's tokens
    fresh, planted = tv.build_model(tv._cfg_from_args(0, True, None))
    assert planted.text_channels == text_ch and planted.vision_channels == vision_ch
    batch = tv.collate(task.calibration_samples(8))
    with torch.no_grad():
        out = fresh(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            output_hidden_states=True,
        )
    h = out.hidden_states[0].abs()
    img = batch["input_ids"] == task.image_token_id
    txt = (batch["input_ids"] != task.image_token_id) & batch["attention_mask"].bool()
    med = h[txt | img].median()
    assert h[img][:, vision_ch].min() > 10 * med
    assert h[txt][:, text_ch].amax(0).min() > 10 * med
    assert h[txt][:, vision_ch].amax() < h[img][:, vision_ch].min()
    assert h[img][:, text_ch].amax() < h[txt][:, text_ch].amax(0).min()

    # after training: the frozen text outliers still dominate the first q_proj input (per-channel
    # max |x| well above the median channel's). The vision outliers do not survive training (the
    # learnable projector scales the ordinary channels up); the ratio is recorded in meta.json.
    stats = tv.channel_absmax_at_linear_inputs(model, task.calibration_samples(32))
    q_in = stats["layers.0.self_attn.q_proj"]
    assert tv.outlier_ratio(q_in, text_ch) > 3
    assert task.meta["q_proj0_input_outlier_ratio_text"] > 3
    assert "q_proj0_input_outlier_ratio_vision" in task.meta


def test_calibration_dataset_and_rtn(quick):
    model, task, _ = quick
    ds = tv.make_calibration_dataset(task, 4)
    assert len(ds) == 4 and set(ds.column_names) == {"input_ids", "attention_mask", "pixel_values"}
    from transformers.data import default_data_collator

    for collate_fn in (tv.calibration_collator, default_data_collator):
        batch = collate_fn([ds[0]])
        assert batch["pixel_values"].shape[0] == 1
        with torch.no_grad():
            out = model(**batch)
        assert out.logits.shape[:2] == batch["input_ids"].shape

    q = tv.rtn_fake_quant(model, 4, 4)
    samples = task.eval_samples(64)
    acc = tv.evaluate_accuracy(q, samples)
    assert 0.0 <= acc <= 1.0
    # the original model is untouched
    assert tv.evaluate_accuracy(model, samples) == pytest.approx(
        tv.evaluate_accuracy(model, samples)
    )
