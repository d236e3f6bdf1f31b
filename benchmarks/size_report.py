"""Stored size of SplitQ decoder layers in the ``splitq-packed`` format, at real widths.

    python benchmarks/size_report.py                   # every model of the width table, W4A4
    python benchmarks/size_report.py --bits W3A3 --model Qwen2.5-VL-7B
    python benchmarks/size_report.py --checkpoint DIR  # a saved model: spec sizes vs the file

1. For each model of :data:`splitq_modifier.widths.REAL_MODELS` one decoder layer is laid out
   as SplitQ lays it out (:func:`splitq_modifier.layout.plan_site`: aligned 2% + 2% outlier
   paths at ``max(b, 4)`` bits, balanced Kronecker factors; CWS rank ``ceil(2% min(d_out,
   k_m))`` and MAC rank ``ceil(3% ...)`` per linear at 4 bits) and its stored tensors are
   counted from the format's own spec (:meth:`LinearSpec.tensor_shapes`, exactly what
   ``save_pretrained`` writes): packed codes, scales, permutation, smoothing, factors,
   activation clips, branches, biases (Qwen's q/k/v), plus the layer's two RMSNorm weights
   at 2 bytes. Effective bits per weight = 8 * stored bytes / linear weights.
2. ``--adaptive``: the largest size ``outlier_widths: adaptive`` can give a layer: its fixed
   outlier-channel budget placed, within each site's candidate widths
   (:mod:`splitq_modifier.allocation`), where it costs the most bytes (a bound: the data
   decide the real placement).
3. ``--checkpoint DIR``: the same count from a saved model's config, checked against the
   bytes of those tensors in its safetensors files.
"""

from __future__ import annotations

import argparse
import math
import os

from splitq_modifier.acc import branch_rank
from splitq_modifier.allocation import candidate_widths, stores_no_more_blocks
from splitq_modifier.format.spec import BranchSpec, LinearSpec
from splitq_modifier.layout import SitePlan, balanced_plan, plan_site
from splitq_modifier.widths import REAL_MODELS, ModelWidths, site_widths

CATEGORIES = ("codes", "scales", "transforms", "cws", "mac", "bias")
_BYTES = {"torch.int32": 4, "torch.float32": 4}


def categorize(name: str) -> str:
    """Category of a stored tensor of a SplitQ site."""
    if name.startswith(("cws.", "mac.")):
        return name[:3]
    if name.startswith("weight_packed"):
        return "codes"
    if name.startswith("weight_scale"):
        return "scales"
    if name == "site_bias":
        return "bias"
    return "transforms"  # perm, smooth, factors, act_clip


def site_spec(
    d: int,
    outs: tuple[int, ...],
    wbits: int,
    abits: int,
    cws: float,
    mac: float,
    bias: bool,
    floor: int = 4,
    widths: tuple[int, int] | None = None,
) -> LinearSpec | None:
    """The owner's spec of a site laid out with SplitQ's defaults (``widths``: given outlier
    widths, None when their main path has no balanced factorisation)."""
    plan = plan_site(d, outs, 0.02, 0.02)
    if widths is not None:
        sizes = (*widths, d - sum(widths))
        dims = balanced_plan(sizes, outs)
        if dims is None:
            return None
        plan = SitePlan(sizes, dims, plan.linear_macs)
    aux = max(wbits, floor)
    ranks = lambda ratio: tuple(branch_rank(ratio, o, plan.sizes[2]) for o in outs)  # noqa: E731
    return LinearSpec(
        sizes=plan.sizes,
        weight_bits=(aux, aux, wbits),
        act_bits=(max(abits, floor), max(abits, floor), abits),
        factors=plan.dims,
        out_splits=tuple(outs),
        members=tuple(f"linear_{j}" for j in range(len(outs))),
        bias=bias,
        cws=BranchSpec(ranks(cws), 4) if cws > 0 else None,
        mac=BranchSpec(ranks(mac), 4) if mac > 0 else None,
    )


def spec_bytes(spec: LinearSpec) -> dict[str, int]:
    """Stored bytes per category of a site (its owner's tensors)."""
    out = dict.fromkeys(CATEGORIES, 0)
    shapes = spec.tensor_shapes(spec.out_splits[0], sum(spec.sizes))
    for name, (shape, dtype) in shapes.items():
        out[categorize(name)] += math.prod(shape) * _BYTES[str(dtype)]
    return out


def largest_adaptive_widths(m: ModelWidths, wb: int, ab: int, cws: float, mac: float,
                            bias: bool) -> dict[str, tuple[int, int]]:  # fmt: skip
    """Per site, the outlier widths that make the layer largest within its fixed budget."""
    sites = site_widths(m)
    options = {}
    budget = 0
    for site, (d, outs) in sites.items():
        fixed = plan_site(d, outs, 0.02, 0.02).sizes[:2]
        budget += sum(fixed)
        step = 32 if all(k % 32 == 0 for k in fixed) else 1
        opts = []
        for kv in candidate_widths(fixed[0], d, step):
            for kt in candidate_widths(fixed[1], d, step):
                if not stores_no_more_blocks((kv, kt), fixed, d):
                    continue
                spec = site_spec(d, outs, wb, ab, cws, mac, bias and site == "attn_in", 4,
                                 (kv, kt))  # fmt: skip
                if spec is not None:
                    opts.append((kv + kt, (kv, kt), sum(spec_bytes(spec).values())))
        options[site] = opts
    best: dict[int, tuple[int, dict]] = {0: (0, {})}
    for site, opts in options.items():
        nxt: dict[int, tuple[int, dict]] = {}
        for spent, (size, choice) in best.items():
            for channels, widths, b in opts:
                c = spent + channels
                if c <= budget and (c not in nxt or size + b > nxt[c][0]):
                    nxt[c] = (size + b, {**choice, site: widths})
        best = nxt
    return max(best.values(), key=lambda v: v[0])[1]


def layer_report(m: ModelWidths, bits: str, cws: float, mac: float, verbose: bool,
                 adaptive: bool = False) -> float:  # fmt: skip
    """Effective bits per weight of one decoder layer of ``m`` (printed per site if verbose);
    ``adaptive``: the largest the adaptive widths can make it."""
    wb, ab = (int(x) for x in bits[1:].split("A"))
    bias = m.model_type.startswith("qwen2")  # Qwen2/2.5 (and InternVL3's Qwen2.5) q/k/v bias
    total = dict.fromkeys(CATEGORIES, 0)
    weights = 0
    widths = largest_adaptive_widths(m, wb, ab, cws, mac, bias) if adaptive else {}
    for site, (d, outs) in site_widths(m).items():
        spec = site_spec(d, outs, wb, ab, cws, mac, bias and site == "attn_in", 4,
                         widths.get(site))  # fmt: skip
        b = spec_bytes(spec)
        n_w = d * sum(outs)
        weights += n_w
        for k, v in b.items():
            total[k] += v
        if verbose:
            cells = "".join(f"{b[c]:>12,}" for c in CATEGORIES)
            print(f"  {site:<9}{d:>7} x {sum(outs):<7}{spec.sizes!s:>22}{cells}"
                  f"{8 * sum(b.values()) / n_w:>9.3f}")  # fmt: skip
    norms = 2 * 2 * m.hidden  # input and post-attention RMSNorm weights, 2 bytes each
    stored = sum(total.values()) + norms
    return 8 * stored / weights


def checkpoint_report(path: str) -> tuple[int, int]:
    """Spec-derived bytes of a saved model's SplitQ tensors vs their bytes in its files;
    returns both."""
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    import splitq_modifier  # noqa: F401  (registers the format)
    from splitq_modifier.integrations.transformers import key_maps
    from splitq_modifier.runtime import SplitQSiteLinear

    model = AutoModelForImageTextToText.from_pretrained(path)
    to_checkpoint = key_maps(model)[1]
    want, keys, weights = 0, set(), 0
    for name, m in model.named_modules():
        if isinstance(m, SplitQSiteLinear):
            weights += m.in_features * m.out_features
            if m.is_owner:
                want += sum(spec_bytes(LinearSpec.from_scheme(m.quantization_scheme)).values())
                keys |= {to_checkpoint(f"{name}.{k}") for k in m.state_dict()}
    size = {"I32": 4, "F32": 4, "BF16": 2, "F16": 2, "I64": 8}
    got = 0
    for fname in sorted(os.listdir(path)):
        if fname.endswith(".safetensors"):
            with safe_open(os.path.join(path, fname), framework="pt") as f:
                for key in set(f.keys()) & keys:
                    t = f.get_slice(key)
                    got += math.prod(t.get_shape()) * size[t.get_dtype()]
    print(f"{path}: SplitQ tensors {want:,} bytes by the spec, {got:,} bytes in the files; "
          f"{8 * got / max(weights, 1):.3f} bits per linear weight")  # fmt: skip
    return want, got


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Command line entry point; returns model -> bits per weight."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", default="W4A4", help="WxAy of the main path (default W4A4)")
    ap.add_argument("--model", action="append", help="model name(s) of the width table")
    ap.add_argument("--cws-rank-ratio", type=float, default=0.02)
    ap.add_argument("--mac-rank-ratio", type=float, default=0.03)
    ap.add_argument("--checkpoint", default=None, help="a saved splitq-packed model folder")
    ap.add_argument(
        "--adaptive",
        action="store_true",
        help="the largest layer the adaptive widths can give (within its budget)",
    )
    ap.add_argument("--verbose", action="store_true", help="per-site byte breakdown")
    args = ap.parse_args(argv)
    if args.checkpoint:
        checkpoint_report(args.checkpoint)
        return {}
    names = args.model or list(REAL_MODELS)
    how = "adaptive widths, worst case" if args.adaptive else "outliers 2%+2% (aligned)"
    print(f"SplitQ {args.bits}, {how}, CWS {args.cws_rank_ratio:.0%}, "
          f"MAC {args.mac_rank_ratio:.0%}: effective bits per weight of one decoder layer, "
          "everything stored counted\n")  # fmt: skip
    print(f"{'model':<24}{'hidden':>7}{'inter':>7}{'bits/w':>8}{'vs fp16':>9}")
    out = {}
    for name in names:
        m = REAL_MODELS[name]
        if args.verbose:
            print(f"{name}:")
            head = "".join(f"{c:>12}" for c in CATEGORIES)
            print(f"  {'site':<9}{'d_in x d_out':>15}{'paths v/t/m':>22}{head}{'bits/w':>9}")
        bpw = layer_report(m, args.bits, args.cws_rank_ratio, args.mac_rank_ratio, args.verbose,
                           args.adaptive)  # fmt: skip
        out[name] = bpw
        print(f"{name:<24}{m.hidden:>7}{m.intermediate:>7}{bpw:>8.3f}{16 / bpw:>8.2f}x")
    worst = max(v for k, v in out.items() if REAL_MODELS[k].hidden >= 1024)
    print(f"\nlargest at hidden >= 1024: {worst:.3f} bits per weight")
    return out


if __name__ == "__main__":
    main()
