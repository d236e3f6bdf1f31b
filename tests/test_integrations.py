"""The patches of other libraries (:mod:`splitq_modifier.integrations`): version guards, that
each is applied (and only once), and that standard compressed-tensors checkpoints load to the
same logits with and without ``import splitq_modifier``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import splitq_modifier
from splitq_modifier.integrations import PATCHES, SplitQCompatibilityError, check_versions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _outside(spec: str) -> list[str]:
    """A version just below and one just above the range."""
    out = []
    for s in SpecifierSet(spec):
        v = Version(s.version)
        if s.operator == ">=":
            out.append(f"{v.major}.{max(v.minor - 1, 0)}.0" if v.minor else f"{v.major - 1}.99")
        elif s.operator == "<":
            out.append(f"{v.major}.{v.minor}.0" if len(v.release) > 1 else f"{v.major}.0.0")
    return out


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: f"{p.library}:{p.apply.__name__}")
def test_each_patch_refuses_versions_outside_its_range(patch) -> None:
    for version in _outside(patch.supported):
        with pytest.raises(SplitQCompatibilityError) as err:
            patch.check(version)
        msg = str(err.value)
        assert "\n" not in msg
        assert patch.library in msg and version in msg and patch.supported in msg
    patch.check()  # the installed version is supported
    assert patch.why and patch.retire and patch.what


def test_installed_versions_pass() -> None:
    check_versions()


def test_unsupported_library_stops_the_import_with_one_line(tmp_path) -> None:
    """A transformers 6 on the path (only its metadata): ``import splitq_modifier`` fails
    before patching anything, naming the library, the version and the range."""
    info = tmp_path / "transformers-6.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 6.0.0\n")
    code = "import splitq_modifier"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("splitq_modifier.integrations.SplitQCompatibilityError: ")
    assert "transformers >=5.0,<6, found 6.0.0" in last


def test_patches_are_applied_once() -> None:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.format import COMPRESSION_FORMAT_PRIORITY
    from compressed_tensors.config import CompressionFormat
    from llmcompressor.datasets import utils as ds_utils
    from llmcompressor.modifiers.factory import ModifierFactory
    from transformers.quantizers import auto as hf_auto

    from splitq_modifier.format import (
        SplitQCompressedTensorsConfig,
        SplitQCompressedTensorsHfQuantizer,
    )
    from splitq_modifier.integrations import install
    from splitq_modifier.modifier import SplitQModifier

    def state():
        return (
            hf_auto.AUTO_QUANTIZER_MAPPING["compressed-tensors"],
            hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["compressed-tensors"],
            ModelCompressor.__dict__["from_pretrained_model"],
            ds_utils.format_calibration_data,
            COMPRESSION_FORMAT_PRIORITY.count(CompressionFormat("splitq-packed")),
        )

    before = state()
    assert before[0] is SplitQCompressedTensorsHfQuantizer
    assert before[1] is SplitQCompressedTensorsConfig
    assert before[2].__func__._splitq_wrapped and before[3]._splitq_partition_fix
    assert before[4] == 1
    assert ModifierFactory._registered_registry["SplitQModifier"] is SplitQModifier
    install()
    assert state() == before


# --------------------------------------------------------------------------------------------
# Standard compressed-tensors checkpoints, with and without the package
# --------------------------------------------------------------------------------------------
_LOGITS = textwrap.dedent(
    """
    import sys, torch
    if sys.argv[1] == "with":
        import splitq_modifier  # noqa: F401
    from transformers import AutoModelForCausalLM
    out = {}
    for path in sys.argv[3:]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        ids = torch.arange(3, 27).reshape(2, 12)
        with torch.no_grad():
            out[path] = model(input_ids=ids).logits
    torch.save(out, sys.argv[2])
    print("imported splitq_modifier:", "splitq_modifier" in sys.modules)
    """
)


def _standard_checkpoints(root) -> list[str]:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import QuIPModifier
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    recipes = {
        "w4a16": [QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])],
        "w8a8": [QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])],
        "quip_w4a16": [
            QuIPModifier(rotations=["v", "u"], transform_type="random-hadamard"),
            QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
        ],
    }
    paths = []
    for name, recipe in recipes.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        base = str(root / f"{name}-fp")
        model.save_pretrained(base)  # oneshot reads the config from disk
        model = AutoModelForCausalLM.from_pretrained(base)
        oneshot(model=model, recipe=recipe)
        path = str(root / name)
        model.save_pretrained(path, save_compressed=True)
        paths.append(path)
    return paths


def test_standard_checkpoints_load_identically_with_and_without_the_package(tmp_path) -> None:
    paths = _standard_checkpoints(tmp_path)
    fmts = []
    for path in paths:
        with open(os.path.join(path, "config.json")) as f:
            qc = json.load(f)["quantization_config"]
        fmts.append(qc["format"])
        assert "splitq_config_groups" not in qc
    assert fmts[0] == "pack-quantized" and fmts[1] == "int-quantized"
    logits = {}
    for mode in ("without", "with"):
        out = str(tmp_path / f"{mode}.pt")
        proc = subprocess.run([sys.executable, "-c", _LOGITS, mode, out, *paths], cwd=REPO,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"imported splitq_modifier: {mode == 'with'}" in proc.stdout
        logits[mode] = torch.load(out)
    for path in paths:
        assert torch.equal(logits["with"][path], logits["without"][path]), path
        assert torch.isfinite(logits["with"][path]).all()
    assert splitq_modifier.__version__
