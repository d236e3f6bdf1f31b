"""The docs match the code: every recipe field is in the README's table, the package and
the distribution agree on the version, no source cites a file users do not have."""

from __future__ import annotations

import importlib.metadata
import pathlib
import re

import splitq_modifier
from splitq_modifier import SplitQModifier

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: llm-compressor's own modifier fields (lifecycle, grouping), not SplitQ settings.
_LIFECYCLE = {"index", "group", "start", "end", "update", "requires_calibration_data"}


def test_readme_recipe_table_lists_every_field() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("### Recipe fields", 1)[1].split("\n\n", 2)[1]
    documented = set()
    for row in table.splitlines()[2:]:
        documented |= set(re.findall(r"`([a-z_]+)`", row.split("|")[1]))
    fields = {f for f in SplitQModifier.model_fields if not f.endswith("_")} - _LIFECYCLE
    assert fields - documented == set(), "recipe fields missing from README's table"
    assert documented - fields == set(), "README's table names fields that do not exist"


def test_one_version() -> None:
    assert importlib.metadata.version("splitq-modifier") == splitq_modifier.__version__


def test_no_source_cites_the_internal_design_notes() -> None:
    cites = []
    for path in [*ROOT.glob("src/**/*.py"), *ROOT.glob("kernels/*.py"), *ROOT.glob("docs/*.md")]:
        if "DESIGN.md" in path.read_text():
            cites.append(str(path.relative_to(ROOT)))
    assert cites == []


def test_product_modules_do_not_import_the_test_scaffolding() -> None:
    package = ROOT / "src" / "splitq_modifier"
    importers = []
    for path in [*package.rglob("*.py"), *ROOT.glob("kernels/*.py")]:
        if (package / "testing") in path.parents:
            continue
        text = path.read_text()
        if re.search(r"(splitq_modifier|^from \.+)\.?testing\b", text, flags=re.M):
            importers.append(str(path.relative_to(ROOT)))
    assert importers == []


def test_readme_layout_table_names_paths_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Layout", 1)[1].split("\n\n", 2)[1]
    missing = []
    for row in table.splitlines()[2:]:
        first, *others = re.findall(r"`([^`]+)`", row.split("|")[1])
        folder = first.rstrip("/").rpartition("/")[0]  # later names are siblings of the first
        for path in [first, *(f"{folder}/{name}" for name in others)]:
            if not (ROOT / path).exists():
                missing.append(path)
    assert missing == []


def test_every_shipped_recipe_parses_into_a_valid_modifier() -> None:
    """Each recipe in recipes/ names valid fields and values, and the bits its file name says;
    the 2-3-bit-activation recipes use ``mocd_error``, the others the paper's MOCD."""
    import yaml

    recipes = sorted((ROOT / "recipes").glob("splitq_*.yaml"))
    assert len(recipes) == 6
    for path in recipes:
        stage = yaml.safe_load(path.read_text())["splitq_stage"]["splitq_modifiers"]
        mod = SplitQModifier(**stage["SplitQModifier"])
        w, a = (int(x) for x in re.fullmatch(r"splitq_w(\d)a(\d)", path.stem).groups())
        assert (mod.weight_bits, mod.activation_bits) == (w, a), path.name
        assert mod.channel_selection == ("mocd_error" if a <= 3 else "mocd"), path.name
