"""Channel selection on a trained tiny VLM's real activations: what each rule picks and why.

    python benchmarks/selection_study.py --model trained-mm
    python benchmarks/selection_study.py --model trained-transient --bits 2

The FP model (benchmarks/train_tiny_vlm.py) runs on the fidelity benchmark's calibration
samples (``--calib``, same stream and order as ``benchmarks/fidelity.py``) with hooks on the
first linear of every activation site of the language model (q_proj, o_proj, gate_proj,
down_proj inputs), which fill one :class:`ChannelStats` per site, as the modifier does, and keep
every row. Per site it prints:

1. The planted text channels (from the model's ``meta.json``): how often each is the token's
   largest ``|x|`` on text tokens, its mean and spread of percentile rank (over the channels
   not on the vision path), and where each rule puts it among the candidates (``mocd_error``:
   the step of :func:`text_error_greedy` that takes it).
2. Per rule, at the path widths the modifier uses (``layout.plan_site``): planted channels on
   an outlier path, and the quantization error a per-token round-to-nearest quantizer makes
   with that split, as a share of the token's energy (mean over tokens of
   ``||Q(x) - x||^2 / ||x||^2``; main path at ``--bits``, outlier paths at ``max(bits, 4)``,
   no transforms), on text and on vision tokens: a proxy of what the split leaves the learned
   transforms to fix, not a fidelity measurement.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from splitq_modifier.layout import plan_site
from splitq_modifier.mocd import (
    ChannelStats,
    percentile_ranks,
    select_channels,
    text_error_greedy,
    text_instability_score,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_tiny_vlm as tv  # noqa: E402

PRESETS = {"trained-mm": "mm", "trained-mm-wide": "mm-wide", "trained-transient": "transient"}
RULES = ("mocd", "multi_max", "text_max", "mocd_error")


def capture(model: torch.nn.Module, samples: list[dict]) -> dict[str, dict]:
    """Per site: its ChannelStats, all rows, the vision mask and the output widths."""
    sites: dict[str, dict] = {}
    state: dict[str, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.model.language_model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for name, lin, outs in (
            ("qkv", attn.q_proj, [attn.q_proj, attn.k_proj, attn.v_proj]),
            ("o", attn.o_proj, [attn.o_proj]),
            ("gate_up", mlp.gate_proj, [mlp.gate_proj, mlp.up_proj]),
            ("down", mlp.down_proj, [mlp.down_proj]),
        ):
            key = f"layers.{i}.{name}"
            sites[key] = dict(
                stats=ChannelStats(lin.in_features),
                rows=[],
                vision=[],
                outs=[o.out_features for o in outs],
            )

            def hook(_m, args, key=key):
                x = args[0].detach().float()[0]
                vis, txt = state["vision"], state["text"]
                sites[key]["stats"].update(x, vis, txt)
                sites[key]["rows"].append(x[vis | txt])
                sites[key]["vision"].append(vis[vis | txt])

            handles.append(lin.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for s in samples:
                ids = s["input_ids"][None]
                state["vision"] = ids[0] == tv.IMAGE_TOKEN_ID
                state["text"] = ~state["vision"] & s["attention_mask"].bool()
                model(input_ids=ids, attention_mask=s["attention_mask"][None],
                      pixel_values=s["pixel_values"][None])  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    for site in sites.values():
        site["rows"] = torch.cat(site["rows"])
        site["vision"] = torch.cat(site["vision"])
    return sites


def fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token (row) symmetric round-to-nearest with an absmax scale."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / qmax
    return (x / scale).round().clamp(-qmax - 1, qmax) * scale


def split_error(x: torch.Tensor, paths: tuple[torch.Tensor, ...], bits: int) -> torch.Tensor:
    """Per-row ``||Q(x) - x||^2 / ||x||^2`` with each path quantized on its own."""
    err = torch.zeros(x.shape[0])
    for i, p in enumerate(paths):
        if p.numel():
            xp = x[:, p]
            b = bits if i == len(paths) - 1 else max(bits, 4)
            err += (fake_quant(xp, b) - xp).pow(2).sum(-1)
    return err / x.pow(2).sum(-1).clamp(min=1e-12)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="trained-mm", choices=list(PRESETS))
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--bits", type=int, default=2, help="main-path activation bits")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model and its data")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, task = tv.load_or_train(seed=args.seed, preset=PRESETS[args.model], threads=1)
    planted_t = torch.tensor(task.meta["planted_text_channels"])
    planted_v = torch.tensor(task.meta["planted_vision_channels"])
    sites = capture(model, task.calibration_samples(args.calib))
    print(f"{args.model}: planted text channels {planted_t.tolist()}, vision "
          f"{planted_v.tolist()}; {args.calib} calibration samples, A{args.bits}")  # fmt: skip
    totals: dict[str, list[float]] = {r: [0.0, 0.0, 0] for r in RULES}
    for key, site in sites.items():
        st, x, vm = site["stats"], site["rows"], site["vision"]
        d = st.dim
        k_v, k_t, _ = plan_site(d, site["outs"], 0.02, 0.02).sizes
        vis = torch.sort(st.vision_max, descending=True, stable=True).indices[:k_v]
        xt = st.text_rows
        cand = torch.ones(d, dtype=torch.bool)
        cand[vis] = False
        ranks = percentile_ranks(xt[:, cand])
        col = torch.full((d,), -1, dtype=torch.long)
        col[cand] = torch.arange(int(cand.sum()))
        top1 = xt.abs().argmax(-1)
        scores = {
            "mocd": text_instability_score(xt, 3, exclude=vis),
            "text_max": st.text_max.masked_fill(~cand, float("-inf")),
        }
        greedy = text_error_greedy(xt, 3 * k_t, exclude=vis).tolist()
        print(f"\n{key} (d = {d}, k_v = k_t = {k_t}, {xt.shape[0]} text / {int(vm.sum())} "
              f"vision tokens); planted text channels:")  # fmt: skip
        for j in planted_t.tolist():
            if not cand[j]:
                print(f"  ch {j:4d}: on the vision path (top {k_v} by vision max)")
                continue
            r = ranks[:, col[j]]
            where = "  ".join(f"{name} #{int((s > s[j]).sum()) + 1}" for name, s in scores.items())
            where += f"  mocd_error #{greedy.index(j) + 1 if j in greedy else '>' + str(3 * k_t)}"
            print(
                f"  ch {j:4d}: largest |x| on {(top1 == j).float().mean():.0%} of text tokens, "
                f"rank mean {r.mean():.3f} sd {r.std():.3f}; position by {where}"
            )
        for rule in RULES:
            v, t, m = select_channels(st, rule, 0.02, 0.02, counts=(k_v, k_t))
            got_t = int(torch.isin(planted_t, torch.cat([v, t])).sum())
            got_v = int(torch.isin(planted_v, torch.cat([v, t])).sum())
            err = split_error(x, (v, t, m), args.bits)
            e_t, e_v = float(err[~vm].mean()), float(err[vm].mean()) if vm.any() else 0.0
            totals[rule][0] += e_t
            totals[rule][1] += e_v
            totals[rule][2] += 1
            print(f"  {rule:10s} planted on an outlier path: text {got_t}/{planted_t.numel()}, "
                  f"vision {got_v}/{planted_v.numel()}; error share text {e_t:.4f}, vision "
                  f"{e_v:.4f}")  # fmt: skip
    print("\nmean over sites of the error share (text tokens, vision tokens):")
    for rule, (e_t, e_v, n) in totals.items():
        print(f"  {rule:10s} {e_t / n:.4f}  {e_v / n:.4f}")


if __name__ == "__main__":
    main()
