"""The ``splitq-packed`` format: save after oneshot, reload in a fresh process, same logits.

One module-scoped fixture calibrates tiny LLaVA and Qwen2.5-VL models (hidden 64, one decoder
layer, 2 samples, 1 epoch) at W4A8, W4A4, W3A3 and W3A2 (CWS and MAC on, except one case),
two of them with llm-compressor's QuantizationModifier on ``lm_head`` in the same recipe
(W8A8 int-quantized, W4A16 pack-quantized), and saves each with
``save_pretrained(dir, save_compressed=True)``. A single fresh subprocess first tries to load
without importing the package (it must fail naming ``import splitq_modifier``), then imports
``splitq_modifier``, reloads every checkpoint with the model's Auto class and writes its
logits; they must equal the in-memory quantized model's within 1e-4 relative (fp32).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _dense import dense_site_forward
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

import splitq_modifier  # noqa: F401  (registers the format)
from splitq_modifier import SplitQModifier
from splitq_modifier.acc import QuantBranch
from splitq_modifier.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    GUARD_MESSAGE,
    LinearSpec,
    SplitQFormatError,
    SplitQPackedCompressor,
    decode_quantization_config,
)
from splitq_modifier.runtime import (
    ModalityContext,
    SplitQSiteLinear,
    pack_path_weight,
    unpack_mma_weight,
)
from splitq_modifier.split_linear import ChannelSplit, SplitQLinear, SplitSite, freeze_site
from splitq_modifier.testing.tiny import (
    build_tiny_vlm,
    calibration_dataset,
    collate,
    synthetic_samples,
)

#: name -> (arch, weight bits, activation bits, CWS/MAC on, lm_head scheme or None)
CASES = {
    "llava-w4a8-lmhead_w8a8": ("llava", 4, 8, True, "W8A8"),
    "llava-w4a4": ("llava", 4, 4, True, None),
    "llava-w3a2": ("llava", 3, 2, True, None),
    "qwen-w4a4-lmhead_w4a16": ("qwen2_5_vl", 4, 4, True, "W4A16"),
    "qwen-w3a2-no_branches": ("qwen2_5_vl", 3, 2, False, None),
}
REL_TOL = 1e-4


def _lm_head_modifier(scheme: str) -> QuantizationModifier:
    """Per-channel int weights on lm_head (tiny widths are not multiples of 128 groups)."""
    w8a8 = scheme == "W8A8"
    acts = dict(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    return QuantizationModifier(
        config_groups={
            "lm_head": dict(
                targets=["lm_head"],
                weights=dict(
                    num_bits=8 if w8a8 else 4, type="int", symmetric=True, strategy="channel"
                ),
                input_activations=acts if w8a8 else None,
            )
        }
    )


def _calibrate(case: str, root: Path):
    arch, wb, ab, branches, lm_head = CASES[case]
    tiny = build_tiny_vlm(arch, hidden=64, layers=1, path=str(root / f"{case}-fp"))
    ratios = {} if branches else dict(cws_rank_ratio=0.0, mac_rank_ratio=0.0)
    recipe = [
        SplitQModifier(epochs=1, weight_bits=wb, activation_bits=ab, batch_size=2, seed=0, **ratios)
    ]
    if lm_head:
        recipe.append(_lm_head_modifier(lm_head))
    oneshot(
        model=tiny.model,
        dataset=calibration_dataset(synthetic_samples(tiny, 2)),
        data_collator=collate,
        recipe=recipe,
        num_calibration_samples=2,
        processor=tiny.tokenizer,
    )
    return tiny


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """case -> (saved dir, in-memory quantized model, eval sample, in-memory logits)."""
    root = tmp_path_factory.mktemp("splitq_format")
    out = {}
    for case in CASES:
        tiny = _calibrate(case, root)
        sample = synthetic_samples(tiny, 1, seed=7)[0]
        with torch.no_grad():
            logits = tiny.model(**sample).logits
        path = root / case
        tiny.model.save_pretrained(str(path), save_compressed=True)  # right after its oneshot
        torch.save({"sample": sample, "logits": logits}, path / "expected.pt")
        out[case] = (path, tiny.model, sample, logits)
    return out


_RELOAD = textwrap.dedent(
    """
    import hashlib, json, sys, torch
    from transformers import AutoModelForImageTextToText

    dirs, res = sys.argv[1:], {}
    try:  # without the package: transformers' config validation must fail
        AutoModelForImageTextToText.from_pretrained(dirs[0])
        res["no_import"] = "loaded"
    except Exception as e:
        res["no_import"] = f"{type(e).__name__}: {e}"
    res["imported_before"] = "splitq_modifier" in sys.modules

    import splitq_modifier
    from splitq_modifier.runtime import SplitQSiteLinear

    for d in dirs:
        model = AutoModelForImageTextToText.from_pretrained(d)
        exp = torch.load(d + "/expected.pt", weights_only=False)
        with torch.no_grad():
            logits = model(**exp["sample"]).logits
        torch.save(logits, d + "/reloaded_logits.pt")
        sq = {n: m for n, m in model.named_modules() if isinstance(m, SplitQSiteLinear)}
        attn = next(
            m for n, m in model.named_modules() if n.endswith("language_model.layers.0.self_attn")
        )
        owners = [m for m in sq.values() if m.is_owner]
        res[d] = {
            "splitq_linears": len(sq),
            "owners": len(owners),
            "dense_weight": [n for n, m in sq.items() if "weight" in m._parameters],
            "params_in_splitq": sum(len(list(m.parameters())) for m in sq.values()),
            "site_shared": attn.k_proj.owner is attn.q_proj and attn.v_proj.owner is attn.q_proj,
            "member_buffers": len(list(attn.k_proj.buffers())),
            "context_hook": hasattr(model, "_splitq_context_hook"),
            "all_share_context": all(m.context is model.splitq_context for m in owners),
            "decompress_hook": hasattr(model, "ct_decompress_hook"),
            "lm_head": [type(model.lm_head).__name__, "weight" in model.lm_head._parameters],
        }
        model.save_pretrained(d + "-resaved")  # plain transformers save of the loaded model
        digest = [
            hashlib.sha256(open(p + "/model.safetensors", "rb").read()).hexdigest()
            for p in (d, d + "-resaved")
        ]
        qc = json.load(open(d + "-resaved/config.json"))["quantization_config"]
        res[d]["resave"] = [digest[0] == digest[1], qc["quantization_status"]]
    print("RESULT" + json.dumps(res))
    """
)


@pytest.fixture(scope="module")
def reloaded(saved) -> dict:
    """Load every checkpoint in one fresh process (after a load without the package)."""
    dirs = [str(path) for path, *_ in saved.values()]
    proc = subprocess.run(
        [sys.executable, "-c", _RELOAD, *dirs],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT") :])


# -------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("case", list(CASES))
def test_reloaded_logits_match_in_memory(case, saved, reloaded):
    path, _, _, expected = saved[case]
    got = torch.load(path / "reloaded_logits.pt")
    err = (got - expected).abs().max() / expected.abs().max()
    assert err <= REL_TOL, f"{case}: relative logit error {err:.3g}"


@pytest.mark.parametrize("case", list(CASES))
def test_reloaded_model_runs_from_packed_tensors(case, saved, reloaded):
    path, model, _, _ = saved[case]
    info = reloaded[str(path)]
    n_layers = model.config.get_text_config().num_hidden_layers
    assert info["splitq_linears"] == 7 * n_layers and info["owners"] == 4 * n_layers
    assert info["dense_weight"] == [] and info["params_in_splitq"] == 0
    assert info["site_shared"] and info["member_buffers"] == 0  # q_proj stores the site
    assert info["context_hook"] and info["all_share_context"]
    assert not info["decompress_hook"]
    if CASES[case][4]:  # the lm_head of the other modifier is decompressed as usual
        assert info["lm_head"] == ["Linear", True]
    # transformers' own save_pretrained of the reloaded model writes the same tensors again
    assert info["resave"] == [True, "compressed"]


def test_loading_without_the_package_names_it(reloaded):
    assert not reloaded["imported_before"]
    assert "import splitq_modifier" in reloaded["no_import"]
    assert FORMAT_NAME in reloaded["no_import"]
    # one short error (the checkpoint also has an int-quantized lm_head group), not one per
    # config group listing compressed-tensors' whole format enum
    assert "1 validation error" in reloaded["no_import"]
    assert len(reloaded["no_import"].splitlines()) <= 4
    assert "Input should be 'dense'" not in reloaded["no_import"]


# -------------------------------------------------------------------------- saved files
@pytest.mark.parametrize("case", list(CASES))
def test_config_names_format_and_version(case, saved):
    path = saved[case][0]
    raw = json.loads((path / "config.json").read_text())["quantization_config"]
    # on disk the SplitQ groups sit beside config_groups, behind a guard for stock loaders
    assert not any(g["format"] == FORMAT_NAME for g in raw["config_groups"].values())
    assert list(raw["kv_cache_scheme"]) == [GUARD_MESSAGE]
    qc = decode_quantization_config(raw)
    assert qc["quant_method"] == "compressed-tensors"
    lm_head = CASES[case][4]
    assert qc["format"] == ("mixed-precision" if lm_head else FORMAT_NAME)
    splitq = {k: g for k, g in qc["config_groups"].items() if g["format"] == FORMAT_NAME}
    assert splitq and all("import splitq_modifier" in k for k in splitq)
    for group in splitq.values():
        spec = group["weights"]["observer_kwargs"]["splitq"]
        assert spec["version"] == FORMAT_VERSION and spec["format"] == FORMAT_NAME
    others = {g["format"] for g in qc["config_groups"].values()} - {FORMAT_NAME}
    expected = {"W8A8": {"int-quantized"}, "W4A16": {"pack-quantized"}, None: set()}
    assert others == expected[lm_head]


def test_saved_tensors_are_derivable_from_the_scheme(saved):
    """What a layer stores = what its scheme and linear shape say (no dense weight, site
    tensors once per site, empty paths not stored)."""
    for case in ("llava-w3a2", "qwen-w3a2-no_branches"):
        path, model, _, _ = saved[case]
        for name, m in model.named_modules():
            if not isinstance(m, SplitQSiteLinear):
                continue
            spec = LinearSpec.from_scheme(m.quantization_scheme)
            want = spec.tensor_shapes(m.out_features, m.in_features)
            got = {k: (tuple(v.shape), v.dtype) for k, v in m.state_dict().items()}
            assert got == want, name
            assert (spec.site is None) == name.endswith(
                ("q_proj", "o_proj", "gate_proj", "down_proj")
            )
            assert m.is_owner == (spec.site is None) and (m.is_owner or not got)


def test_recipe_reparses(saved):
    from llmcompressor.recipe import Recipe

    path = saved["qwen-w4a4-lmhead_w4a16"][0]
    recipe = Recipe.create_instance(str(path / "recipe.yaml"))
    kinds = [type(m).__name__ for m in recipe.modifiers]
    assert kinds == ["SplitQModifier", "QuantizationModifier"]
    sq = recipe.modifiers[0]
    assert isinstance(sq, SplitQModifier) and (sq.weight_bits, sq.activation_bits) == (4, 4)


def test_same_model_and_seed_give_identical_bytes(saved, tmp_path):
    path, model, _, _ = saved["llava-w3a2"]
    tiny = _calibrate("llava-w3a2", tmp_path)  # same builder seed and SplitQ seed
    tiny.model.save_pretrained(str(tmp_path / "again"), save_compressed=True)
    model.save_pretrained(str(tmp_path / "resaved"), save_compressed=True)  # second save

    def digest(p: Path) -> str:
        return hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()

    assert digest(tmp_path / "again") == digest(path) == digest(tmp_path / "resaved")


def test_other_formats_are_refused(saved, tmp_path):
    model = saved["llava-w4a4"][1]
    with pytest.raises(SplitQFormatError, match="only in the 'splitq-packed' format"):
        model.save_pretrained(str(tmp_path / "dense"), save_compressed=False)
    with pytest.raises(SplitQFormatError, match="dense weight cannot be compressed"):
        scheme = next(
            m.quantization_scheme for m in model.modules() if isinstance(m, SplitQSiteLinear)
        )
        SplitQPackedCompressor.compress({"weight": torch.zeros(64, 64)}, scheme)


# -------------------------------------------------------------------------- bad checkpoints
def _copy(saved, tmp_path: Path, case: str = "llava-w4a4") -> Path:
    dst = tmp_path / "bad"
    shutil.copytree(saved[case][0], dst)
    return dst


def _edit_tensors(path: Path, fn) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _key(tensors: dict, suffix: str) -> str:
    """The checkpoint key ending in ``suffix`` (checkpoints may use legacy prefixes, e.g.
    LLaVA's ``language_model.model.layers.*``)."""
    (key,) = [k for k in tensors if k.endswith(suffix)]
    return key


@pytest.mark.parametrize(
    "suffix",
    [
        "layers.0.self_attn.q_proj.perm",  # a site tensor (stored on the site's first linear)
        "layers.0.mlp.gate_proj.mac.up_packed",  # a branch factor (of gate and up)
    ],
)
def test_missing_tensor_fails_naming_it(saved, tmp_path, suffix):
    bad = _copy(saved, tmp_path)
    found = []
    _edit_tensors(bad, lambda t: found.append(t.pop(_key(t, suffix))))
    with pytest.raises(SplitQFormatError, match=rf"tensor '[\w.]*{suffix}' .*is missing.*Re-save"):
        AutoModelForImageTextToText.from_pretrained(str(bad))


def test_misshaped_tensor_fails_naming_it(saved, tmp_path):
    suffix = "layers.0.self_attn.q_proj.weight_packed_2"  # q, k, v rows: 64 + 32 + 32
    bad = _copy(saved, tmp_path)
    words = []

    def cut(t: dict) -> None:
        key = _key(t, suffix)
        words.append(t[key].shape[1])
        t[key] = t[key][:, :-1].contiguous()

    _edit_tensors(bad, cut)
    n = words[0]
    with pytest.raises(
        SplitQFormatError,
        match=rf"{suffix}' .*is I32 \(128, {n - 1}\).*requires I32 \(128, {n}\)",
    ):
        AutoModelForImageTextToText.from_pretrained(str(bad))


def _as_version_2(path: Path, model) -> int:
    """Rewrite a saved checkpoint as format version 2 wrote it: every path weight in the dense
    packing, ``version: 2`` in config.json. Returns the number of tensors repacked."""
    owners = {n: m for n, m in model.named_modules() if isinstance(m, SplitQSiteLinear)}
    done = []

    def repack(t: dict) -> None:
        for name, m in owners.items():
            if not m.is_owner:
                continue
            for p, k in enumerate(m.sizes):
                if not k:
                    continue
                key = _key(t, f"{name[name.index('layers.') :]}.weight_packed_{p}")
                codes = unpack_mma_weight(t[key], m.w_bits[p], k)
                t[key] = pack_path_weight(codes, m.w_bits[p])
                done.append(key)

    _edit_tensors(path, repack)
    cfg = json.loads((path / "config.json").read_text())
    for group in cfg["quantization_config"]["splitq_config_groups"].values():
        if group["format"] == FORMAT_NAME:
            group["weights"]["observer_kwargs"]["splitq"]["version"] = 2
    (path / "config.json").write_text(json.dumps(cfg))
    return len(done)


def test_version_2_checkpoint_is_converted_at_load(saved, tmp_path):
    """A version-2 checkpoint (dense path weights) loads: its path weights are repacked, the
    logits equal the in-memory model's, and a save of the loaded model writes version 3."""
    case = "llava-w3a2"  # 3-bit main path, 4-bit outlier paths
    path, model, sample, expected = saved[case]
    old = _copy(saved, tmp_path, case)
    assert _as_version_2(old, model) > 0
    loaded = AutoModelForImageTextToText.from_pretrained(str(old))
    with torch.no_grad():
        got = loaded(**sample).logits
    assert (got - expected).abs().max() / expected.abs().max() <= REL_TOL
    for m in loaded.modules():
        if isinstance(m, SplitQSiteLinear):
            assert LinearSpec.from_scheme(m.quantization_scheme).version == FORMAT_VERSION
    loaded.save_pretrained(str(tmp_path / "resaved"))
    raw = json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]
    for group in decode_quantization_config(raw)["config_groups"].values():
        if group["format"] == FORMAT_NAME:
            assert group["weights"]["observer_kwargs"]["splitq"]["version"] == FORMAT_VERSION
    resaved = load_file(str(tmp_path / "resaved" / "model.safetensors"))
    original = load_file(str(path / "model.safetensors"))
    packed = [k for k in original if "weight_packed_" in k]
    assert packed and all(torch.equal(resaved[k], original[k]) for k in packed)


def test_unknown_format_version_fails(saved, tmp_path):
    bad = _copy(saved, tmp_path)
    cfg = json.loads((bad / "config.json").read_text())
    for group in cfg["quantization_config"]["splitq_config_groups"].values():
        if group["format"] == FORMAT_NAME:
            group["weights"]["observer_kwargs"]["splitq"]["version"] = 99
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        SplitQFormatError, match=r"unknown splitq-packed format version 99.*Upgrade"
    ):
        AutoModelForImageTextToText.from_pretrained(str(bad))


# -------------------------------------------------------------------------- runtime op
def _assert_op_matches_dense(owner: SplitQSiteLinear, x: torch.Tensor, mask) -> None:
    with torch.no_grad():
        got = owner.site_forward(x)
        ref = dense_site_forward(owner, x, mask)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_op_forward_matches_dense_reference_after_oneshot(saved):
    """Every calibrated site: splitq::site_linear on packed weights == dense fake-quant."""
    g = torch.Generator().manual_seed(0)
    for case in ("llava-w4a8-lmhead_w8a8", "llava-w3a2", "qwen-w3a2-no_branches"):
        model = saved[case][1]
        for m in model.modules():
            if isinstance(m, SplitQSiteLinear) and m.is_owner:
                x = torch.randn(2, 7, m.in_features, generator=g) * 3
                mask = torch.rand(2, 7, generator=g) > 0.4
                m.context.text_mask = mask
                _assert_op_matches_dense(m, x, mask)
                m.context.text_mask = None


@pytest.mark.parametrize("mac_input", ["residual", "act"])
@pytest.mark.parametrize("split", ["mocd", "none"])
def test_op_forward_matches_dense_reference_unit(mac_input, split):
    """Freeze (perturbed) calibration linears of one site directly: empty paths, both MAC
    inputs, two linears of different widths, one with a bias."""
    torch.manual_seed(0)
    d = 96
    lins = [torch.nn.Linear(d, 40), torch.nn.Linear(d, 24, bias=False)]
    cs = (
        ChannelSplit.none(d)
        if split == "none"
        else ChannelSplit(
            torch.tensor([3, 50]),
            torch.tensor([7, 9, 11]),
            torch.tensor([i for i in range(d) if i not in (3, 50, 7, 9, 11)]),
        )
    )
    ctx = ModalityContext()
    site = SplitSite(cs, (4, 4, 3), smooth=torch.rand(d) + 0.5)
    qs = [
        SplitQLinear(lin, site, (4, 4, 3), QuantBranch(0.1), QuantBranch(0.1, input=mac_input), ctx)
        for lin in lins
    ]
    with torch.no_grad():
        for p in [*site.parameters(), *(p for q in qs for p in q.parameters())]:
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    owner, member = freeze_site(site, qs, ["a", "b"], ctx)
    assert member.owner is owner and not list(member.buffers())
    x = torch.randn(3, 5, d) * 2
    mask = torch.rand(3, 5) > 0.5
    ctx.text_mask = mask
    _assert_op_matches_dense(owner, x, mask)
    with torch.no_grad():  # the members' outputs equal the calibration-time forward
        for q, m in ((qs[0], owner), (qs[1], member)):
            torch.testing.assert_close(m(x), q(x), rtol=1e-4, atol=1e-4)
    assert owner.weight_packed_2.dtype == torch.int32
    assert member.weight_int(2).shape == (24, cs.sizes[2])
