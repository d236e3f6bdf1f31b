"""Fidelity benchmark: SplitQ against llm-compressor's own methods, and the paper's ablations.

Every method quantizes the same language-model linears at the same bits, on the same
calibration samples, and is scored on the same held-out samples:

- KL(FP || Q) of next-token distributions and top-1 agreement with the FP model, overall and
  split by vision / text positions;
- answer accuracy and its retention vs FP, on the trained tiny VLM (``--model trained``).

Models: ``planted`` (tiny random-weight Qwen2.5-VL with planted modality outliers),
``planted-llava``, ``trained`` (benchmarks/train_tiny_vlm.py: a tiny LLaVA trained on a
synthetic visual question task, with baked-in outliers; ``trained-mm``: the same with both
modalities' outliers kept through training, ``--preset mm``; ``trained-mm-wide``: text hidden
256, ``--preset mm-wide``; ``trained-transient``: text hidden 256, 2 vision outlier channels, 8
text outlier channels that come and go between tokens, ``--preset transient``), or a hub id /
local path of a real
VLM: ``--model <FP hub id or path> --quantized <saved SplitQ dir> --dataset <hub id or
folder>`` runs :mod:`splitq_modifier.evaluate` (needs weights and normally a GPU).

    python benchmarks/fidelity.py --model planted --settings W4A4 W3A3
    python benchmarks/fidelity.py --model planted --ablation ladder --settings W3A3 W3A2
    python benchmarks/fidelity.py --model trained --methods rtn quip splitq

Prints a markdown table per setting, writes JSON (and a PNG plot with matplotlib) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from llmcompressor import oneshot

import splitq_modifier  # noqa: F401
from splitq_modifier import SplitQModifier
from splitq_modifier.testing.tiny import (
    build_tiny_vlm,
    calibration_dataset,
    clone_model,
    collate,
    fidelity,
    make_tokenizer,
    synthetic_samples,
)

SETTINGS = {
    "W4A8": (4, 8),
    "W4A4": (4, 4),
    "W3A3": (3, 3),
    "W3A2": (3, 2),
    "W2A4": (2, 4),
    "W2A8": (2, 8),
}
LM_LINEARS = "re:.*language_model.*layers.*_proj$"


# ----------------------------------------------------------------------------- methods
def _scheme(wb: int, ab: int, group: bool = False) -> dict:
    acts = None
    if ab < 16:
        acts = dict(num_bits=ab, type="int", symmetric=True, strategy="token", dynamic=True)
    weights = dict(num_bits=wb, type="int", symmetric=True, strategy="channel")
    return {"group_0": dict(targets=[LM_LINEARS], weights=weights, input_activations=acts)}


def recipe_rtn(wb: int, ab: int, **_) -> list:  # deterministic: no seed
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return [QuantizationModifier(config_groups=_scheme(wb, ab))]


def recipe_smoothquant(wb: int, ab: int, **_) -> list:
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    mappings = [
        [["re:.*language_model.*q_proj", "re:.*language_model.*k_proj",
          "re:.*language_model.*v_proj"], "re:.*language_model.*input_layernorm"],
        [["re:.*language_model.*gate_proj", "re:.*language_model.*up_proj"],
         "re:.*language_model.*post_attention_layernorm"],
    ]  # fmt: skip
    return [SmoothQuantModifier(smoothing_strength=0.8, mappings=mappings)] + recipe_rtn(wb, ab)


def recipe_gptq(wb: int, ab: int, **_) -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier

    return [GPTQModifier(config_groups=_scheme(wb, ab), actorder=None)]


def recipe_quip_gptq(wb: int, ab: int, **_) -> list:
    from llmcompressor.modifiers.transform import QuIPModifier

    return [QuIPModifier(targets=[LM_LINEARS], transform_type="random-hadamard")] + recipe_gptq(
        wb, ab
    )


def recipe_splitq(wb: int, ab: int, epochs: int = 15, seed: int = 0, **overrides) -> list:
    return [
        SplitQModifier(weight_bits=wb, activation_bits=ab, epochs=epochs, seed=seed, **overrides)
    ]


#: the low-rank branches switched off (CWS and MAC ranks 0)
NO_BRANCHES = dict(cws_rank_ratio=0.0, mac_rank_ratio=0.0)
BASE = dict(channel_selection="none", **NO_BRANCHES)
#: mixed precision without SplitQ's own parts: the per-modality max rule's channels kept as
#: they are (no transform) at the floor's bits, no branches
MIXED = dict(channel_selection="multi_max", outlier_transforms=False, **NO_BRANCHES)
#: a QuIP-style rotation + GPTQ inside the same machinery: fixed random orthogonal Kronecker
#: rotations (not learned: no training), no smoothing, GPTQ rounding
ROTATION = dict(channel_selection="none", **NO_BRANCHES,
                smooth_alpha=None, epochs=0)  # fmt: skip


def _eqbits(wb: int, ab: int) -> dict:
    """SplitQ's floor at the nominal bits: outlier paths and branches at ``min(wb, ab)``."""
    return dict(aux_bits_floor=min(wb, ab))


METHODS: dict[str, Callable[..., list]] = {
    "rtn": recipe_rtn,
    "smoothquant": recipe_smoothquant,
    "gptq": recipe_gptq,
    "quip": recipe_quip_gptq,
    "base": lambda wb, ab, **kw: recipe_splitq(wb, ab, **{**kw, **BASE}),
    "splitq": recipe_splitq,  # the recipe defaults
    "splitq-rtn": lambda wb, ab, **kw: recipe_splitq(wb, ab, **kw, weight_rounding="rtn"),
    "splitq-gptq": lambda wb, ab, **kw: recipe_splitq(wb, ab, **kw, weight_rounding="gptq"),
    # at equal bits (issue: what the floor gives SplitQ)
    "splitq-eqbits": lambda wb, ab, **kw: recipe_splitq(wb, ab, **{**kw, **_eqbits(wb, ab)}),
    # and without MAC, whose input (the main path's activation residual) is a second
    # quantized activation of the main path's width: equal bits per activation too
    "splitq-eqbits-cws": lambda wb, ab, **kw: recipe_splitq(
        wb, ab, **{**kw, **_eqbits(wb, ab), "mac_rank_ratio": 0.0}
    ),
    "base-mp": lambda wb, ab, **kw: recipe_splitq(wb, ab, **{**kw, **MIXED}),
    "rot-gptq": lambda wb, ab, **kw: recipe_splitq(wb, ab, **{**kw, **ROTATION}),
    "rot-gptq-mp": lambda wb, ab, **kw: recipe_splitq(
        wb,
        ab,
        **{
            **kw,
            **ROTATION,
            **{k: v for k, v in MIXED.items() if k != "channel_selection"},
            "channel_selection": "multi_max",
        },
    ),
    "splitq-adaptive": lambda wb, ab, **kw: recipe_splitq(wb, ab, **kw, outlier_widths="adaptive"),
}

#: the error-driven text rule with adaptive widths
ADAPTIVE_ERROR = dict(channel_selection="mocd_error", outlier_widths="adaptive")

#: The paper's ablations as method name -> SplitQModifier overrides.
ABLATIONS: dict[str, dict[str, dict]] = {
    "ladder": {
        "base": BASE,
        "+MOCD": NO_BRANCHES,
        "+CWS": dict(mac_rank_ratio=0.0),
        "+MAC": {},
    },
    "selection": {
        rule: dict(channel_selection=rule, **NO_BRANCHES)
        for rule in (
            "none",
            "random",
            "text_max",
            "vision_max",
            "multi_max",
            "multi_mean",
            "mocd",
            "mocd_error",
        )
    },
    # the paper's rule, the best of its baselines and the error-driven rule (branches off)
    "selection_rules": {
        rule: dict(channel_selection=rule, **NO_BRANCHES)
        for rule in ("mocd", "multi_max", "mocd_error")
    },
    "clusters": {f"K={k}": dict(num_clusters=k, **NO_BRANCHES) for k in (1, 3, 5)},
    "mac_input": {
        "MAC residual": dict(mac_input="residual"),
        "MAC act": dict(mac_input="act"),
    },
    "gates": {"learned gates": {}, "fixed SVD": dict(learn_gates=False)},
    # the selection rules, fixed and adaptive widths, every other component on (issue 20)
    "selection_widths": {
        "mocd": {},
        "multi_max": dict(channel_selection="multi_max"),
        "mocd_error": dict(channel_selection="mocd_error"),
        "multi_max adaptive": dict(channel_selection="multi_max", outlier_widths="adaptive"),
        "mocd_error adaptive": ADAPTIVE_ERROR,
    },
    # SplitQ's split at the bit-matched base's bits (outlier paths at the 4-bit floor like
    # base-mp's, no MAC: its input is a second quantized activation of the main path)
    "equal_bits": {
        "split, no branches": NO_BRANCHES,
        "split + CWS": dict(mac_rank_ratio=0.0),
        "mocd_error adaptive, no branches": dict(**ADAPTIVE_ERROR, **NO_BRANCHES),
        "mocd_error adaptive + CWS": dict(**ADAPTIVE_ERROR, mac_rank_ratio=0.0),
        "multi_max, no branches": dict(channel_selection="multi_max", **NO_BRANCHES),
    },
    # the two best selection rules with every other component on
    "selection_full": {
        "mocd": {},
        "multi_max": dict(channel_selection="multi_max"),
        "mocd_error": dict(channel_selection="mocd_error"),
    },
}


# ------------------------------------------------------------------------------ models
@dataclass
class Bench:
    """A model and its data: everything a method needs to be run and scored."""

    model: torch.nn.Module
    path: str
    tokenizer: object
    calib: list[dict]
    evals: list[dict]
    image_token_id: int
    accuracy: Callable[[torch.nn.Module], float] | None = None


#: The models this script builds itself; any other ``--model`` is a real VLM (hub id or path).
BENCH_MODELS = (
    "planted",
    "planted-llava",
    "trained",
    "trained-mm",
    "trained-mm-wide",
    "trained-transient",
)
#: the trained models' presets (benchmarks/train_tiny_vlm.py), all with both modalities' outliers
TRAINED_PRESETS = {
    "trained-mm": "mm",
    "trained-mm-wide": "mm-wide",
    "trained-transient": "transient",
}


def load_bench(name: str, n_calib: int, n_eval: int, seed: int) -> Bench:
    """Build or load the benchmark model ``name`` with its calibration / evaluation data."""
    if name in ("planted", "planted-llava"):
        arch = "llava" if name == "planted-llava" else "qwen2_5_vl"
        tiny = build_tiny_vlm(arch, hidden=128, layers=2, seed=seed)
        return Bench(
            tiny.model,
            tiny.path,
            tiny.tokenizer,
            synthetic_samples(tiny, n_calib, seed=seed),
            synthetic_samples(tiny, n_eval, seed=seed + 1000),
            tiny.image_token_id,
        )
    if name == "trained" or name in TRAINED_PRESETS:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import train_tiny_vlm as tv

        if name in TRAINED_PRESETS:  # vision and text outliers both survive training
            model, task = tv.load_or_train(seed=seed, preset=TRAINED_PRESETS[name], threads=1)
        else:  # the configuration measured in docs/results.md (1500 training steps)
            model, task = tv.load_or_train(seed=seed, overrides={"steps": 1500}, threads=1)
        evals = task.eval_samples(n_eval)

        def inputs(s: dict) -> dict:
            keys = ("input_ids", "attention_mask", "pixel_values")
            return {k: torch.as_tensor(s[k])[None] for k in keys}

        return Bench(
            model,
            model.config.name_or_path,
            make_tokenizer(model.config.text_config.vocab_size),
            [inputs(s) for s in task.calibration_samples(n_calib)],
            [inputs(s) for s in evals],
            model.config.image_token_id,
            accuracy=lambda m: tv.evaluate_accuracy(m, evals),
        )
    raise SystemExit(
        f"--model {name!r}: real VLMs (hub id or path) need their weights and a processed "
        f"dataset; see docs/results.md for the call. Choices here: {', '.join(BENCH_MODELS)}"
    )


def _site_owners(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The model's SplitQ site owners by module name (one per activation site)."""
    from splitq_modifier.runtime import SplitQSiteLinear

    return {
        n: m for n, m in model.named_modules() if isinstance(m, SplitQSiteLinear) and m.is_owner
    }


def effective_bits(model: torch.nn.Module, wb: int, ab: int) -> tuple[float, float]:
    """``(bits per weight, bits per activation)`` of the quantized language-model linears:
    stored code bits (paths and branch factors; scales left out) per original weight, and
    quantized activation code bits (paths, branch inputs and hidden states) per input channel
    and token; ``(wb, ab)`` for a model without SplitQ linears (every channel at the nominal
    bits)."""
    owners = list(_site_owners(model).values())
    if not owners:
        return float(wb), float(ab)
    w_bits = w_count = a_bits = a_count = 0
    for o in owners:
        p = o.params()
        d, big_d, km = p.d_in, p.d_out, p.sizes[2]
        w_bits += big_d * sum(k * b for k, b in zip(p.sizes, p.w_bits))
        a_bits += sum(k * b for k, b in zip(p.sizes, p.a_bits))
        for br, mac in ((p.cws, False), (p.mac, True)):
            if br is None:
                continue
            ups = sum(o * r for o, r in zip(p.out_splits, br.ranks))
            w_bits += (sum(br.ranks) * km + ups) * br.w_bits
            a_bits += (sum(br.ranks) + (km if mac else 0)) * br.act_bits
        w_count += d * big_d
        a_count += d
    return w_bits / w_count, a_bits / a_count


def outlier_widths(model: torch.nn.Module) -> dict[str, list[int]]:
    """``{site: [vision width, text width]}`` of the SplitQ sites (the owners' module names);
    empty for other methods."""
    return {name: list(m.params().sizes[:2]) for name, m in _site_owners(model).items()}


def run_method(bench: Bench, fp: torch.nn.Module, recipe: list, seed: int = 0) -> dict:
    """Quantize a fresh copy of the FP model with ``recipe`` and score it.

    ``seed`` is the run seed: it sets the global RNG (random Hadamard rotations of QuIP,
    anything else drawn by llm-compressor) and the order in which the calibration samples
    reach the pipeline (a seeded permutation; seed 0 keeps the original order). SplitQ's
    own seed (rotation init, training order) is set by the recipe.
    """
    model = clone_model(fp)
    model.config.name_or_path = bench.path
    torch.manual_seed(seed)  # every method of a seed starts from the same global RNG state
    order = list(range(len(bench.calib)))
    if seed:
        order = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed)).tolist()
    start = time.time()
    oneshot(
        model=model,
        dataset=calibration_dataset([bench.calib[i] for i in order]),
        data_collator=collate,
        recipe=recipe,
        num_calibration_samples=len(bench.calib),
        processor=bench.tokenizer,
    )
    row = fidelity(fp, model, bench.evals, bench.image_token_id)
    row["seconds"] = time.time() - start
    wb, ab = next(((m.weight_bits, m.activation_bits) for m in recipe if isinstance(m,
                   SplitQModifier)), (None, None))  # fmt: skip
    if wb is None:  # llm-compressor's methods: every channel at the nominal bits
        args = recipe[-1].config_groups["group_0"]
        wb = args.weights.num_bits
        ab = 16 if args.input_activations is None else args.input_activations.num_bits
    row["bits_w"], row["bits_a"] = effective_bits(model, wb, ab)
    row["widths"] = outlier_widths(model)
    if bench.accuracy is not None:
        row["accuracy"] = bench.accuracy(model)
    return row


def _table(setting: str, rows: dict[str, dict], fp_acc: float | None) -> str:
    head = "| method | bits W / A | KL(FP‖Q) | KL text | KL vision | top-1 | top-1 text |"
    sep = "|---|---|---|---|---|---|---|"
    if fp_acc is not None:
        head += " accuracy | retention |"
        sep += "---|---|"
    lines = [f"\n### {setting}\n", head, sep]
    for name, r in rows.items():
        line = (
            f"| {name} | {r.get('bits_w', float('nan')):.2f} / {r.get('bits_a', float('nan')):.2f} "
            f"| {r['kl_all']:.4g} | {r.get('kl_text', float('nan')):.4g} "
            f"| {r.get('kl_vision', float('nan')):.4g} | {r['top1_all']:.3f} "
            f"| {r.get('top1_text', float('nan')):.3f} |"
        )
        if fp_acc is not None:
            line += f" {r['accuracy']:.3f} | {r['accuracy'] / max(fp_acc, 1e-9):.1%} |"
        lines.append(line)
    return "\n".join(lines)


def _mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=True)) if len(values) > 1 else 0.0


def _seed_table(setting: str, runs: dict[str, list[dict]], fp_acc: float | None) -> str:
    """Mean +- std over seeds (sample standard deviation)."""
    n = len(next(iter(runs.values())))
    head = f"| method (n = {n} seeds) | bits W / A | KL(FP‖Q) | top-1 |"
    sep = "|---|---|---|---|"
    if fp_acc is not None:
        head += " accuracy retention |"
        sep += "---|"
    lines = [f"\n### {setting}\n", head, sep]
    for name, rows in runs.items():
        kl = _mean_std([r["kl_all"] for r in rows])
        top = _mean_std([r["top1_all"] for r in rows])
        bits = (_mean_std([r.get("bits_w", float("nan")) for r in rows])[0],
                _mean_std([r.get("bits_a", float("nan")) for r in rows])[0])  # fmt: skip
        line = (
            f"| {name} | {bits[0]:.2f} / {bits[1]:.2f} | {kl[0]:.4g} ± {kl[1]:.2g} "
            f"| {top[0]:.3f} ± {top[1]:.3f} |"
        )
        if fp_acc is not None:
            ret = _mean_std([100 * r["accuracy"] / max(fp_acc, 1e-9) for r in rows])
            line += f" {ret[0]:.1f}% ± {ret[1]:.1f} |"
        lines.append(line)
    return "\n".join(lines)


def _plot(runs: dict[str, dict[str, list[dict]]], path: str, fp_acc: float | None = None) -> None:
    """Bar chart per setting and method: KL(FP || Q) (log scale) and, where the model has
    answers, accuracy retention; mean over the seeds, the spread as error bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    settings = list(runs)
    methods = list(next(iter(runs.values())))
    panels = [("kl_all", "KL(FP || quantized), lower is better")]
    if fp_acc:
        panels.append(("accuracy", "accuracy retention vs FP (%)"))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(len(panels) * (1.6 * len(settings) + 3), 3.6), squeeze=False
    )
    width = 0.8 / len(methods)
    for ax, (key, label) in zip(axes[0], panels):
        for i, m in enumerate(methods):
            vals = [
                torch.tensor([r[key] for r in runs[st][m]], dtype=torch.float64) for st in settings
            ]
            if key == "accuracy":
                vals = [100 * v / fp_acc for v in vals]
            mean = [float(v.mean()) for v in vals]
            std = [float(v.std()) if v.numel() > 1 else 0.0 for v in vals]
            xs = [j + i * width for j in range(len(settings))]
            ax.bar(xs, mean, width, yerr=std, capsize=2, label=m)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(settings))], settings)
        ax.set_ylabel(label)
        if key == "kl_all":
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, 110)
            ax.axhline(100, color="grey", lw=0.8, ls="--")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default="planted")
    if pre.parse_known_args(argv)[0].model not in BENCH_MODELS:
        from splitq_modifier.evaluate import main as evaluate_real_model

        return evaluate_real_model(argv)  # a hub id or path: FP vs saved SplitQ model
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="planted")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--ablation", choices=list(ABLATIONS), help="run a SplitQ ablation instead")
    p.add_argument("--variants", nargs="+", help="only these entries of the ablation")
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--eval", type=int, default=32)
    p.add_argument("--epochs", type=int, default=15, help="SplitQ epochs per layer")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and its data")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0],
        help="run seeds: calibration order, global RNG and SplitQ's seed; with more than one, "
        "tables give mean +- std",
    )  # fmt: skip
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--out", default="docs/results")
    p.add_argument("--replot", metavar="JSON", help="redraw the PNG of a saved run and exit")
    args = p.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            saved = json.load(f)
        _plot(saved["runs"], args.replot[: -len(".json")] + ".png", saved.get("fp_accuracy"))
        return saved["results"]

    torch.manual_seed(args.seed)
    bench = load_bench(args.model, args.calib, args.eval, args.seed)
    fp = clone_model(bench.model)
    fp_acc = bench.accuracy(fp) if bench.accuracy else None
    results: dict[str, dict] = {}
    per_seed: dict[str, dict[str, list[dict]]] = {}
    for setting in args.settings:
        wb, ab = SETTINGS[setting]
        runs: dict[str, list[dict]] = {}
        if args.ablation:
            recipes = {
                name: (lambda sd, o=o, wb=wb, ab=ab: recipe_splitq(wb, ab, args.epochs, sd, **o))
                for name, o in ABLATIONS[args.ablation].items()
                if not args.variants or name in args.variants
            }
            if not recipes:
                p.error(f"--variants: none of {args.variants} in {list(ABLATIONS[args.ablation])}")
        else:
            recipes = {
                name: (
                    lambda sd, f=METHODS[name], wb=wb, ab=ab: f(wb, ab, epochs=args.epochs, seed=sd)
                )
                for name in args.methods
            }
        for seed in args.seeds:
            for name, make in recipes.items():
                runs.setdefault(name, []).append(run_method(bench, fp, make(seed), seed))
        results[setting] = {name: rows[0] for name, rows in runs.items()}
        per_seed[setting] = runs
        if len(args.seeds) == 1:
            print(_table(setting, results[setting], fp_acc), flush=True)
        else:
            print(_seed_table(setting, runs, fp_acc), flush=True)
    os.makedirs(args.out, exist_ok=True)
    tag = f"{args.model}_{args.ablation or 'methods'}{'_' + args.tag if args.tag else ''}"
    with open(os.path.join(args.out, f"fidelity_{tag}.json"), "w") as f:
        json.dump(
            {"args": vars(args), "fp_accuracy": fp_acc, "results": results, "runs": per_seed},
            f,
            indent=1,
        )
    _plot(per_seed, os.path.join(args.out, f"fidelity_{tag}.png"), fp_acc)
    return results


if __name__ == "__main__":
    main()
