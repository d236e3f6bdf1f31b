"""Fast smoke run of the fidelity benchmark: every method and an ablation, end to end."""

import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import fidelity  # noqa: E402


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
    args = ["--settings", "W4A4", "--calib", "4", "--eval", "2", "--epochs", "1", "--out", out]
    results = fidelity.main(["--model", "planted", *args])
    rows = results["W4A4"]
    assert set(rows) == set(fidelity.METHODS)
    for name, r in rows.items():
        assert math.isfinite(r["kl_all"]) and r["kl_all"] >= 0, name
        assert 0.0 <= r["top1_all"] <= 1.0
    assert os.path.exists(os.path.join(out, "fidelity_planted_methods.json"))
    ladder = fidelity.main(["--model", "planted", "--ablation", "ladder", *args])["W4A4"]
    assert list(ladder) == ["base", "+MOCD", "+CWS", "+MAC"]
