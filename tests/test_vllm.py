"""Serving a SplitQ checkpoint in a real vLLM engine (the plugin ``splitq_modifier.vllm``).

vLLM pins compressed-tensors 0.17 and this project's environment has 0.19, so vLLM runs in
its own environment (``.ci/vllm-env`` builds it once and caches it outside the repository)
and these tests drive it through subprocesses (``benchmarks/vllm_engine.py`` and its worker),
with this checkout installed for it on ``PYTHONPATH`` (its ``vllm.general_plugins`` entry point
is how every vLLM process finds the plugin). The checkpoint is the language model of a tiny
Qwen2.5-VL quantized with SplitQ W4A4, re-saved as the text-only ``Qwen2ForCausalLM`` (vLLM's
VLM classes need torchvision, which has no build for this machine's CPU torch).

Two engines, so that each of in-process / multi-process, eager / compiled and tensor
parallelism runs once (``python benchmarks/vllm_engine.py`` runs every combination):

1. in-process, compiled (``enforce_eager=False``: vLLM's torch.compile of the model):
   greedy tokens and top-5 logprobs against the transformers runtime; then, in the same
   process, every SplitQ layer of the loaded model (vLLM's own ``QKVParallelLinear`` /
   ``MergedColumnParallelLinear`` / ``RowParallelLinear``, loaded through their weight loaders
   by vLLM's model loader) against ``SplitQSiteLinear`` bit for bit, with all tokens text and
   after vLLM's multimodal embedding step marked a synthetic ``is_multimodal``; and vLLM's
   own compressed-tensors parser on the checkpoint's config (what a stock vLLM runs);
2. multi-process (the plugin loaded through its entry point in the engine core and worker
   processes), eager, tensor-parallel (2 ranks: column- and row-parallel sites sharded, the
   single kv head replicated), against the same reference.

Without the vLLM environment (build it with ``.ci/vllm-env``) the engine tests are skipped,
unless ``SPLITQ_REQUIRE_VLLM=1`` (``.ci/run`` sets it, after building it) turns that into a
failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from benchmarks import vllm_engine as ve  # the benchmark's harness
from splitq_modifier.format import FORMAT_VERSION
from splitq_modifier.vllm.shard import (
    ROW_ORDER_VERSIONS,
    check_shardable,
    column_layout,
    full_layout,
    row_layout,
)

ATOL = 1e-4


# ---------------------------------------------------------------------- sharding (no vLLM)
def _cover(layouts, total):
    rows = sorted(r for lay in layouts for r in lay.rows)
    seen = torch.zeros(total, dtype=torch.long)
    for s, n in rows:
        seen[s : s + n] += 1
    return seen


def test_column_layout_shards_each_linear_and_replicates_kv_heads():
    # q 128 | k 32 | v 32 over 2 ranks with one kv head: q split, k and v replicated
    lays = [column_layout([128, 32, 32], [64, 32, 32], r, 2) for r in range(2)]
    assert lays[0].rows == ((0, 64), (128, 32), (160, 32))
    assert lays[1].rows == ((64, 64), (128, 32), (160, 32))
    assert lays[1].out_splits == (64, 32, 32) and not lays[1].gather_input
    # gate/up over 4 ranks: every row exactly once
    lays = [column_layout([256, 256], [64, 64], r, 4) for r in range(4)]
    assert torch.equal(_cover(lays, 512), torch.ones(512, dtype=torch.long))
    assert full_layout([128, 32, 32]).is_full
    with pytest.raises(ValueError, match="cannot be split"):
        column_layout([128, 32], [48, 16], 0, 2)
    with pytest.raises(ValueError, match="cannot be sharded"):
        column_layout([192], [64, 32, 32], 0, 2)  # a pre-fused qkv site over 2 ranks


def test_row_layout_computes_disjoint_output_blocks():
    lays = [row_layout([128], r, 2) for r in range(2)]
    assert [lay.rows for lay in lays] == [((0, 64),), ((64, 64),)]
    assert [lay.out_offset for lay in lays] == [0, 64]
    assert all(lay.gather_input and lay.total == 128 for lay in lays)
    assert torch.equal(_cover(lays, 128), torch.ones(128, dtype=torch.long))
    assert not row_layout([128], 0, 1).gather_input
    with pytest.raises(ValueError, match="not divisible"):
        row_layout([130], 0, 4)


def test_tensor_parallelism_needs_a_format_version_with_row_order():
    """Row slices are a rank's outputs only in format versions that store output ``o`` in row
    ``o``: the version this package writes does; another (e.g. a tensor-core fragment
    order) is refused with TP > 1, naming the version, and still serves with TP 1."""
    assert FORMAT_VERSION in ROW_ORDER_VERSIONS
    check_shardable(FORMAT_VERSION, 2)
    check_shardable(99, 1)
    with pytest.raises(NotImplementedError, match="format version 99 .* tensor_parallel_size=1"):
        check_shardable(99, 2, "model.layers.0.self_attn.qkv_proj")


# ---------------------------------------------------------------------- engine fixtures
@pytest.fixture(scope="module")
def vllm_python():
    try:
        return ve.vllm_python(build=False)
    except RuntimeError as e:
        if os.environ.get("SPLITQ_REQUIRE_VLLM") == "1":
            raise
        pytest.skip(f"no vLLM environment: {e}")


@pytest.fixture(scope="module")
def served(tmp_path_factory, vllm_python):
    """(checkpoint dir, transformers reference, plugin overlay dir)."""
    root = tmp_path_factory.mktemp("vllm")
    path = ve.make_checkpoint(root)
    overlay = ve.plugin_overlay(vllm_python, root / "plugin")
    return path, ve.hf_reference(path), overlay


# vLLM layer name -> transformers owner of the same site (layer index filled in)
_SITES = {
    "self_attn.qkv_proj": "self_attn.q_proj",
    "self_attn.o_proj": "self_attn.o_proj",
    "mlp.gate_up_proj": "mlp.gate_proj",
    "mlp.down_proj": "mlp.down_proj",
}


def _site_inputs(path: Path, out: Path) -> dict:
    """Inputs for every site of the model, a synthetic multimodal step, and what
    ``SplitQSiteLinear`` (the transformers runtime) computes for them."""
    from transformers import AutoModelForCausalLM

    from splitq_modifier.runtime import ModalityContext

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    n = 13
    # one flat step of two requests as vLLM schedules them: the first a prefill chunk ending
    # inside an image (positions 0-3 vision), the second text then the start of an image
    is_mm = torch.zeros(n, dtype=torch.bool)
    is_mm[:4] = True
    is_mm[10:] = True
    ids = torch.randint(0, 500, (n,), generator=g)
    hidden = model.config.hidden_size
    data = {"x": {}, "input_ids": ids, "is_multimodal": is_mm,
            "mm_embeds": torch.randn(int(is_mm.sum()), hidden, generator=g)}  # fmt: skip
    expected = {"text": {}, "masked": {}}
    with torch.no_grad():
        for i in range(model.config.num_hidden_layers):
            for vname, hname in _SITES.items():
                owner = model.get_submodule(f"model.layers.{i}.{hname}")
                x = torch.randn(n, owner.in_features, generator=g) * 2
                name = f"model.layers.{i}.{vname}"
                data["x"][name] = x
                owner.context = ModalityContext()
                expected["text"][name] = owner.site_forward(x)
                owner.context.text_mask = ~is_mm
                expected["masked"][name] = owner.site_forward(x)
    torch.save(data, out)
    return expected


@pytest.fixture(scope="module")
def inproc(served, vllm_python, tmp_path_factory):
    """One in-process compiled engine: generation, then the site checks."""
    path, ref, overlay = served
    work = tmp_path_factory.mktemp("sites")
    expected = _site_inputs(path, work / "sites.pt")
    args, mp, tp = ve.engine_args(path, "inproc-compiled")
    args += ["--sites", str(work / "sites.pt"), str(work / "out.pt")]
    res = ve.run_worker(vllm_python, args, ve.vllm_env(overlay, mp, tp))
    return res, torch.load(work / "out.pt", weights_only=False), expected


# ---------------------------------------------------------------------- engine tests
def _assert_matches(ref, res):
    assert res["quantization"] == "splitq"
    cmp = ve.compare(ref, res["outputs"])
    assert cmp["tokens_equal"], (ref, res["outputs"])
    assert cmp["top5_ids_equal"]
    assert cmp["max_abs_dlogprob"] <= ATOL, cmp
    vision = set(range(508, 512))
    assert not any(vision & set(r["tokens"]) for r in ref)  # the mask is all-text here


def test_inprocess_compiled_engine_matches_transformers(served, inproc):
    _assert_matches(served[1], inproc[0])
    # served with vLLM's compressed-tensors, without llm-compressor or the calibration code
    assert inproc[0]["compressed_tensors"].startswith("0.17")
    assert inproc[0]["imported"] == []


def test_vllm_layers_are_bit_exact_against_splitq_site_linear(inproc):
    _, out, expected = inproc
    assert out["layer_types"] == {
        **{f"model.layers.{i}.self_attn.qkv_proj": "QKVParallelLinear" for i in range(2)},
        **{f"model.layers.{i}.self_attn.o_proj": "RowParallelLinear" for i in range(2)},
        **{f"model.layers.{i}.mlp.gate_up_proj": "MergedColumnParallelLinear" for i in range(2)},
        **{f"model.layers.{i}.mlp.down_proj": "RowParallelLinear" for i in range(2)},
    }
    for name, want in expected["text"].items():
        assert torch.equal(out["text"][name], want), name


def test_multimodal_positions_reach_the_mac_branch(inproc):
    """vLLM's embedding step (``SupportsMultiModal.embed_input_ids`` with a synthetic
    ``is_multimodal``) sets the text mask every SplitQ layer reads; a later step without
    positions makes every token text again."""
    _, out, expected = inproc
    data_mask = out["mask_after_mm_step"]
    assert out["attached"] and out["shared_mask"] and out["merged_ok"]
    assert data_mask.tolist() == [False] * 4 + [True] * 6 + [False] * 3
    assert out["mask_after_text_step"].all()
    differs = 0
    for name, want in expected["masked"].items():
        assert torch.equal(out["masked"][name], want), name
        # text rows are unchanged by the mask, vision rows lose the MAC correction
        assert torch.equal(want[data_mask], expected["text"][name][data_mask])
        differs += int(not torch.equal(want[~data_mask], expected["text"][name][~data_mask]))
    assert differs == len(expected["masked"])  # every site's MAC branch is active


def test_multiprocess_tensor_parallel_engine_matches_transformers(served, vllm_python):
    path, ref, overlay = served
    args, mp, tp = ve.engine_args(path, "mp-eager-tp2")
    res = ve.run_worker(vllm_python, args, ve.vllm_env(overlay, mp, tp))
    _assert_matches(ref, res)


def test_stock_vllm_parser_names_the_plugin(inproc):
    """vLLM's own compressed-tensors parser, which a stock vLLM (plugin absent) runs while it
    builds its engine config, stops with one validation error naming the package to install
    (the checkpoint's vLLM guard), not with the kv-cache error it raised before."""
    from splitq_modifier.format.guard import VLLM_GUARD_MESSAGE

    text = inproc[0]["stock_parser"]
    assert text.startswith("ValidationError: 1 validation error for TransformConfig"), text
    assert VLLM_GUARD_MESSAGE in text and "splitq-modifier" in text
    assert "kv cache" not in text


def test_vllm_layer_names_find_their_sites(inproc):
    """The plugin's config finds the site of a vLLM layer by its fused members, directly (the
    text-only names) or through the inverse of the model's renames (the VLM's targets name
    ``model.language_model.layers``, vLLM's LLaVA ``language_model.model.layers``), and
    refuses layers that split or mix sites, naming them."""
    m = inproc[0]["matching"]
    assert m["text"] == ["q_proj", "k_proj", "v_proj"] and m["text_o"] == ["o_proj"]
    assert m["vlm_mapped"] == ["gate_proj", "up_proj"]
    assert m["vlm_unmapped"] is None and m["vision"] is None and m["lm_head"] is None
    assert "runs model.layers.0.self_attn.q_proj as a layer of its own" in m["unfused"]
    assert "does not match the site" in m["member_alone"]
    assert m["mixed"].startswith("SplitQFormatError: vLLM layer model.layers.0.self_attn.qkvo")
    assert "only ['model.layers.0.self_attn.q_proj'] are splitq-packed" in m["partial"]


def test_runtime_reads_the_format_beside_vllms_compressed_tensors(inproc):
    """The runtime owns its packing: beside vLLM's compressed-tensors (0.17, which packs
    3-bit codes 10 per word), it reads the format's dense bit stream at every width."""
    assert inproc[0]["unpacking"] == {"2": "ok", "3": "ok", "4": "ok", "8": "ok"}
