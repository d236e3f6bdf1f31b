"""The real-model examples, run as written on tiny models of their families.

``examples/qwen2_5_vl_example.py``, ``llava_example.py`` and ``qwen3_vl_example.py`` take a
hub id or a local folder; here each gets a folder holding a tiny random-weight model of its
family with an offline processor (the family's processor class, a tokenizer trained here,
a PIL image processor) and a user-style folder of captioned images. Their ``quantize``
(processor chat template -> ``processor(text, images)`` -> batch-size-1 collator -> oneshot
with the decoder layer as sequential target -> ``save_compressed=True`` + processor) and
``generate`` (``AutoModelForImageTextToText`` reload + ``generate``) functions run
unchanged. Also: the two known traps (truncation leaking into the saved tokenizer, vision
tower names), and the evaluation entry point on the saved models.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from _toolkit import load_example, one_torch_thread  # noqa: F401  (autouse)
from compressed_tensors.utils import match_name
from transformers import AutoProcessor

import splitq_modifier  # noqa: F401
from splitq_modifier.arch import get_arch, is_decoder_layer
from splitq_modifier.runtime import SplitQSiteLinear
from splitq_modifier.testing.families import (
    FAMILIES,
    build_tiny_family,
    register_offline_processors,
    train_tokenizer,
    write_image_folder,
)
from splitq_modifier.toolkit import (
    build_calibration_set,
    load_image_text_dataset,
    load_quantized,
    preserved_tokenizer_state,
    tokenizer_state,
    vision_ignore_patterns,
)

EXAMPLES = {"qwen2_5_vl": "qwen2_5_vl", "llava": "llava", "qwen3_vl": "qwen3_vl"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """family -> the example's tiny FP folder, image folder, saved folder, answer, model."""
    register_offline_processors()
    root = tmp_path_factory.mktemp("examples")
    out = {}
    for family, example in EXAMPLES.items():
        tiny = build_tiny_family(family, str(root / f"{family}-fp"))
        images = write_image_folder(str(root / f"{family}-images"), 3, tiny.family.image_sizes)
        mod = load_example(example)
        save_dir = mod.quantize(
            tiny.path,
            images,
            num_samples=3,
            max_length=1024,
            save_dir=str(root / f"{family}-splitq"),
            epochs=1,
        )
        answer = mod.generate(save_dir, dataset=images)
        out[family] = dict(tiny=tiny, images=images, save_dir=save_dir, answer=answer, mod=mod)
    return out


@pytest.mark.parametrize("family", list(EXAMPLES))
def test_example_saves_reloads_and_answers(family, runs):
    r = runs[family]
    assert isinstance(r["answer"], str)
    model, processor = load_quantized(r["save_dir"])
    spec = get_arch(model.config)
    quantized = [n for n, m in model.named_modules() if isinstance(m, SplitQSiteLinear)]
    layers = {n.rsplit(".", 2)[0] for n in quantized}
    assert quantized and all(is_decoder_layer(layer, spec) for layer in layers)
    assert type(processor).__name__.endswith(r["tiny"].family.processor)
    # the reloaded model answers as the example's generate did (greedy)
    answer = r["mod"].generate(r["save_dir"], dataset=r["images"])
    assert answer == r["answer"]


@pytest.mark.parametrize("family", list(EXAMPLES))
def test_saved_tokenizer_has_no_calibration_truncation(family, runs):
    r = runs[family]
    saved = json.loads(open(os.path.join(r["save_dir"], "tokenizer.json")).read())
    assert saved["truncation"] is None and saved["padding"] is None
    original = json.loads(open(os.path.join(r["tiny"].path, "tokenizer_config.json")).read())
    reloaded = json.loads(open(os.path.join(r["save_dir"], "tokenizer_config.json")).read())
    assert reloaded.get("model_max_length") == original.get("model_max_length")
    # a prompt far longer than calibration's max_length is neither cut nor loses image tokens
    processor = AutoProcessor.from_pretrained(r["save_dir"])
    image = load_image_text_dataset(r["images"], num_samples=1)[0]["image"]
    counts = []
    for words in (2, 1500):
        content = [{"type": "image"}, {"type": "text", "text": "dog " * words}]
        msgs = [{"role": "user", "content": content}]
        text = processor.apply_chat_template(msgs, tokenize=False)
        ids = processor(text=[text], images=[image], return_tensors="pt")["input_ids"]
        counts.append((ids.shape[1], int((ids == r["tiny"].image_token_id).sum())))
    (short_len, short_img), (long_len, long_img) = counts
    assert long_len > 1024 + short_len and long_img == short_img > 0


def test_truncating_call_leaks_without_the_guard_and_not_with_it():
    tok = train_tokenizer(["<image>"], {"image_token": "<image>"})
    assert tokenizer_state(tok)["truncation"] is None
    with preserved_tokenizer_state(tok):
        tok(["a dog runs on the grass near a red car"], truncation=True, max_length=3)
        assert tokenizer_state(tok)["truncation"] is not None  # what would be saved
    assert tokenizer_state(tok)["truncation"] is None and tokenizer_state(tok)["padding"] is None
    tok(["a dog runs"], truncation=True, max_length=2, padding="max_length")
    assert tokenizer_state(tok)["truncation"]["max_length"] == 2  # the leak, unguarded


def test_long_samples_are_dropped_not_truncated(runs):
    r = runs["qwen2_5_vl"]
    processor = AutoProcessor.from_pretrained(r["tiny"].path)
    rows = load_image_text_dataset(r["images"])
    full = build_calibration_set(processor, rows, max_length=None)
    lengths = sorted(len(x["input_ids"]) for x in full)
    cut = build_calibration_set(processor, rows, max_length=lengths[1])
    assert sorted(len(x["input_ids"]) for x in cut) == [n for n in lengths if n <= lengths[1]]
    with pytest.raises(ValueError, match="longer than max_length=4"):
        build_calibration_set(processor, rows, max_length=4)
    with pytest.raises(TypeError, match="not a multimodal processor"):
        build_calibration_set(processor.tokenizer, rows)


def test_default_example_keeps_the_vision_tower_in_full_precision(runs):
    model, _ = load_quantized(runs["qwen3_vl"]["save_dir"])
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear,))]
    vision = [n for n in names if ".visual." in f".{n}"]
    assert vision  # the vision tower's linears are plain linears after reload
    assert not [
        n for n, m in model.named_modules() if isinstance(m, SplitQSiteLinear) and n in vision
    ]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ignore_patterns_match_vision_tower_under_both_spellings(family):
    """Module names (``model.visual.*``) and checkpoint / older names (``visual.*``): every
    vision-tower and projector linear matches, no language-model linear does."""
    import transformers

    fam = FAMILIES[family]
    ids = {t: i for i, t in enumerate(fam.specials)}
    with torch.device("meta"):
        model = getattr(transformers, fam.model_class)(fam.make_config(ids, 64, 1, 512))
    patterns = vision_ignore_patterns(model)
    spec = get_arch(model.config)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    lm = [n for n in linears if is_decoder_layer(n.rsplit(".", 2)[0], spec) or n == "lm_head"]
    vision = [n for n in linears if n not in lm]
    assert vision and lm
    for name in vision:
        for spelling in (name, name.removeprefix("model.")):
            assert any(match_name(spelling, p) for p in patterns), (spelling, patterns)
    for name in lm:
        for spelling in (name, name.removeprefix("model.")):
            assert not any(match_name(spelling, p) for p in patterns), spelling


@pytest.mark.parametrize("family", list(EXAMPLES))
def test_example_leaves_the_report_next_to_the_model(family, runs):
    directory = os.path.join(runs[family]["save_dir"], "splitq_report")
    data = json.loads(open(os.path.join(directory, "report.json")).read())
    assert data["sites"] and data["layers"] and data["plots"]
    for rel in data["plots"]:
        path = os.path.join(directory, rel)
        assert os.path.getsize(path) > 1000, path
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(data["plots"]) == len(data["sites"]) + 2  # one per site, layer error, widths


# ------------------------------------------------------------------ evaluation entry point
@pytest.fixture(scope="module")
def qa_folder(runs, tmp_path_factory) -> str:
    """Image-question-answer rows whose answers are the FP model's own greedy answers."""
    from PIL import Image

    from splitq_modifier.evaluate import answer_accuracy, make_samples
    from splitq_modifier.testing.families import caption_images

    r = runs["qwen2_5_vl"]
    root = tmp_path_factory.mktemp("qa")
    rows = []
    for i, (img, _) in enumerate(caption_images(3, r["tiny"].family.image_sizes, seed=5)):
        img.save(root / f"q{i}.png")
        rows.append({"file_name": f"q{i}.png", "question": "what is it", "answer": "x"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    fp = r["tiny"].model
    processor = AutoProcessor.from_pretrained(r["tiny"].path)
    _, answers = answer_accuracy(
        fp, processor, make_samples(processor, load_image_text_dataset(str(root))), 4
    )
    assert all(a.strip() for a in answers)
    order = {row["file_name"]: i for i, row in enumerate(rows)}  # the loader shuffles
    ds = load_image_text_dataset(str(root))
    for row, answer in zip(ds, answers):
        assert isinstance(row["image"], Image.Image)
        rows[order[os.path.basename(row["image"].filename)]]["answer"] = answer.strip()
    (root / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    return str(root)


def test_evaluate_real_model_entry_point(runs, qa_folder, tmp_path):
    from benchmarks.fidelity import main as fidelity_main

    r = runs["qwen2_5_vl"]
    argv = ["--model", r["tiny"].path, "--quantized", r["save_dir"], "--dataset", qa_folder]
    argv += ["--num-samples", "3", "--max-new-tokens", "4", "--device", "cpu"]
    res = fidelity_main(argv + ["--out", str(tmp_path / "eval.json")])
    assert json.loads((tmp_path / "eval.json").read_text())["kl_all"] == res["kl_all"]
    processor = AutoProcessor.from_pretrained(r["save_dir"])
    from splitq_modifier.evaluate import make_samples

    samples = make_samples(processor, load_image_text_dataset(qa_folder))
    n_image = sum(int((s.forced["input_ids"] == r["tiny"].image_token_id).sum()) for s in samples)
    n_all = sum(s.forced["input_ids"].numel() for s in samples)
    assert res["positions_vision"] == n_image > 0
    assert res["positions_text"] == n_all - n_image
    assert res["kl_all"] > 0 and 0 <= res["top1_all"] <= 1
    assert res["accuracy_fp"] == 1.0  # the answers are the FP model's own
    assert 0 <= res["accuracy_q"] <= 1 and res["answered"] == 3


def test_evaluate_fp_against_itself_is_exact(runs, qa_folder):
    from splitq_modifier.evaluate import evaluate

    r = runs["qwen2_5_vl"]
    fp = r["tiny"].model
    processor = AutoProcessor.from_pretrained(r["tiny"].path)
    res = evaluate(fp, fp, processor, load_image_text_dataset(qa_folder), max_new_tokens=4)
    assert abs(res["kl_all"]) < 1e-6 and res["top1_all"] == 1.0 and res["top1_vision"] == 1.0
    assert res["accuracy_q"] == res["accuracy_fp"] == 1.0 and res["same_answer"] == 1.0


def test_evaluate_rejects_what_is_not_a_splitq_pair(runs):
    from splitq_modifier.evaluate import load_models

    qwen, llava = runs["qwen2_5_vl"], runs["llava"]
    with pytest.raises(ValueError, match="not a SplitQ checkpoint"):
        load_models(qwen["tiny"].path, qwen["tiny"].path)
    with pytest.raises(ValueError, match="'llava' model but --quantized"):
        load_models(llava["tiny"].path, qwen["save_dir"])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_models(qwen["tiny"].path, qwen["images"])
