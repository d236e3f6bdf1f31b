"""``benchmarks/gpu_check.py`` end to end on CPU: Triton's interpreter, tiny widths (the same
phases as on a GPU: checks of both kernels and the op against the reference, timings of the
kernels and the decoder layer against bf16, one JSON). Asserts what the run found and wrote,
not how long it took."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SITES = {"attn_in", "attn_out", "mlp_in", "mlp_down"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_gpu_check_tiny_end_to_end(tmp_path) -> None:
    out = tmp_path / "check.json"
    proc = _run("--tiny", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["card"] == "CPU (Triton interpreter)" and r["model"] == "tiny"
    assert {(c["site"], c["tokens"]) for c in r["checks"]} == {
        (s, n) for s in SITES for n in r["check_tokens"]
    }
    for c in r["checks"]:
        assert not c["errors"], c["errors"]
        assert c["kernel_a"]["pass"] and c["kernel_b"]["pass"] and c["op"]["pass"], c
        assert set(c["kernel_a"]["paths"]) <= {"vision", "text", "main"}
        assert c["kernel_b"]["rel_err"] <= 1e-6
    assert r["all_checks_pass"]
    t = r["timings"]
    assert not t["errors"], t["errors"]
    whats = {"kernel A", "kernel B", "op", "bf16 linears"}
    assert {(x["site"], x["tokens"], x["what"]) for x in t["sites"]} == {
        (s, n, w) for s in SITES for n in r["time_tokens"] for w in whats
    }
    assert {(x["layer"], x["what"]) for x in t["layer"]} == {
        (k, w) for k in ("splitq", "bf16") for w in ("linears only", "full layer")
    }
    assert all(x["ms"] > 0 for x in t["sites"] + t["layer"])


def test_gpu_check_worker(tmp_path) -> None:
    """One check in a worker process (how phase 1 runs on a GPU), and the importable package
    without its library integrations."""
    out = tmp_path / "w.json"
    proc = _run("--tiny", "--worker", "attn_out:1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    rec = json.loads(out.read_text())
    assert rec["site"] == "attn_out" and rec["tokens"] == 1 and not rec["errors"]
    assert rec["kernel_a"]["pass"] and rec["kernel_b"]["pass"] and rec["op"]["pass"]
    probe = (
        "import sys; sys.argv = ['x']; import runpy; "
        f"g = runpy.run_path({str(SCRIPT)!r}); g['_import_runtime_only'](); "
        "import splitq_modifier.runtime, splitq_modifier.kernels; "
        "print(sorted(m for m in ('compressed_tensors', 'transformers', 'llmcompressor') "
        "if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("[]"), proc.stderr[-3000:]
