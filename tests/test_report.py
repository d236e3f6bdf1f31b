"""The calibration report: written next to the saved model by ``oneshot(output_dir=...)``
(no extra call), by ``modifier.write_report(dir)``, read and re-plotted by
``python -m splitq_modifier.report DIR``."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from _toolkit import one_torch_thread  # noqa: F401  (autouse)
from llmcompressor import oneshot
from safetensors.torch import load_file

import splitq_modifier  # noqa: F401
from splitq_modifier import SplitQModifier
from splitq_modifier import report as report_mod
from splitq_modifier.testing.tiny import (
    build_tiny_vlm,
    calibration_dataset,
    collate,
    synthetic_samples,
)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A tiny Qwen2.5-VL with planted outliers, calibrated by oneshot with output_dir."""
    root = tmp_path_factory.mktemp("report")
    tiny = build_tiny_vlm("qwen2_5_vl", hidden=64, layers=2, outliers=2, path=str(root / "fp"))
    modifier = SplitQModifier(epochs=1, batch_size=2)
    out = str(root / "out")
    oneshot(
        model=tiny.model,
        dataset=calibration_dataset(synthetic_samples(tiny, 4)),
        data_collator=collate,
        recipe=[modifier],
        num_calibration_samples=4,
        processor=tiny.tokenizer,
        output_dir=out,
    )
    return {"tiny": tiny, "modifier": modifier, "out": out, "root": root}


def _load(directory: str) -> dict:
    with open(os.path.join(directory, "report.json")) as f:
        return json.load(f)


def test_oneshot_output_dir_writes_the_report(run):
    data = _load(os.path.join(run["out"], "splitq_report"))
    rep = run["modifier"].report
    sites = {k: v for k, v in rep.items() if "vision" in v}
    layers = {k: v for k, v in rep.items() if "loss_before" in v}
    assert set(data["sites"]) == set(sites) and len(sites) == 8  # 4 sites x 2 layers
    assert set(data["layers"]) == set(layers) and len(layers) == 2
    for key, site in sites.items():
        got = data["sites"][key]
        assert got["vision_channels"] == site["vision"] and got["text_channels"] == site["text"]
        assert [got["sizes"][p] for p in ("vision", "text", "main")] == site["sizes"]
        assert sum(got["sizes"].values()) == got["dim"]
        assert got["num_vision_tokens"] == site["num_vision_tokens"] > 0
    for key, layer in layers.items():
        assert data["layers"][key]["loss_before"] == pytest.approx(layer["loss_before"])
        assert data["layers"][key]["loss_after"] == pytest.approx(layer["loss_after"])
    s = data["settings"]
    assert (s["weight_bits"], s["activation_bits"], s["epochs"]) == (4, 4, 1)
    assert data["model"]["vision_token_ids"] == [
        run["tiny"].image_token_id,
        run["tiny"].image_token_id + 1,
    ]


def test_channel_maxima_show_the_planted_outliers(run):
    directory = os.path.join(run["out"], "splitq_report")
    tensors = load_file(os.path.join(directory, "channel_max.safetensors"))
    key = "model.language_model.layers.0.attn_in"
    vmax, tmax = tensors[f"{key}.vision_max"], tensors[f"{key}.text_max"]
    assert vmax.shape == tmax.shape == (64,)
    top_v = set(torch.topk(vmax, 2).indices.tolist())
    top_t = set(torch.topk(tmax, 2).indices.tolist())
    assert top_v == set(run["tiny"].vision_channels)  # what the plot shows, per modality
    assert top_t == set(run["tiny"].text_channels)
    data = _load(directory)
    assert top_v <= set(data["sites"][key]["vision_channels"])


def test_plots_exist_and_are_pngs(run):
    directory = os.path.join(run["out"], "splitq_report")
    data = _load(directory)
    assert len(data["plots"]) == 8 + 2
    assert "layer_error.png" in data["plots"] and "path_widths.png" in data["plots"]
    for rel in data["plots"]:
        path = os.path.join(directory, rel)
        with open(path, "rb") as f:
            assert f.read(8) == PNG, path
        assert os.path.getsize(path) > 2000, path


def test_write_report_json_only_and_without_matplotlib(run, tmp_path, monkeypatch):
    a = run["modifier"].write_report(str(tmp_path / "a"), plots=False)
    assert _load(a)["plots"] == [] and not os.path.exists(os.path.join(a, "channels", "x"))
    assert set(_load(a)["sites"]) == set(_load(os.path.join(run["out"], "splitq_report"))["sites"])
    monkeypatch.setattr(report_mod, "_pyplot", lambda: None)
    b = run["modifier"].write_report(str(tmp_path / "b"))
    assert _load(b)["plots"] == [] and os.path.exists(os.path.join(b, "channel_max.safetensors"))
    assert not any(f.endswith(".png") for _, _, fs in os.walk(b) for f in fs)


def test_save_pretrained_after_oneshot_writes_it_too(run):
    path = str(run["root"] / "resaved")
    run["tiny"].model.save_pretrained(path, save_compressed=True)
    assert _load(os.path.join(path, "splitq_report"))["summary"]["layers"] == 2


def test_cli_prints_and_replots(run, capsys):
    directory = os.path.join(run["out"], "splitq_report")
    layer_png = os.path.join(directory, "layer_error.png")
    os.remove(layer_png)
    assert report_mod.main([run["out"], "--plot"]) == 0
    assert os.path.getsize(layer_png) > 2000
    text = capsys.readouterr().out
    for name in run["modifier"].report:
        assert name in text
    assert "W4A4" in text and "vision/text/main" in text
    assert report_mod.main([run["out"], "--json", "--sites", "attn_in$"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "splitq-report"


def test_cli_names_a_missing_report(tmp_path, capsys):
    assert report_mod.main([str(tmp_path)]) == 2
    assert "no SplitQ report" in capsys.readouterr().err


def test_python_dash_m_entry_point(run, monkeypatch, capsys):
    """``python -m splitq_modifier.report DIR --sites ...`` (run as ``__main__`` in-process)."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["report", run["out"], "--sites", "layers.1"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("splitq_modifier.report", run_name="__main__")
    out = capsys.readouterr().out
    assert exit_.value.code in (0, None)
    assert "model.language_model.layers.1.mlp_down" in out
    assert "model.language_model.layers.0.mlp_down " not in out
