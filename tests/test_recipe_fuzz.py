"""Recipe fuzzing with hypothesis: random SplitQModifier recipes, as dicts and as YAML.

- Parse property: a recipe with invalid values or unknown keys is rejected when it is parsed
  (``SplitQModifier(**d)`` and llm-compressor's ``Recipe.create_instance(yaml)``), and the
  error names every offending field; a valid one parses to exactly its values.
- Run property: a valid recipe (with ``epochs: 0``) runs ``oneshot`` on a tiny LLaVA and
  leaves every SplitQ site frozen with finite tensors.

Both are derandomized (the same examples in every CI run) and sized to stay under a minute
together; ``SPLITQ_FUZZ_EXAMPLES=200`` (parse) and ``SPLITQ_FUZZ_RUNS=40`` (oneshot) explore
further, with fresh random examples (``SPLITQ_FUZZ_RANDOM=1``).
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from llmcompressor import oneshot
from llmcompressor.recipe import Recipe
from pydantic import ValidationError

import splitq_modifier  # noqa: F401  (registers the modifier)
from splitq_modifier import SplitQModifier
from splitq_modifier.mocd import SELECTION_RULES
from splitq_modifier.runtime import SplitQSiteLinear
from splitq_modifier.testing.tiny import (
    build_tiny_vlm,
    calibration_dataset,
    collate,
    synthetic_samples,
)

PARSE_EXAMPLES = int(os.environ.get("SPLITQ_FUZZ_EXAMPLES", "120"))
RUN_EXAMPLES = int(os.environ.get("SPLITQ_FUZZ_RUNS", "2"))
DERANDOMIZE = os.environ.get("SPLITQ_FUZZ_RANDOM", "0") != "1"

_WORDS = st.sampled_from(["", "four", "4 bits", "none?", "[1, 2]", "yes please", "-"])
_NON_INT_FLOATS = st.floats(allow_nan=True, allow_infinity=True).filter(
    lambda x: not (math.isfinite(x) and x.is_integer())
)


def _int(lo: int | None, hi: int | None, valid_hi: int | None = None):
    """(valid, invalid) strategies of an int field with bounds ``[lo, hi]`` (``hi`` None: no
    upper bound, valid values drawn up to ``valid_hi``)."""
    valid = st.integers(lo, hi if hi is not None else valid_hi)
    bad = [_WORDS, _NON_INT_FLOATS, st.none()]
    if lo is not None:
        bad.append(st.integers(max_value=lo - 1))
    if hi is not None:
        bad.append(st.integers(min_value=hi + 1))
    return valid, st.one_of(bad)


def _float(lo: float, hi: float | None, lo_open: bool = False):
    """(valid, invalid) strategies of a finite float field in ``[lo, hi]`` (``(lo, hi]``)."""
    valid = st.floats(lo, 1e6 if hi is None else hi, exclude_min=lo_open, allow_nan=False)
    bad = [
        _WORDS,
        st.none(),
        st.just(float("nan")),
        st.floats(max_value=lo, exclude_max=not lo_open, allow_nan=False).filter(
            lambda x: x < lo or (lo_open and x == lo)
        ),
    ]
    bad.append(st.just(float("inf")) if hi is None else st.floats(min_value=hi, exclude_min=True))
    return valid, st.one_of(bad)


def _bool():
    return st.booleans(), st.one_of(_WORDS, st.integers(2, 10), st.none())


def _choice(options):
    return st.sampled_from(list(options)), st.one_of(
        st.text(max_size=8).filter(lambda s: s not in options), st.integers(), st.none()
    )


_ACT_BITS = st.one_of(st.integers(2, 8), st.just(16))
#: field -> (valid values, invalid values). Fields not listed keep their defaults (targets and
#: ignore are fuzzed separately: random patterns would match nothing, a runtime error).
FIELDS = {
    "weight_bits": _int(2, 8),
    "activation_bits": (
        _ACT_BITS,
        st.one_of(st.integers(9, 15), st.integers(max_value=1), st.integers(min_value=17), _WORDS),
    ),
    "aux_bits_floor": _int(2, 8),
    "vision_outlier_ratio": _float(0.0, 0.5),
    "text_outlier_ratio": _float(0.0, 0.5),
    "channel_multiple": _int(1, 512),
    "channel_selection": _choice(SELECTION_RULES),
    "num_clusters": _int(1, 16),
    "max_text_tokens": _int(16, None, valid_hi=10**6),
    "learn_transforms": _bool(),
    "rotation_init": _bool(),
    "smooth_alpha": _float(0.0, 1.0),
    "cws_rank_ratio": _float(0.0, 0.5),
    "mac_rank_ratio": _float(0.0, 0.5),
    "learn_gates": _bool(),
    "mac_input": _choice(("residual", "act")),
    "epochs": (st.integers(0, 3), st.one_of(st.integers(max_value=-1), _WORDS, _NON_INT_FLOATS)),
    "lr": _float(0.0, None, lo_open=True),
    "clip_lr_multiplier": _float(0.0, None, lo_open=True),
    "batch_size": _int(1, None, valid_hi=10**4),
    "seed": _int(-(2**63), 2**63 - 1),
    "cache_device": (
        st.sampled_from([None, "cpu"]),
        st.one_of(st.sampled_from(["gpu", "cuda:x", "cpu:-1", "tpu0"]), st.integers()),
    ),
}
#: Unknown keys: misspellings of real fields and invented ones.
UNKNOWN = st.sampled_from(
    ["wieght_bits", "activation_bit", "epoch", "learning_rate", "Seed", "k_v", "rank"]
) | st.from_regex(r"\A[a-z][a-z_]{2,12}\Z", fullmatch=True).filter(
    lambda k: k not in SplitQModifier.model_fields
)
_IGNORE = st.lists(
    st.sampled_from(["re:.*k_proj$", "re:.*o_proj$", "re:.*up_proj$", "re:.*down_proj$"]),
    unique=True,
    max_size=2,
)


@st.composite
def recipes(draw, allow_invalid: bool = True) -> tuple[dict, set[str]]:
    """A recipe dict and the set of fields an error must name (empty: valid)."""
    fields = draw(st.lists(st.sampled_from(sorted(FIELDS)), unique=True, max_size=8))
    bad = set()
    out = {}
    for f in fields:
        valid, invalid = FIELDS[f]
        if allow_invalid and draw(st.booleans()) and draw(st.booleans()):
            out[f] = draw(invalid)
            bad.add(f)
        else:
            out[f] = draw(valid)
    if allow_invalid and draw(st.integers(0, 5)) == 0:
        key = draw(UNKNOWN)
        out[key] = draw(st.integers() | _WORDS)
        bad.add(key)
    if not bad:
        v = out.get("vision_outlier_ratio", 0.02)
        t = out.get("text_outlier_ratio", 0.02)
        if v + t >= 1.0:  # the one cross-field rule
            bad = {"vision_outlier_ratio", "text_outlier_ratio"}
    return out, bad


def _yaml(recipe: dict) -> str:
    return yaml.safe_dump({"fuzz_stage": {"fuzz_modifiers": {"SplitQModifier": recipe}}})


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


@settings(
    max_examples=PARSE_EXAMPLES,
    deadline=None,
    derandomize=DERANDOMIZE,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(recipes())
@example(({"vision_outlier_ratio": 0.5, "text_outlier_ratio": 0.5}, {"vision_outlier_ratio"}))
@example(({"activation_bits": 12}, {"activation_bits"}))
@example(({"lr": float("inf")}, {"lr"}))
@example(({"cache_device": "gpu0"}, {"cache_device"}))
@example(({"wieght_bits": 4}, {"wieght_bits"}))
def test_recipes_are_checked_at_parse_time(case):
    recipe, bad = case
    for parse in (lambda: SplitQModifier(**recipe), lambda: Recipe.create_instance(_yaml(recipe))):
        if bad:
            with pytest.raises(ValidationError) as err:
                parse()
            named = str(err.value)
            missing = [f for f in bad if f not in named]
            assert not missing, f"{missing} not named in: {named}"
        else:
            got = parse()
            mod = got if isinstance(got, SplitQModifier) else got.modifiers[0]
            assert isinstance(mod, SplitQModifier)
            for f, v in recipe.items():
                assert _same(getattr(mod, f), v), (f, getattr(mod, f), v)


# ----------------------------------------------------------------------------- oneshot
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tiny = build_tiny_vlm("llava", hidden=64, layers=1, path=str(tmp_path_factory.mktemp("fz")))
    return tiny, calibration_dataset(synthetic_samples(tiny, 2))


def _fits(mod: SplitQModifier, d: int) -> bool:
    """Whether the outlier paths leave a main path at width ``d`` (all tiny sites: 64 or 128)."""
    from splitq_modifier.layout import plan_site

    if mod.channel_selection == "none":
        return True
    try:
        for width in (d, 2 * d):
            plan_site(width, [d], mod.vision_outlier_ratio, mod.text_outlier_ratio,
                      mod.channel_multiple)  # fmt: skip
    except ValueError:
        return False
    return True


def test_recipe_that_leaves_no_main_path_is_refused_at_initialize(tiny):
    """v + t < 1 passes parsing, but at width 64 the rounded outlier paths take every channel:
    oneshot stops at initialize, before calibration, naming the site and the fields."""
    from splitq_modifier.checks import SplitQCalibrationError

    base, dataset = tiny
    mod = SplitQModifier(vision_outlier_ratio=0.5, text_outlier_ratio=0.49, epochs=0)
    assert not _fits(mod, 64)
    with pytest.raises(SplitQCalibrationError) as err:
        oneshot(
            model=copy.deepcopy(base.model),
            dataset=dataset,
            data_collator=collate,
            recipe=[mod],
            num_calibration_samples=len(dataset),
            processor=base.tokenizer,
        )
    msg = str(err.value)
    assert "site model.language_model.layers.0.attn_in (64 input channels" in msg
    for field in ("vision_outlier_ratio=0.5", "text_outlier_ratio=0.49", "channel_multiple"):
        assert field in msg


@st.composite
def runnable_recipes(draw) -> dict:
    recipe, _ = draw(recipes(allow_invalid=False))
    recipe = {k: v for k, v in recipe.items() if k != "epochs"}
    if recipe.get("vision_outlier_ratio", 0.02) + recipe.get("text_outlier_ratio", 0.02) >= 1:
        recipe["text_outlier_ratio"] = 0.0
    ignore = draw(_IGNORE)
    if ignore:
        recipe["ignore"] = ignore
    return recipe


@settings(
    max_examples=RUN_EXAMPLES,
    deadline=None,
    derandomize=DERANDOMIZE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(runnable_recipes())
@example({"vision_outlier_ratio": 0.3, "text_outlier_ratio": 0.3, "channel_multiple": 512})
@example({"channel_selection": "none", "activation_bits": 16, "cws_rank_ratio": 0.5})
def test_valid_recipes_run_oneshot(tiny, recipe):
    base, dataset = tiny
    model = copy.deepcopy(base.model)
    mod = SplitQModifier(**recipe, epochs=0)
    # width-dependent misfits are refused at initialize (the previous test); hypothesis draws
    # another recipe instead (and fails its health check if it has to discard too many)
    assume(_fits(mod, 64))
    oneshot(
        model=model,
        dataset=dataset,
        data_collator=collate,
        recipe=[mod],
        num_calibration_samples=len(dataset),
        processor=base.tokenizer,
    )
    ignored = {p.split("*")[1].rstrip("$") for p in recipe.get("ignore", [])}
    linears = [
        (n, m) for n, m in model.named_modules() if "language_model.layers" in n and n.endswith(
            ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        )
    ]  # fmt: skip
    for name, m in linears:
        assert isinstance(m, SplitQSiteLinear) != any(name.endswith(i) for i in ignored), name
        if m.__class__ is SplitQSiteLinear and m.is_owner:
            for key, t in m.state_dict().items():
                if t.is_floating_point():
                    assert torch.isfinite(t).all(), f"{name}.{key}"
