"""Time MOCD channel selection at a real width against a per-channel scikit-learn loop.

    python benchmarks/mocd_speed.py                     # d = 18944, 4096 text tokens
    python benchmarks/mocd_speed.py --d 4096 --tokens 2048
    python benchmarks/mocd_speed.py --device cuda       # default: cuda when available
    git show 3dea06d:src/splitq_modifier/mocd.py > /tmp/mocd_exact.py
    python benchmarks/mocd_speed.py --reference /tmp/mocd_exact.py   # vs the old exact solver

What it does:

1. Planted activations (as ``planted_activations`` in ``tests/test_mocd.py``): background
   channels with persistent log-normal magnitudes (+-25% per-token jitter, random sign);
   ``--planted`` vision channels with huge magnitudes on vision tokens only, and ``--planted``
   text channels whose magnitude is log-uniform over ~6.5 decades on text tokens (an unstable
   rank within the token). Fed to :class:`ChannelStats` in batches, keeping all text rows.
2. Times ``select_channels(stats, "mocd", 0.02, 0.02)`` (K = ``--clusters``) on ``--device``,
   and separately its two stages (percentile ranks, batched k-means) on the same rows.
3. ``--reference PATH``: another ``mocd.py`` (for example the exact solver this project used
   before, from git history) is loaded from its file and its ``select_channels`` timed on the
   same statistics, run right after ours (same load); the two text selections are compared
   (Jaccard), and on the subset below its inertias serve as the optimum.
4. The reference, scikit-learn's ``KMeans(n_clusters=K, n_init=10)`` fitted
   channel by channel on the same rank matrix, is far too slow for all channels: it is run on
   a random subset of ``--subset`` channels (always including the planted text channels),
   timed there and extrapolated linearly to all ranked channels (the output says so).
5. Agreement on that subset: our selection contains ``m`` of the subset's channels, which are
   our top ``m`` there; they are compared (Jaccard) with sklearn's top ``m`` by its own score
   (inertia / n), and with the reference's. Per-channel inertias are compared too (each
   solver's inertia is that of an actual partition, so the lower one is closer to the optimum).
   ``--subset 0`` skips sklearn.

Prints ratios, never asserts timing. Thread counts: torch and sklearn both get ``--threads``.
Wall and CPU time (of this process) are both printed: on a shared machine both move with the
load of other jobs. On an oversubscribed box (more busy threads than cores), more than one
OpenMP thread is badly slowed by spin-waiting (measured on this project's 2-core box: the old
exact solver 5-30x slower with 2 threads than with 1); ``OMP_WAIT_POLICY=PASSIVE`` removes most
of that.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time

import numpy as np
import torch

from splitq_modifier import mocd
from splitq_modifier.mocd import (
    ChannelStats,
    batched_kmeans_1d,
    jaccard,
    percentile_ranks,
    select_channels,
)


def planted_activations(
    d: int, n_vis: int, n_txt: int, planted: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x [n_vis + n_txt, d], vision_mask, vision_channels, text_channels)``, tokens shuffled."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(1.5 * torch.randn(d, generator=g))
    perm = torch.randperm(d, generator=g)
    vis_ch, txt_ch = perm[:planted], perm[planted : 2 * planted]
    n = n_vis + n_txt
    sign = torch.where(torch.rand(n, d, generator=g) < 0.5, -1.0, 1.0)
    x = scale * (1 + 0.25 * torch.randn(n, d, generator=g)).abs()
    x.mul_(sign)
    big = scale.max()
    vis_mag = big * (20 + 10 * torch.rand(n_vis, planted, generator=g))
    x[:n_vis, vis_ch] = vis_mag * sign[:n_vis, vis_ch]
    txt_mag = big * torch.exp(torch.empty(n_txt, planted).uniform_(-12, 3, generator=g))
    x[n_vis:, txt_ch] = txt_mag * sign[n_vis:, txt_ch]
    del sign
    is_vis = torch.zeros(n, dtype=torch.bool)
    is_vis[:n_vis] = True
    p = torch.randperm(n, generator=g)
    return x[p], is_vis[p], vis_ch, txt_ch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device):
    """``(fn(), wall seconds, CPU seconds of this process)``."""
    _sync(device)
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t, time.process_time() - c


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} torch threads)"


def _load_reference(path: str):
    """A ``mocd.py`` loaded from its file as a module of its own."""
    spec = importlib.util.spec_from_file_location("mocd_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=18944, help="channel count of the site")
    ap.add_argument("--tokens", type=int, default=4096, help="text tokens (all kept)")
    ap.add_argument("--vision-tokens", type=int, default=1024)
    ap.add_argument("--planted", type=int, default=8, help="planted channels per modality")
    ap.add_argument("--clusters", type=int, default=3, help="K of the text score")
    ap.add_argument("--subset", type=int, default=500, help="channels for sklearn (0: skip)")
    ap.add_argument("--threads", type=int, default=2, help="torch and sklearn threads")
    ap.add_argument("--reference", default=None, help="path of another mocd.py to compare")
    ap.add_argument("--seed", type=int, default=0)
    default_dev = "cuda" if torch.cuda.is_available() else "cpu"
    ap.add_argument("--device", default=default_dev, help=f"default: {default_dev}")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ratio = 0.02
    d, n_txt, k = args.d, args.tokens, args.clusters

    x, vis_mask, vis_ch, txt_ch = planted_activations(
        d, args.vision_tokens, n_txt, args.planted, args.seed
    )
    stats = ChannelStats(d, max_text_tokens=n_txt, seed=args.seed)
    for s in range(0, x.shape[0], 1024):
        vm = vis_mask[s : s + 1024]
        stats.update(x[s : s + 1024], vm, ~vm)
    del x
    k_t = math.ceil(ratio * d)
    print(
        f"d = {d}, text tokens n = {stats.num_text_tokens}, vision tokens = "
        f"{stats.num_vision_tokens}, K = {k}, k_v = k_t = {k_t}, device: {_device_name(device)}"
    )
    ref = _load_reference(args.reference) if args.reference else None

    def select(mod):
        return lambda: mod.select_channels(
            stats, "mocd", ratio, ratio, num_clusters=k, device=device
        )

    if device.type == "cuda":  # warm-up (CUDA context, kernels) on a small site
        w, wm, _, _ = planted_activations(256, 64, 256, 2, args.seed)
        ws = ChannelStats(256)
        ws.update(w, wm, ~wm)
        select_channels(ws, "mocd", ratio, ratio, num_clusters=k, device=device)

    (vis, txt, _), t_select, c_select = _timed(select(mocd), device)
    got_v = int(torch.isin(vis_ch, vis).sum())
    eligible = txt_ch[~torch.isin(txt_ch, vis)]  # the vision path is chosen first
    got_t = int(torch.isin(eligible, txt).sum())

    # The two stages on the same rows, as select_channels computes them.
    keep = torch.ones(d, dtype=torch.bool)
    keep[vis] = False
    kept = torch.nonzero(keep).flatten()
    text_rows = stats.text_rows[:, kept].to(device)
    ranks, t_ranks, c_ranks = _timed(lambda: percentile_ranks(text_rows), device)
    _, t_kmeans, c_kmeans = _timed(lambda: batched_kmeans_1d(ranks, k), device)
    print(
        f"ours: select_channels(mocd) {t_select:.2f} s wall, {c_select:.2f} s CPU "
        f"(stages re-timed, wall: percentile ranks {t_ranks:.2f} s, k-means {t_kmeans:.2f} s)"
    )
    print(
        f"planted recovered: vision {got_v}/{args.planted}; text {got_t}/{eligible.numel()} "
        f"of those not taken by the vision path (it took {args.planted - eligible.numel()} of "
        f"the {args.planted}: their background magnitude on vision tokens is in its top k_v)"
    )
    if ref is not None:
        (r_vis, r_txt, _), t_ref, c_ref = _timed(select(ref), device)
        shared = len(set(txt.tolist()) & set(r_txt.tolist()))
        print(
            f"reference {args.reference}: select_channels(mocd) {t_ref:.2f} s wall, "
            f"{c_ref:.2f} s CPU; reference / ours: {t_ref / t_select:.2f}x wall, "
            f"{c_ref / c_select:.2f}x CPU; same vision path: {torch.equal(vis, r_vis)}; "
            f"text path Jaccard {jaccard(txt, r_txt):.3f} ({shared} of {txt.numel()} shared)"
        )
    if args.subset <= 0:
        return

    # sklearn on a random subset of the ranked channels that includes the planted text ones.
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    d_eff = kept.numel()
    g = torch.Generator().manual_seed(args.seed + 1)
    planted_pos = torch.nonzero(torch.isin(kept, eligible)).flatten()
    others = torch.randperm(d_eff, generator=g)
    others = others[~torch.isin(others, planted_pos)][: max(args.subset - planted_pos.numel(), 0)]
    sub = torch.sort(torch.cat([planted_pos, others])).values
    sub_ranks = ranks[:, sub.to(ranks.device)]
    ours = batched_kmeans_1d(sub_ranks, k).cpu().numpy()
    cols = sub_ranks.double().cpu().numpy()
    t, c = time.perf_counter(), time.process_time()
    with threadpool_limits(args.threads):
        skl = np.array(
            [
                KMeans(n_clusters=k, n_init=10, random_state=0).fit(cols[:, j : j + 1]).inertia_
                for j in range(sub.numel())
            ]
        )
    t_sk, c_sk = time.perf_counter() - t, time.process_time() - c
    scale = d_eff / sub.numel()
    print(
        f"sklearn KMeans(n_clusters={k}, n_init=10) loop: {t_sk:.1f} s wall, {c_sk:.1f} s CPU "
        f"measured on {sub.numel()} channels; extrapolated to all {d_eff} ranked channels: "
        f"{t_sk * scale:.0f} s wall, {c_sk * scale:.0f} s CPU"
    )
    w_sk, cpu_sk = t_sk * scale, c_sk * scale
    print(
        f"speed ratio, k-means stage (sklearn loop / ours): {w_sk / t_kmeans:.0f}x wall, "
        f"{cpu_sk / c_kmeans:.0f}x CPU"
    )
    print(
        "speed ratio, whole selection (our ranks + sklearn loop / our select_channels): "
        f"{(t_ranks + w_sk) / t_select:.0f}x wall, {(c_ranks + cpu_sk) / c_select:.0f}x CPU; "
        f"sklearn loop alone / our select_channels: {w_sk / t_select:.0f}x wall, "
        f"{cpu_sk / c_select:.0f}x CPU"
    )
    if device.type == "cuda":
        print("(CPU ratios are not meaningful on cuda: the GPU work is not CPU time)")

    # Selections on the subset: our full selection picks m of its channels (our top m there);
    # compare with sklearn's (and the reference's) top m by their own score.
    chosen = torch.isin(kept[sub], txt).numpy()
    m = int(chosen.sum())
    ours_top = np.argsort(-ours, kind="stable")[:m]
    same = set(ours_top.tolist()) == set(np.nonzero(chosen)[0].tolist())
    planted_in_sub = np.nonzero(torch.isin(kept[sub], eligible).numpy())[0]
    solvers = {"sklearn": skl}
    if ref is not None:
        solvers["reference"] = ref.batched_kmeans_1d(sub_ranks, k).cpu().numpy()
    print(f"on the {sub.numel()}-channel subset our selection has {m} channels (= our top {m} "
          f"there: {same})")  # fmt: skip
    for name, other in solvers.items():
        top = np.argsort(-other, kind="stable")[:m]
        rel = (other - ours) / np.maximum(ours, 1e-300)
        print(
            f"  {name}: Jaccard of its top {m} with ours {jaccard(ours_top, top):.3f}"
            f"; planted text channels in its top {m}: "
            f"{int(np.isin(planted_in_sub, top).sum())}/{planted_in_sub.size}; per-channel "
            f"inertia vs ours: higher by > 1e-6 (relative) on {int((rel > 1e-6).sum())}/"
            f"{rel.size} (max {rel.max():.2e}), lower by > 1e-6 on {int((rel < -1e-6).sum())} "
            f"(min {rel.min():.2e}), median {np.median(rel):.2e}"
        )
    if ref is not None:
        opt = solvers["reference"]
        for name, val in (("ours", ours), ("sklearn", skl)):
            exc = (val - opt) / np.maximum(opt, 1e-300)
            print(
                f"  {name} above the reference's inertia: median {np.median(exc):.2e}, "
                f"90th percentile {np.quantile(exc, 0.9):.2e}, max {exc.max():.2e}"
            )


if __name__ == "__main__":
    main()
