"""Fast smoke run of the fidelity benchmark: one method of each kind, end to end."""

import math
import os

import pytest

from benchmarks import fidelity


def test_fidelity_benchmark_smoke(tmp_path, monkeypatch):
    build = fidelity.build_tiny_vlm
    monkeypatch.setattr(
        fidelity,
        "build_tiny_vlm",
        lambda arch, hidden, layers, seed: build(
            arch, hidden=64, layers=1, seed=seed, path=str(tmp_path / "m")
        ),
    )
    out = str(tmp_path / "out")
    args = ["--settings", "W3A3", "--calib", "4", "--eval", "2", "--epochs", "1", "--out", out]
    # an llm-compressor method, SplitQ, and the mixed-precision baseline (with its bit count)
    methods = ["quip", "splitq", "base-mp"]
    rows = fidelity.main(["--model", "planted", "--methods", *methods, *args])["W3A3"]
    assert list(rows) == methods
    for name, r in rows.items():
        assert math.isfinite(r["kl_all"]) and r["kl_all"] >= 0, name
        assert 0.0 <= r["top1_all"] <= 1.0
    assert rows["quip"]["bits_w"] == 3 and rows["quip"]["bits_a"] == 3
    # base-mp: 2 + 2 of 64 channels at the 4-bit floor, no branches
    assert rows["base-mp"]["bits_a"] == pytest.approx((4 * 4 + 60 * 3) / 64, abs=0.05)
    assert rows["splitq"]["bits_a"] > rows["base-mp"]["bits_a"]  # the branches' activations
    # per-site outlier widths of the SplitQ runs: ceil(2% of the site's width) per path
    assert rows["quip"]["widths"] == {}
    widths = {k.rsplit(".", 1)[1]: w for k, w in rows["splitq"]["widths"].items()}
    assert widths == {"q_proj": [2, 2], "o_proj": [2, 2], "gate_proj": [2, 2], "down_proj": [3, 3]}
    assert os.path.exists(os.path.join(out, "fidelity_planted_methods.json"))


def test_model_names_reach_the_right_loader(monkeypatch):
    """The benchmark's own model names are built or trained here (never looked up as hub ids
    by the real-model evaluation), and any other name goes to that evaluation."""
    import splitq_modifier.evaluate as evaluate

    real = []
    monkeypatch.setattr(evaluate, "main", lambda argv: real.append(argv) or {"real": True})
    assert fidelity.main(["--model", "org/some-vlm", "--quantized", "q"]) == {"real": True}
    assert real == [["--model", "org/some-vlm", "--quantized", "q"]]

    loaded = []

    class Stop(Exception):
        pass

    def load_or_train(**kw):
        loaded.append(kw)
        raise Stop

    import benchmarks.train_tiny_vlm as tv

    monkeypatch.setattr(tv, "load_or_train", load_or_train)
    monkeypatch.setitem(__import__("sys").modules, "train_tiny_vlm", tv)
    monkeypatch.setattr(fidelity, "build_tiny_vlm", lambda *a, **k: (_ for _ in ()).throw(Stop()))
    for name in fidelity.BENCH_MODELS:
        try:
            fidelity.load_bench(name, 2, 2, 0)
        except Stop:
            pass
    assert real == [["--model", "org/some-vlm", "--quantized", "q"]]  # no bench name went there
    trained = [n for n in fidelity.BENCH_MODELS if n.startswith("trained")]
    assert len(loaded) == len(trained) >= 4


def test_replot_redraws_a_saved_run(tmp_path):
    """``--replot`` draws mean and spread from a saved run's per-seed numbers."""
    import json

    run = {"kl_all": 0.1, "top1_all": 0.9, "accuracy": 0.8}
    saved = {
        "fp_accuracy": 0.85,
        "results": {"W4A4": {"a": run, "b": run}},
        "runs": {"W4A4": {"a": [run, {**run, "kl_all": 0.2}], "b": [run, run]}},
    }
    path = tmp_path / "fidelity_x.json"
    path.write_text(json.dumps(saved))
    assert fidelity.main(["--replot", str(path)]) == saved["results"]
    png = tmp_path / "fidelity_x.png"
    assert png.exists() and png.stat().st_size > 0
