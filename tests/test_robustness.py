"""Robustness: bad calibration data, bad checkpoints, the guarded config.json, batch order.

Every case here is a row of the table in ``docs/robustness.md``. Calibration cases run
``oneshot`` on a tiny LLaVA (hidden 64, one decoder layer) and check what the run says (the
warning or error, naming batch, module and fix) and what it leaves (every frozen SplitQ
tensor finite, every layer calibrated, finite logits). Checkpoint cases corrupt one saved
checkpoint in one way each and check that ``from_pretrained`` refuses it naming the file,
module and tensor, before returning a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig
from llmcompressor import oneshot
from llmcompressor.core import active_session
from loguru import logger
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText
from transformers.utils.quantization_config import CompressedTensorsConfig

import splitq_modifier  # noqa: F401  (registers the format and the modifier)
from splitq_modifier import SplitQModifier, checks
from splitq_modifier.checks import SplitQCalibrationError, find_nonfinite_samples
from splitq_modifier.format import (
    FORMAT_NAME,
    GUARD_MESSAGE,
    VLLM_GUARD_MESSAGE,
    SplitQFormatError,
    decode_quantization_config,
    encode_quantization_config,
)
from splitq_modifier.runtime import SplitQSiteLinear
from splitq_modifier.testing.tiny import (
    build_tiny_vlm,
    calibration_dataset,
    collate,
    synthetic_samples,
)

LAYER = "model.language_model.layers.0"


# ------------------------------------------------------------------------------ helpers
@pytest.fixture
def warnings_log():
    """Messages of loguru warnings emitted during the test."""
    msgs: list[str] = []
    sink = logger.add(lambda m: msgs.append(m.record["message"]), level="WARNING")
    yield msgs
    logger.remove(sink)


def _tiny(path: Path, arch: str = "llava", dtype: torch.dtype | None = None):
    tiny = build_tiny_vlm(arch, hidden=64, layers=1, path=str(path / "fp"))
    if dtype is not None:
        tiny.model.to(dtype)
    return tiny


def _oneshot(tiny, samples, collator=collate, loader_batch: int = 1, shuffle: bool = True, **kw):
    mod = SplitQModifier(**{"epochs": 0, "seed": 0, **kw})
    oneshot(
        model=tiny.model,
        dataset=calibration_dataset(samples),
        data_collator=collator,
        recipe=[mod],
        num_calibration_samples=len(samples),
        batch_size=loader_batch,
        shuffle_calibration_samples=shuffle,
        processor=tiny.tokenizer,
    )
    return mod


def _fail_oneshot(tiny, samples, **kw) -> str:
    """Run oneshot expecting SplitQCalibrationError; its message."""
    with pytest.raises(SplitQCalibrationError) as err:
        _oneshot(tiny, samples, **kw)
    active_session().reset()  # the aborted session is not finalized by the next test
    return str(err.value)


def _owners(model) -> dict[str, SplitQSiteLinear]:
    return {
        n: m for n, m in model.named_modules() if isinstance(m, SplitQSiteLinear) and m.is_owner
    }


def _assert_calibrated_and_finite(tiny, mod) -> None:
    """Every site frozen with finite tensors, the layer reported, finite logits."""
    owners = _owners(tiny.model)
    assert len(owners) == 4, sorted(owners)  # attn_in, attn_out, mlp_in, mlp_down
    for name, owner in owners.items():
        for key, t in owner.state_dict().items():
            if t.is_floating_point():
                assert torch.isfinite(t).all(), f"{name}.{key}"
    assert LAYER in mod.report
    sample = synthetic_samples(tiny, 1, seed=9)[0]
    dtype = next(tiny.model.parameters()).dtype
    sample = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sample.items()}
    with torch.no_grad():
        assert torch.isfinite(tiny.model(**sample).logits).all()


def _skip_warnings(msgs: list[str]) -> list[str]:
    return [m for m in msgs if "it is skipped" in m]


# ------------------------------------------------------------------ bad calibration data
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_pixel_values_skip_the_sample(tmp_path, warnings_log, value):
    tiny = _tiny(tmp_path)
    samples = synthetic_samples(tiny, 3)
    samples[1]["pixel_values"][0, 0, :3, :3] = value
    mod = _oneshot(tiny, samples)
    (msg,) = _skip_warnings(warnings_log)  # one warning for the batch, not one per layer/site
    assert "calibration batch" in msg and f"the input of {LAYER}" in msg
    assert "pixel_values" in msg and "find_nonfinite_samples" in msg
    _assert_calibrated_and_finite(tiny, mod)


def test_skipped_sample_has_no_influence(tmp_path):
    """Calibrating on [a, bad, b] gives what calibrating on [a, b] gives."""
    base = _tiny(tmp_path / "a")
    good = synthetic_samples(base, 2)
    bad = synthetic_samples(base, 1, seed=5)[0]
    bad["pixel_values"][0, 0, 0, 0] = float("nan")
    ref_mod = _oneshot(base, good, shuffle=False)
    other = _tiny(tmp_path / "b")
    mod = _oneshot(other, [good[0], bad, good[1]], shuffle=False)
    assert mod.report[f"{LAYER}.attn_in"] == ref_mod.report[f"{LAYER}.attn_in"]
    ref, got = _owners(base.model), _owners(other.model)
    for name in ref:
        for key, t in ref[name].state_dict().items():
            torch.testing.assert_close(got[name].state_dict()[key], t, msg=f"{name}.{key}")


def test_all_samples_nonfinite_stop_naming_the_layer(tmp_path):
    tiny = _tiny(tmp_path)
    samples = synthetic_samples(tiny, 2)
    for s in samples:
        s["pixel_values"][0, 0, 0, 0] = float("nan")
    msg = _fail_oneshot(tiny, samples)
    assert f"SplitQ {LAYER}: every calibration batch has NaN or Inf" in msg
    assert f"the input of {LAYER}" in msg and "find_nonfinite_samples" in msg


def test_nonfinite_model_weight_stops_naming_it(tmp_path):
    tiny = _tiny(tmp_path)
    with torch.no_grad():
        tiny.model.model.language_model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    msg = _fail_oneshot(tiny, synthetic_samples(tiny, 2))
    assert f"{LAYER}.mlp.up_proj.weight has non-finite values (1 NaN, 0 inf)" in msg


def test_nonfinite_weight_outside_the_targets_is_named(tmp_path):
    """A NaN in a norm weight makes every batch non-finite: the error names the weight, not
    the data."""
    tiny = _tiny(tmp_path)
    with torch.no_grad():
        tiny.model.model.language_model.layers[0].input_layernorm.weight[0] = float("nan")
    msg = _fail_oneshot(tiny, synthetic_samples(tiny, 2))
    assert "every calibration batch has NaN or Inf" in msg
    assert f"The model's own weights are not finite ({LAYER}.input_layernorm.weight: 1 NaN" in msg


def _plant_fp16_overflow(tiny, token: int) -> None:
    """Make ``token`` overflow float16 inside layer 0 only, without changing the function:
    its embedding is a large one-hot on ``channel``; the MLP-input norm's weight on that
    channel is multiplied by 1e4 and the gate/up weights' column divided by 1e4."""
    layer = tiny.model.model.language_model.layers[0]
    planted = set(tiny.vision_channels) | set(tiny.text_channels)
    channel = next(c for c in range(64) if c not in planted)
    with torch.no_grad():
        emb = tiny.model.get_input_embeddings().weight
        emb[token] = 0.0
        emb[token, channel] = 100.0
        layer.post_attention_layernorm.weight[channel] *= 1e4
        layer.mlp.gate_proj.weight[:, channel] /= 1e4
        layer.mlp.up_proj.weight[:, channel] /= 1e4


def test_fp16_overflow_in_one_sample_is_skipped(tmp_path, warnings_log):
    tiny = _tiny(tmp_path, dtype=torch.float16)
    token = tiny.vocab_size - 5  # a text token no synthetic sample uses
    _plant_fp16_overflow(tiny, token)
    samples = synthetic_samples(tiny, 3)
    samples[2]["input_ids"][0, -1] = token
    mod = _oneshot(tiny, samples)
    (msg,) = _skip_warnings(warnings_log)
    assert f"the input of {LAYER}.mlp.gate_proj (site mlp_in)" in msg
    assert "although the layer's input is finite" in msg
    assert "float16" in msg and "dtype=torch.bfloat16" in msg
    _assert_calibrated_and_finite(tiny, mod)


def test_fp16_overflow_in_every_sample_stops(tmp_path):
    tiny = _tiny(tmp_path, dtype=torch.float16)
    with torch.no_grad():
        tiny.model.model.language_model.layers[0].post_attention_layernorm.weight.mul_(1e4)
    msg = _fail_oneshot(tiny, synthetic_samples(tiny, 2))
    assert "every calibration batch has NaN or Inf" in msg and "float16" in msg
    assert f"{LAYER}.mlp" in msg


def test_bf16_model_calibrates_finite(tmp_path):
    tiny = _tiny(tmp_path, dtype=torch.bfloat16)
    mod = _oneshot(tiny, synthetic_samples(tiny, 2), epochs=1)
    _assert_calibrated_and_finite(tiny, mod)


def test_single_calibration_sample(tmp_path):
    tiny = _tiny(tmp_path)
    mod = _oneshot(tiny, synthetic_samples(tiny, 1), epochs=1, batch_size=4)
    _assert_calibrated_and_finite(tiny, mod)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llava"])
def test_sequences_shorter_than_the_kronecker_factors(tmp_path, arch):
    """Qwen: 1 text token around 6 image tokens; LLaVA: 2-token text-only samples; fewer
    tokens than the side of the main path's largest Kronecker factor."""
    tiny = _tiny(tmp_path, arch)
    if arch == "qwen2_5_vl":
        samples = synthetic_samples(tiny, 2, seq_text=1)
    else:
        samples = [
            {"input_ids": s["input_ids"][:, :2], "attention_mask": s["attention_mask"][:, :2]}
            for s in synthetic_samples(tiny, 2)
        ]
    longest = max(s["input_ids"].shape[1] for s in samples)
    mod = _oneshot(tiny, samples, epochs=1)
    main_factors = _owners(tiny.model)[f"{LAYER}.self_attn.q_proj"].dims[2]
    assert longest < max(main_factors), (longest, main_factors)
    _assert_calibrated_and_finite(tiny, mod)


def test_all_vision_samples(tmp_path):
    tiny = _tiny(tmp_path)
    samples = []
    for s in synthetic_samples(tiny, 2):
        ids = s["input_ids"][s["input_ids"] == tiny.image_token_id][None]
        samples.append({**s, "input_ids": ids, "attention_mask": torch.ones_like(ids)})
    mod = _oneshot(tiny, samples, epochs=1)
    site = mod.report[f"{LAYER}.attn_in"]
    assert site["text"] == []  # no text token: the text-outlier path is empty
    _assert_calibrated_and_finite(tiny, mod)


def test_all_text_samples(tmp_path):
    tiny = _tiny(tmp_path)
    samples = []
    for s in synthetic_samples(tiny, 2):
        ids = s["input_ids"][s["input_ids"] != tiny.image_token_id][None]
        samples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    mod = _oneshot(tiny, samples, epochs=1)
    site = mod.report[f"{LAYER}.attn_in"]
    assert site["vision"] == []  # no vision token: the vision-outlier path is empty
    _assert_calibrated_and_finite(tiny, mod)


def _padding_collator(left: bool):
    def collate_padded(rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"][0]) for r in rows)
        ids = torch.full((len(rows), width), 1, dtype=torch.long)  # t1 is the pad token
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            t = torch.tensor(r["input_ids"][0])
            span = slice(width - len(t), width) if left else slice(0, len(t))
            ids[i, span], mask[i, span] = t, 1
        pixels = torch.cat([torch.tensor(r["pixel_values"]) for r in rows])
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}

    return collate_padded


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches(tmp_path, side):
    tiny = _tiny(tmp_path)
    samples = synthetic_samples(tiny, 4)
    for s in samples[1::2]:  # every batch of two has one shorter sample
        s["input_ids"], s["attention_mask"] = s["input_ids"][:, :-5], s["attention_mask"][:, :-5]
    mod = _oneshot(tiny, samples, collator=_padding_collator(side == "left"), loader_batch=2)
    _assert_calibrated_and_finite(tiny, mod)


def test_diverged_training_falls_back_to_the_initial_transforms(tmp_path, monkeypatch):
    """A parameter that becomes NaN in training is never frozen: the layer keeps its initial
    transforms, i.e. what epochs=0 gives."""
    ref = _tiny(tmp_path / "ref")
    samples = synthetic_samples(ref, 2)
    _oneshot(ref, samples, epochs=0)
    import splitq_modifier.calibrate as calibrate_module

    real_train = calibrate_module.train_layer

    def train_then_break(layer, *args, **kwargs):
        before, after = real_train(layer, *args, **kwargs)
        p = next(
            p for n, p in layer.named_parameters() if p.requires_grad and "log_c" in n and p.numel()
        )
        with torch.no_grad():
            p.fill_(float("nan"))
        return before, float("nan")

    monkeypatch.setattr(calibrate_module, "train_layer", train_then_break)
    msgs: list[str] = []
    sink = logger.add(lambda m: msgs.append(m.record["message"]), level="WARNING")
    try:
        tiny = _tiny(tmp_path / "run")
        mod = _oneshot(tiny, samples, epochs=1)
    finally:
        logger.remove(sink)
    assert any(f"SplitQ {LAYER}: training diverged" in m for m in msgs)
    _assert_calibrated_and_finite(tiny, mod)
    got, want = _owners(tiny.model), _owners(ref.model)
    for name in want:
        for key, t in want[name].state_dict().items():
            torch.testing.assert_close(got[name].state_dict()[key], t, msg=f"{name}.{key}")


def test_frozen_site_check_names_module_and_tensor():
    from splitq_modifier.testing.sites import random_site_params

    params = random_site_params(out_splits=(16, 8), sizes=(2, 2, 28), cws_rank=2, mac_rank=2)
    owner, _ = SplitQSiteLinear.from_params(params)
    checks.check_frozen_site("m.q_proj", owner)  # a valid site passes
    owner.smooth[3] = float("inf")
    owner.act_clip[0] = 0.0
    with pytest.raises(SplitQCalibrationError) as err:
        checks.check_frozen_site("m.q_proj", owner)
    assert "tensor 'm.q_proj.smooth' has 0 NaN and 1 infinite values" in str(err.value)
    assert "tensor 'm.q_proj.act_clip' must hold ratios in (0, 1]" in str(err.value)


def test_find_nonfinite_samples_names_dataset_rows():
    tiny_like = [
        {"input_ids": torch.tensor([[1, 2]]), "pixel_values": torch.zeros(1, 3, 4, 4)}
        for _ in range(4)
    ]
    tiny_like[2]["pixel_values"][0, 1, 2, 3] = float("nan")
    tiny_like[3]["pixel_values"][0, 0, 0, 0] = float("-inf")
    ds = calibration_dataset(tiny_like)
    assert find_nonfinite_samples(ds) == [(2, "pixel_values", "1 NaN, 0 inf"),
                                          (3, "pixel_values", "0 NaN, 1 inf")]  # fmt: skip
    assert find_nonfinite_samples(tiny_like, columns=["input_ids"]) == []


def test_unavailable_cache_device_is_named(tmp_path):
    tiny = _tiny(tmp_path)
    msg = _fail_oneshot(tiny, synthetic_samples(tiny, 1), cache_device="cuda:99")
    assert "SplitQModifier.cache_device='cuda:99' is not available on this machine" in msg


def test_modifier_import_order():
    """``import splitq_modifier`` then ``from splitq_modifier import SplitQModifier`` before
    llm-compressor is imported (was a circular ImportError), in a fresh process."""
    code = (
        "import sys, splitq_modifier\n"
        "assert 'llmcompressor' not in sys.modules\n"
        "from splitq_modifier import SplitQModifier\n"
        "from llmcompressor.modifiers.factory import ModifierFactory\n"
        "assert ModifierFactory._registered_registry['SplitQModifier'] is SplitQModifier\n"
        "print('OK')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


# ---------------------------------------------------------------- determinism, batch order
def _digest(model, path: Path) -> str:
    model.save_pretrained(str(path), save_compressed=True)
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_fixed_batch_order_is_byte_identical_whatever_the_global_rng(tmp_path):
    """``shuffle_calibration_samples=False``: the pipeline's batch order no longer depends on
    torch's global RNG, so neither do the saved bytes (see docs/robustness.md)."""
    digests = []
    for global_seed in (1, 2):
        tiny = _tiny(tmp_path / str(global_seed))
        samples = synthetic_samples(tiny, 4)
        torch.manual_seed(global_seed)  # what oneshot's RandomSampler would draw from
        _oneshot(tiny, samples, shuffle=False, epochs=1, batch_size=2)
        digests.append(_digest(tiny.model, tmp_path / f"out{global_seed}"))
    assert digests[0] == digests[1]


# ------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[Path, dict, torch.Tensor]:
    """A saved tiny LLaVA (W4A4, CWS and MAC on), an eval sample and its logits."""
    root = tmp_path_factory.mktemp("robust_ckpt")
    tiny = build_tiny_vlm("llava", hidden=64, layers=1, path=str(root / "fp"))
    _oneshot(tiny, synthetic_samples(tiny, 2), epochs=1)
    sample = synthetic_samples(tiny, 1, seed=7)[0]
    with torch.no_grad():
        logits = tiny.model(**sample).logits
    tiny.model.save_pretrained(str(root / "q"), save_compressed=True)
    return root / "q", sample, logits


def _copy(ckpt, tmp_path: Path) -> Path:
    dst = tmp_path / "bad"
    shutil.copytree(ckpt[0], dst)
    return dst


def _key(tensors: dict, suffix: str) -> str:
    (key,) = [k for k in tensors if k.endswith(suffix)]
    return key


def _tensors(fn):
    def edit(path: Path) -> None:
        tensors = load_file(str(path / "model.safetensors"))
        fn(tensors)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})

    return edit


def _set(suffix: str, index, value):
    def fn(t: dict) -> None:
        t[_key(t, suffix)][index] = value

    return _tensors(fn)


def _config(fn):
    def edit(path: Path) -> None:
        cfg = json.loads((path / "config.json").read_text())
        fn(cfg)
        (path / "config.json").write_text(json.dumps(cfg))

    return edit


def _spec(fn, member: str = "q_proj"):
    """Edit the spec of the config group holding ``member`` as its site owner."""

    def edit(cfg: dict) -> None:
        for group in cfg["quantization_config"]["splitq_config_groups"].values():
            spec = group["weights"]["observer_kwargs"]["splitq"]
            if spec["members"][spec["index"]] == member:
                fn(group, spec)
                return
        raise AssertionError(member)

    return _config(edit)


def _truncate(n_bytes: int | None = None, keep: int | None = None):
    def edit(path: Path) -> None:
        f = path / "model.safetensors"
        os.truncate(f, keep if keep is not None else f.stat().st_size - n_bytes)

    return edit


def _append(path: Path) -> None:
    with open(path / "model.safetensors", "ab") as f:
        f.write(b"\0" * 64)


def _garble_header(path: Path) -> None:
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"\xff\xfe{["  # the JSON header's first bytes
    f.write_bytes(bytes(data))


def _reshape_q_paths(group: dict, spec: dict) -> None:
    """Path widths [2, 2, 60] -> [4, 2, 58], consistent factors: the tensors now disagree."""
    spec["sizes"] = [spec["sizes"][0] + 2, spec["sizes"][1], spec["sizes"][2] - 2]
    spec["factors"] = [[spec["sizes"][0]], [spec["sizes"][1]], [spec["sizes"][2]]]


def _nan_dtype_scale(t: dict) -> None:
    key = _key(t, "q_proj.weight_scale_2")
    t[key] = t[key].half()


Q = "layers.0.self_attn.q_proj"
MQ = f"{LAYER}.self_attn.q_proj"
#: id -> (how the checkpoint is damaged, what the error must say)
BAD_CHECKPOINTS = {
    "truncated_data": (_truncate(n_bytes=1000), r"model\.safetensors is truncated: .*lie past"),
    "truncated_header": (_truncate(keep=100), r"is truncated: its header needs \d+ bytes"),
    "empty_file": (_truncate(keep=0), r"0 bytes long: too short for a safetensors file"),
    "appended_bytes": (_append, r"has 64 bytes after its last tensor"),
    "corrupt_header": (_garble_header, r"has a corrupt header"),
    "extra_dense_weight": (
        _tensors(lambda t: t.__setitem__(_key(t, f"{Q}.perm")[:-4] + "weight", torch.zeros(4))),
        rf"tensor '[\w.]*{Q}\.weight' .*is not part of splitq-packed linear {MQ}",
    ),
    "extra_tensor_on_site_member": (
        _tensors(
            lambda t: t.__setitem__(
                _key(t, f"{Q}.perm").replace("q_proj", "k_proj"), t[_key(t, f"{Q}.perm")].clone()
            )
        ),  # fmt: skip
        rf"k_proj\.perm' .*is not part of splitq-packed linear {LAYER}\.self_attn\.k_proj",
    ),
    "wrong_dtype_int": (
        _tensors(lambda t: t.__setitem__(_key(t, f"{Q}.perm"), t[_key(t, f"{Q}.perm")].long())),
        rf"{Q}\.perm' .*is I64 \(64,\) in the checkpoint, but .* requires I32 \(64,\)",
    ),
    "wrong_dtype_float": (_tensors(_nan_dtype_scale), rf"{Q}\.weight_scale_2' .*is F16"),
    "perm_repeated_channel": (
        _tensors(lambda t: t[_key(t, f"{Q}.perm")].__setitem__(0, t[_key(t, f"{Q}.perm")][1])),
        rf"tensor '{MQ}\.perm' is not a permutation of range\(64\): 1 channels repeated",
    ),
    "perm_out_of_range": (
        _set(f"{Q}.perm", 5, 9999),
        rf"tensor '{MQ}\.perm' is not a permutation of range\(64\): 1 entries outside it",
    ),
    "nan_weight_scale": (
        _set(f"{Q}.weight_scale_2", 0, float("nan")),
        rf"tensor '{MQ}\.weight_scale_2' has 1 NaN",
    ),
    "inf_factor": (_set(f"{Q}.factors", 10, float("inf")), rf"'{MQ}\.factors' has 0 NaN and 1 inf"),
    "nonpositive_smoothing": (_set(f"{Q}.smooth", 2, 0.0), rf"'{MQ}\.smooth' has 1 values <= 0"),
    "act_clip_above_one": (_set(f"{Q}.act_clip", 1, 2.0), rf"'{MQ}\.act_clip' must hold ratios"),
    "nan_branch_scale": (
        _set("layers.0.mlp.gate_proj.mac.up_scale", 0, float("nan")),
        rf"'{LAYER}\.mlp\.gate_proj\.mac\.up_scale' has 1 NaN",
    ),
    "config_sizes_disagree_with_tensors": (
        _spec(_reshape_q_paths),
        rf"{Q}\.factors' .*is F32 \(\d+,\) in the checkpoint, but config.json's splitq spec "
        r"\(sizes=\[4, 2, 58\]",
    ),
    "model_config_disagrees_with_spec": (
        _config(lambda c: c["text_config"].update(hidden_size=128)),
        rf"splitq-packed linear {LAYER}\.[\w.]+: the config describes a \d+ x 64 linear .*, but "
        r"the model's linear is \d+ x 128 \(the config does not belong to this model\)",
    ),
    "targets_match_no_module": (
        _spec(lambda g, s: g.__setitem__("targets", ["re:^nothing$"])),
        r"matches no module of this model \(targets \['re:\^nothing\$'\]\)",
    ),
    "member_name_mismatch": (
        _spec(lambda g, s: s.__setitem__("members", ["k_proj", "q_proj", "v_proj"])),
        rf"splitq-packed linear {MQ}: .*records it as member 'k_proj'",
    ),
    "malformed_spec": (
        _spec(lambda g, s: s.pop("factors")),
        r"malformed splitq-packed spec .*KeyError\('factors'\)",
    ),
    "spec_bits_out_of_range": (
        _spec(lambda g, s: s.__setitem__("weight_bits", [4, 4, 12])),
        r"splitq-packed spec .*bit width 12 not in \[2, 8\]",
    ),
    "unknown_format_version": (
        _spec(lambda g, s: s.__setitem__("version", 7)),
        r"unknown splitq-packed format version 7 .*Upgrade splitq_modifier",
    ),
    "not_compressed_status": (
        _config(lambda c: c["quantization_config"].update(quantization_status="frozen")),
        r"splitq-packed checkpoints have quantization_status 'compressed'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_refused_naming_the_problem(ckpt, tmp_path, case):
    damage, pattern = BAD_CHECKPOINTS[case]
    bad = _copy(ckpt, tmp_path)
    damage(bad)
    with pytest.raises(SplitQFormatError, match=pattern):
        AutoModelForImageTextToText.from_pretrained(str(bad))


def test_intact_checkpoint_loads_with_the_checks_on(ckpt, tmp_path):
    """The checks refuse nothing valid: the copy loads and gives the in-memory logits."""
    path, sample, logits = ckpt
    model = AutoModelForImageTextToText.from_pretrained(str(_copy(ckpt, tmp_path)))
    with torch.no_grad():
        torch.testing.assert_close(model(**sample).logits, logits, rtol=1e-4, atol=1e-4)


def test_dequantize_is_refused(ckpt):
    with pytest.raises(SplitQFormatError, match="cannot be dequantized"):
        AutoModelForImageTextToText.from_pretrained(
            str(ckpt[0]), quantization_config=CompressedTensorsConfig(dequantize=True)
        )


# ------------------------------------------------------------------ guarded config.json
def _raw_qc(ckpt) -> dict:
    return json.loads((ckpt[0] / "config.json").read_text())["quantization_config"]


def test_stock_validation_of_the_file_fails_once_naming_the_fix(ckpt):
    """What transformers does without the package: validate config.json's block with
    compressed-tensors' QuantizationConfig (empty config_groups here: the guard still
    fires)."""
    raw = _raw_qc(ckpt)
    assert raw["config_groups"] == {}
    for parse in (QuantizationConfig.model_validate, lambda d: CompressedTensorsConfig(**d)):
        with pytest.raises(ValidationError) as err:
            parse(raw)
        assert err.value.error_count() == 1
        assert GUARD_MESSAGE in str(err.value) and FORMAT_NAME in GUARD_MESSAGE
        assert "import splitq_modifier" in GUARD_MESSAGE


def test_stock_vllm_validation_of_the_file_names_the_plugin(ckpt):
    """What a stock vLLM does first with the file (its compressed-tensors config validates
    ``transform_config`` with compressed-tensors' ``TransformConfig`` while it builds its
    engine config): one error whose location names the package to install. The real
    ``transform_config`` comes back when the package decodes the file."""
    from compressed_tensors.transform import TransformConfig

    raw = _raw_qc(ckpt)
    with pytest.raises(ValidationError) as err:
        TransformConfig.model_validate(raw["transform_config"])
    assert err.value.error_count() == 1
    assert VLLM_GUARD_MESSAGE in str(err.value) and "splitq-modifier" in VLLM_GUARD_MESSAGE
    assert decode_quantization_config(raw)["transform_config"] == {}


def test_guard_round_trip_and_old_layout(ckpt, tmp_path):
    """decode(encode(x)) == x; a checkpoint written before the guard (SplitQ groups in
    config_groups) still loads."""
    raw = _raw_qc(ckpt)
    decoded = decode_quantization_config(raw)
    assert encode_quantization_config(decoded) == raw
    assert decode_quantization_config(decoded) == decoded  # idempotent on the old layout
    assert all(g["format"] == FORMAT_NAME for g in decoded["config_groups"].values())
    old = _copy(ckpt, tmp_path)
    cfg = json.loads((old / "config.json").read_text())
    cfg["quantization_config"] = decoded
    (old / "config.json").write_text(json.dumps(cfg))
    model = AutoModelForImageTextToText.from_pretrained(str(old))
    with torch.no_grad():
        torch.testing.assert_close(model(**ckpt[1]).logits, ckpt[2], rtol=1e-4, atol=1e-4)
