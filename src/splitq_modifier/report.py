"""SplitQ's diagnostics report: what calibration chose and what it achieved, per site and layer.

After ``oneshot`` with :class:`~splitq_modifier.modifier.SplitQModifier`, every
``model.save_pretrained(dir)`` (including the one ``oneshot(output_dir=dir)`` makes) also
writes ``dir/splitq_report/``; ``modifier.write_report(path)`` writes one anywhere:

- ``report.json``: the settings; per activation site its selected vision and text channels,
  realised path widths (vision / text / main), Kronecker factors, transform cost and the
  vision / text token counts it saw; per layer the relative output error before and after
  training; a summary;
- ``channel_max.safetensors``: per site, the per-channel max ``|x|`` over vision tokens and
  over text tokens (``<site>.vision_max`` / ``<site>.text_max``), the data of the plots;
- ``channels/<site>.png`` (with matplotlib): channel magnitude by modality with the selected
  channels marked (the paper's Fig. 2); ``layer_error.png``: per-layer error before/after;
  ``path_widths.png``: the vision and text path widths of every site (with
  ``outlier_widths: adaptive``, the fixed ratios' widths beside them).

``python -m splitq_modifier.report DIR`` prints the report (DIR: a saved model or its
``splitq_report`` folder); ``--plot`` draws the PNGs again from the saved data.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

import torch
from loguru import logger

__all__ = [
    "CalibrationReport",
    "REPORT_DIR",
    "attach_report",
    "collect",
    "load_report",
    "main",
    "plot_report",
    "summarize",
    "write_report",
]

REPORT_DIR = "splitq_report"
REPORT_JSON = "report.json"
CHANNELS_FILE = "channel_max.safetensors"
REPORT_VERSION = 1

#: Modifier fields that are llm-compressor bookkeeping, not SplitQ settings.
_LIFECYCLE_FIELDS = {
    "index",
    "group",
    "start",
    "end",
    "update",
    "targets",
    "ignore",
    "requires_calibration_data",
    "report_plots",
}


class CalibrationReport:
    """What a SplitQ calibration chose and achieved, filled layer by layer.

    ``entries()`` is the flat view ``SplitQModifier.report`` returns: per site
    (``"<layer>.<site>"``) the selected channels, the realised path widths and factors, the
    token counts; per layer (``"<layer>"``) the relative output error before/after training,
    the seconds per phase and the kind (language or vision).
    """

    def __init__(self) -> None:
        self.sites: dict[str, dict] = {}
        self.layers: dict[str, dict] = {}
        self.channel_max: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def add_layer(self, name: str, kind: str, result: Any) -> None:
        """Record a :class:`splitq_modifier.calibrate.LayerResult` of layer ``name``."""
        for site in result.sites:
            key = f"{name}.{site.name}"
            self.sites[key] = {
                "vision": site.split.vision.tolist(),
                "text": site.split.text.tolist(),
                "dim": sum(site.split.sizes),
                **site.plan.to_dict(),
                "linears": list(site.linears),
                "num_vision_tokens": site.num_vision_tokens,
                "num_text_tokens": site.num_text_tokens,
            }
            if site.adaptive is not None:
                self.sites[key]["adaptive"] = dict(site.adaptive)
            self.channel_max[key] = (site.vision_max, site.text_max)
        self.layers[name] = {
            "loss_before": result.loss_before,
            "loss_after": result.loss_after,
            "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
            "kind": kind,
        }

    def entries(self) -> dict[str, dict]:
        """Sites and layers in one dict, in calibration order (sites before their layer)."""
        out: dict[str, dict] = {}
        for layer, entry in self.layers.items():
            out.update({k: v for k, v in self.sites.items() if k.rpartition(".")[0] == layer})
            out[layer] = entry
        return out


def _settings(modifier: Any) -> dict:
    out = {}
    for name in type(modifier).model_fields:
        if name in _LIFECYCLE_FIELDS or name.endswith("_"):
            continue
        value = getattr(modifier, name)
        if isinstance(value, (bool, int, float, str, type(None))):
            out[name] = value
    out["targets"] = modifier.targets
    out["ignore"] = list(modifier.ignore)
    return out


def collect(modifier: Any, model: Any = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The report of a finished SplitQ calibration: ``(json_data, channel_max_tensors)``.

    :param modifier: a :class:`SplitQModifier` after oneshot
    :param model: the calibrated model (for its type and name; optional)
    """
    sites, layers = {}, {}
    for key, entry in modifier.report.items():
        if "loss_before" in entry:
            layers[key] = {
                "kind": entry.get("kind", "language"),
                "loss_before": float(entry["loss_before"]),
                "loss_after": float(entry["loss_after"]),
            }
    for key, entry in modifier.report.items():
        if "vision" not in entry:
            continue
        layer, _, site = key.rpartition(".")
        sizes = list(entry["sizes"])
        sites[key] = {
            "layer": layer,
            "site": site,
            "kind": layers.get(layer, {}).get("kind", "language"),
            "linears": entry.get("linears", []),
            "dim": entry["dim"],
            "vision_channels": list(entry["vision"]),
            "text_channels": list(entry["text"]),
            "sizes": {"vision": sizes[0], "text": sizes[1], "main": sizes[2]},
            "factors": {
                "vision": entry["factors"][0],
                "text": entry["factors"][1],
                "main": entry["factors"][2],
            },
            "transform_cost": entry.get("transform_cost"),
            "num_vision_tokens": entry.get("num_vision_tokens"),
            "num_text_tokens": entry.get("num_text_tokens"),
        }
        if "adaptive" in entry:
            sites[key]["adaptive"] = entry["adaptive"]
    tensors = {}
    for key, (vmax, tmax) in modifier.channel_max.items():
        tensors[f"{key}.vision_max"] = vmax.float().contiguous()
        tensors[f"{key}.text_max"] = tmax.float().contiguous()
    before = [v["loss_before"] for v in layers.values()]
    after = [v["loss_after"] for v in layers.values()]
    data = {
        "format": "splitq-report",
        "version": REPORT_VERSION,
        "model": {
            "model_type": getattr(getattr(model, "config", None), "model_type", None),
            "name_or_path": getattr(getattr(model, "config", None), "name_or_path", None),
            "class": type(model).__name__ if model is not None else None,
            "vision_token_ids": list(getattr(modifier, "_vision_ids", [])),
        },
        "settings": _settings(modifier),
        "summary": {
            "layers": len(layers),
            "sites": len(sites),
            "mean_loss_before": sum(before) / len(before) if before else None,
            "mean_loss_after": sum(after) / len(after) if after else None,
            "vision_channels": sum(s["sizes"]["vision"] for s in sites.values()),
            "text_channels": sum(s["sizes"]["text"] for s in sites.values()),
            "main_channels": sum(s["sizes"]["main"] for s in sites.values()),
        },
        "sites": sites,
        "layers": layers,
    }
    return data, tensors


def _safe_name(site: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", site)


def write_report(
    directory: str, data: dict, tensors: dict[str, torch.Tensor], plots: bool = True
) -> str:
    """Write ``report.json``, ``channel_max.safetensors`` and (with matplotlib and
    ``plots``) the PNGs to ``directory``. Returns ``directory``."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    data = dict(data)
    data["plots"] = []
    if tensors:
        save_file(tensors, os.path.join(directory, CHANNELS_FILE))
    if plots:
        data["plots"] = plot_report(directory, data, tensors)
    with open(os.path.join(directory, REPORT_JSON), "w") as f:
        json.dump(data, f, indent=1)
    logger.info(f"SplitQ: wrote the calibration report to {directory}")
    return directory


def _report_dir(path: str) -> str:
    if os.path.exists(os.path.join(path, REPORT_JSON)):
        return path
    sub = os.path.join(path, REPORT_DIR)
    if os.path.exists(os.path.join(sub, REPORT_JSON)):
        return sub
    raise FileNotFoundError(
        f"no SplitQ report in {path!r}: expected {REPORT_JSON} there or in {REPORT_DIR}/ "
        "(written by save_pretrained after oneshot with SplitQModifier, or by "
        "modifier.write_report(dir))"
    )


def load_report(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a report: ``path`` is a saved model folder or its ``splitq_report`` folder."""
    from safetensors.torch import load_file

    directory = _report_dir(path)
    with open(os.path.join(directory, REPORT_JSON)) as f:
        data = json.load(f)
    if data.get("format") != "splitq-report":
        raise ValueError(f"{directory}/{REPORT_JSON} is not a SplitQ report")
    channels = os.path.join(directory, CHANNELS_FILE)
    tensors = load_file(channels) if os.path.exists(channels) else {}
    return data, tensors


# --------------------------------------------------------------------------- plots
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_report(directory: str, data: dict, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Draw the report's PNGs into ``directory``; returns their paths relative to it
    (empty, with a warning, when matplotlib is not installed)."""
    plt = _pyplot()
    if plt is None:
        logger.warning("SplitQ report: matplotlib is not installed; writing JSON only")
        return []
    from tqdm import tqdm

    written = []
    os.makedirs(os.path.join(directory, "channels"), exist_ok=True)
    for key, site in tqdm(data["sites"].items(), desc="SplitQ report plots", leave=False):
        vmax, tmax = tensors.get(f"{key}.vision_max"), tensors.get(f"{key}.text_max")
        if vmax is None or tmax is None:
            continue
        rel = os.path.join("channels", _safe_name(key) + ".png")
        _plot_channels(plt, os.path.join(directory, rel), key, site, vmax, tmax)
        written.append(rel)
    if data["layers"]:
        _plot_layers(plt, os.path.join(directory, "layer_error.png"), data["layers"])
        written.append("layer_error.png")
    if data["sites"]:
        _plot_widths(plt, os.path.join(directory, "path_widths.png"), data["sites"])
        written.append("path_widths.png")
    return written


def _plot_widths(plt, path: str, sites: dict) -> None:
    """Vision and text path widths per site (stacked), the fixed ratios' widths as ticks
    where the widths were adaptive."""
    names = list(sites)
    vis = [sites[n]["sizes"]["vision"] for n in names]
    txt = [sites[n]["sizes"]["text"] for n in names]
    x = list(range(len(names)))
    fig, ax = plt.subplots(figsize=(max(5, 0.18 * len(names) + 3), 3.5))
    ax.bar(x, vis, color="tab:blue", label="vision path")
    ax.bar(x, txt, bottom=vis, color="tab:red", label="text path")
    fixed = [sum(sites[n]["adaptive"]["fixed_widths"]) if "adaptive" in sites[n] else None
             for n in names]  # fmt: skip
    if any(f is not None for f in fixed):
        xs = [i for i, f in enumerate(fixed) if f is not None]
        ax.scatter(xs, [fixed[i] for i in xs], marker="_", s=80, color="k",
                   label="fixed ratios (same budget per layer)")  # fmt: skip
    labels = [f"{_short(sites[n]['layer'])}.{sites[n]['site']}" for n in names]
    ax.set_xticks(x, labels, rotation=90, fontsize=6)
    ax.set_ylabel("outlier channels")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_channels(plt, path: str, key: str, site: dict, vmax, tmax) -> None:
    from matplotlib.ticker import NullFormatter

    d = len(vmax)
    x = torch.arange(d).numpy()
    floor = 1e-6
    panels = [
        (label, values)
        for label, values, n in (
            ("vision tokens", vmax, site.get("num_vision_tokens")),
            ("text tokens", tmax, site.get("num_text_tokens")),
        )
        if n != 0  # a vision-encoder site has no text panel
    ] or [("vision tokens", vmax)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.1 * len(panels) + 0.6), sharex=True)
    axes = list(axes) if len(panels) > 1 else [axes]
    marks = (
        (site["vision_channels"], "tab:red", "v", "vision path"),
        (site["text_channels"], "tab:blue", "^", "text path"),
    )
    for ax, (label, values) in zip(axes, panels):
        vals = values.clamp(min=floor).numpy()
        # one filled step polygon: fast at any width (thousands of bars are not)
        ax.fill_between(x, floor, vals, step="mid", color="0.55", linewidth=0)
        for picked, colour, marker, name in marks:
            if picked:
                ax.scatter(picked, vals[picked], s=14, c=colour, marker=marker, label=name)
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(bottom=max(floor, float(vals.min()) * 0.5))
        ax.set_xlim(-0.5, d - 0.5)
        ax.set_ylabel(f"max |x|\n{label}", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("input channel")
    sizes = site["sizes"]
    fig.suptitle(
        f"{key}  (paths v/t/m {sizes['vision']}/{sizes['text']}/{sizes['main']})", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_layers(plt, path: str, layers: dict) -> None:
    from matplotlib.ticker import NullFormatter

    names = list(layers)
    before = [max(layers[n]["loss_before"], 1e-12) for n in names]
    after = [max(layers[n]["loss_after"], 1e-12) for n in names]
    x = list(range(len(names)))
    fig, ax = plt.subplots(figsize=(max(5, 0.25 * len(names) + 3), 3.5))
    ax.plot(x, before, "o-", label="before training", color="tab:orange")
    ax.plot(x, after, "o-", label="after training", color="tab:green")
    n_vision = sum(1 for n in names if layers[n].get("kind") == "vision")
    if 0 < n_vision < len(names):
        ax.axvline(n_vision - 0.5, color="0.5", linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(x, [_short(n) for n in names], rotation=90, fontsize=6)
    ax.set_ylabel("relative output error")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _short(name: str) -> str:
    m = re.search(r"(visual|vision\w*|language_model|text_model).*?(\d+)$", name)
    if m is None:
        return name
    return ("V" if m.group(1).startswith(("visual", "vision")) else "L") + m.group(2)


# --------------------------------------------------------------------------- save hook
def attach_report(model: Any, modifier: Any) -> None:
    """Make ``model.save_pretrained(dir, ...)`` also write ``dir/splitq_report``.

    The report data is a snapshot of this modifier's results, replaced if another SplitQ run
    attaches again.
    """
    from splitq_modifier.integrations.llmcompressor import wrap_save_pretrained

    data, tensors = collect(modifier, model)
    plots = bool(modifier.report_plots)

    def write(_model: Any, directory: str) -> None:
        if _is_main_process():
            write_report(os.path.join(directory, REPORT_DIR), data, tensors, plots)

    wrap_save_pretrained(model, write)


def _is_main_process() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# --------------------------------------------------------------------------- CLI
def summarize(data: dict, site_filter: str | None = None) -> str:
    """The report as text: settings, per-layer error, per-site widths and channels."""
    s = data["settings"]
    lines = [
        f"SplitQ report ({data['model'].get('class')}, {data['model'].get('name_or_path')})",
        f"  W{s.get('weight_bits')}A{s.get('activation_bits')}, selection "
        f"{s.get('channel_selection')}, vision/text ratios {s.get('vision_outlier_ratio')}/"
        f"{s.get('text_outlier_ratio')}, epochs {s.get('epochs')}, vision encoder "
        f"{'quantized' if s.get('quantize_vision') else 'kept'}",
        "",
        "per layer: relative output error before -> after training",
    ]
    for name, layer in data["layers"].items():
        lines.append(
            f"  {name:<48} {layer['loss_before']:>10.4g} -> {layer['loss_after']:<10.4g}"
            f"{'(vision)' if layer.get('kind') == 'vision' else ''}"
        )
    lines += ["", "per site: paths vision/text/main, tokens vision/text, selected channels"]
    pattern = re.compile(site_filter) if site_filter else None
    for key, site in data["sites"].items():
        if pattern is not None and not pattern.search(key):
            continue
        z = site["sizes"]

        def chans(c: list[int]) -> str:
            return ",".join(map(str, c[:8])) + (",..." if len(c) > 8 else "")

        tokens = f"{site['num_vision_tokens']}/{site['num_text_tokens']}"
        lines.append(
            f"  {key:<48} {z['vision']}/{z['text']}/{z['main']}  tokens {tokens}  "
            f"v[{chans(site['vision_channels'])}] t[{chans(site['text_channels'])}]"
        )
    summ = data["summary"]
    if summ.get("mean_loss_before") is not None:
        lines += [
            "",
            f"mean error {summ['mean_loss_before']:.4g} -> {summ['mean_loss_after']:.4g} over "
            f"{summ['layers']} layers, {summ['sites']} sites",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m splitq_modifier.report DIR [--plot] [--sites REGEX] [--json]``."""
    p = argparse.ArgumentParser(
        prog="python -m splitq_modifier.report",
        description="Print (or re-plot) the SplitQ calibration report of a saved model.",
    )
    p.add_argument("path", help="saved model folder, or its splitq_report folder")
    p.add_argument("--plot", action="store_true", help="draw the PNGs again from the data")
    p.add_argument("--sites", default=None, help="regex: only print matching sites")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the text")
    args = p.parse_args(argv)
    try:
        data, tensors = load_report(args.path)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.plot:
        directory = _report_dir(args.path)
        data["plots"] = plot_report(directory, data, tensors)
        with open(os.path.join(directory, REPORT_JSON), "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {len(data['plots'])} plots to {directory}")
    print(json.dumps(data, indent=1) if args.json else summarize(data, args.sites))
    return 0


if __name__ == "__main__":
    sys.exit(main())
