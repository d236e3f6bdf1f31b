"""Storage of SplitQ decoder linears in the ``splitq-packed`` format vs their fp16 size.

    python benchmarks/size_report.py                    # 7B-width layer + a tiny checkpoint
    python benchmarks/size_report.py --bits W3A3 --no-tiny
    python benchmarks/size_report.py --checkpoint DIR   # any saved splitq-packed model

1. A realistic layer (Qwen2.5-VL-7B widths: hidden 3584, intermediate 18944, 28 heads, 4 KV
   heads of 128) is built directly as :class:`FrozenSplitQLinear` modules (random integer
   codes, no calibration) with SplitQ's default layout: ``k_v = k_t = ceil(2% d)`` outlier
   channels per site at ``max(b, 4)`` bits, Kronecker factors as :mod:`splitq_modifier.transforms`
   makes them, CWS rank ``ceil(2% min(d_out, k_m))`` and MAC rank ``ceil(3% ...)`` at 4 bits.
   The site tensors are linked as they are at save time (stored once per site).
2. A tiny calibrated model (LLaVA, hidden 64, one layer, 1 epoch) is saved and reloaded, or
   an existing checkpoint is loaded with ``--checkpoint``.

Bytes are those of the tensors the format stores per linear (``state_dict()`` of each
:class:`FrozenSplitQLinear`, which is exactly what ``save_pretrained`` writes; for a reloaded
checkpoint they are checked against the safetensors file). Effective bits per weight =
8 * stored bytes (bias excluded) / (d_in * d_out); the fp16 size counts 2 bytes per weight and
per bias element.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile

import torch
from torch import nn

from splitq_modifier.acc import FrozenLowRankBranch, branch_rank
from splitq_modifier.split_linear import FrozenSplitQLinear
from splitq_modifier.transforms import DENSE_MAX, balanced_factors

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 3584, 18944, 28, 4, 128
CATEGORIES = ("weights", "scales", "perm", "transforms", "cws", "mac", "bias")


def factor_dims(n: int) -> list[int]:
    """Kronecker factor sizes of a path of width ``n`` (as ``PathTransform`` makes them)."""
    if n == 0:
        return []
    if n <= DENSE_MAX:
        return [n]
    a, b = balanced_factors(n)
    return [n] if a == 1 else [a, b]


def _codes(gen: torch.Generator, rows: int, cols: int, bits: int) -> torch.Tensor:
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    return torch.randint(lo, hi, (rows, cols), generator=gen, dtype=torch.int8)


def _branch(gen, d_out: int, km: int, ratio: float, bits: int = 4) -> FrozenLowRankBranch:
    r = branch_rank(ratio, d_out, km)
    return FrozenLowRankBranch(
        _codes(gen, r, km, bits),
        torch.rand(r),
        _codes(gen, d_out, r, bits),
        torch.rand(d_out),
        bits,
    )


def synthetic_linear(
    d_in: int,
    d_out: int,
    wbits: int,
    abits: int,
    bias: bool,
    outlier_ratio: float = 0.02,
    cws_ratio: float = 0.02,
    mac_ratio: float = 0.03,
    floor: int = 4,
    seed: int = 0,
) -> FrozenSplitQLinear:
    """A :class:`FrozenSplitQLinear` with SplitQ's default layout and random codes."""
    gen = torch.Generator().manual_seed(seed)
    k = math.ceil(outlier_ratio * d_in)
    sizes = (k, k, d_in - 2 * k)
    wb = (max(wbits, floor), max(wbits, floor), wbits)
    ab = (max(abits, floor), max(abits, floor), abits)
    transforms = [
        (
            torch.rand(n, generator=gen) + 0.5,
            [torch.randn(m, m, generator=gen) for m in factor_dims(n)],
        )
        for n in sizes
    ]
    return FrozenSplitQLinear(
        perm=torch.randperm(d_in, generator=gen),
        sizes=sizes,
        transforms=transforms,
        act_bits=ab,
        act_clip=torch.full((3,), 0.98),
        weight_bits=wb,
        weight_int=[_codes(gen, d_out, n, b) for n, b in zip(sizes, wb)],
        weight_scale=[torch.rand(d_out) for _ in sizes],
        bias=torch.zeros(d_out, dtype=torch.bfloat16) if bias else None,
        cws=_branch(gen, d_out, sizes[2], cws_ratio) if cws_ratio > 0 else None,
        mac=_branch(gen, d_out, sizes[2], mac_ratio) if mac_ratio > 0 else None,
    )


def _copy_site(src: FrozenSplitQLinear, dst: FrozenSplitQLinear) -> None:
    """Give ``dst`` copies of ``src``'s site tensors (as the modifier's freeze does)."""
    for t in src.site_tensor_names():
        dst.register_buffer(t, getattr(src, t).clone())


class _Layer(nn.Module):
    """A decoder layer's SplitQ linears, grouped as in the model (self_attn, mlp)."""

    def __init__(self, wbits: int, abits: int, cws: float, mac: float):
        super().__init__()
        kw = dict(wbits=wbits, abits=abits, cws_ratio=cws, mac_ratio=mac)
        kv = KV_HEADS * HEAD_DIM
        self.self_attn = nn.Module()
        self.mlp = nn.Module()
        self.self_attn.q_proj = synthetic_linear(HIDDEN, HIDDEN, bias=True, seed=0, **kw)
        for i, name in enumerate(("k_proj", "v_proj")):  # same site as q_proj
            lin = synthetic_linear(HIDDEN, kv, bias=True, seed=10 + i, **kw)
            _copy_site(self.self_attn.q_proj, lin)
            setattr(self.self_attn, name, lin)
        self.self_attn.o_proj = synthetic_linear(HIDDEN, HIDDEN, bias=False, seed=1, **kw)
        self.mlp.gate_proj = synthetic_linear(HIDDEN, INTERMEDIATE, bias=False, seed=2, **kw)
        self.mlp.up_proj = synthetic_linear(HIDDEN, INTERMEDIATE, bias=False, seed=3, **kw)
        _copy_site(self.mlp.gate_proj, self.mlp.up_proj)  # same site as gate_proj
        self.mlp.down_proj = synthetic_linear(INTERMEDIATE, HIDDEN, bias=False, seed=4, **kw)


def categorize(name: str) -> str:
    """Category of a stored tensor of a SplitQ linear."""
    if name.startswith("cws."):
        return "cws"
    if name.startswith("mac."):
        return "mac"
    if name.startswith("weight_packed"):
        return "weights"
    if name.startswith("weight_scale"):
        return "scales"
    if name == "perm":
        return "perm"
    if name == "bias":
        return "bias"
    return "transforms"  # smooth_*, factor_*, act_clip


def linear_bytes(m: FrozenSplitQLinear) -> dict[str, int]:
    """Stored bytes per category of one linear (its ``state_dict``, as saved)."""
    out = dict.fromkeys(CATEGORIES, 0)
    for name, t in m.state_dict().items():
        out[categorize(name)] += t.numel() * t.element_size()
    return out


def report(title: str, model: nn.Module, prefix_filter: str = "") -> tuple[float, int, int]:
    """Print one table; return (bits per weight, stored bytes, fp16 bytes)."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, FrozenSplitQLinear) and prefix_filter in name:
            rows.append((name, m, linear_bytes(m)))
    print(f"\n{title}")
    head = f"{'linear':<28}{'d_in x d_out':>14}"
    head += "".join(f"{c:>11}" for c in CATEGORIES) + f"{'total':>12}{'fp16':>12}{'bits/w':>8}"
    print(head)
    print("-" * len(head))
    tot_bytes = tot_nobias = tot_fp16 = tot_w = 0
    for name, m, b in rows:
        n_w = m.in_features * m.out_features
        n_b = 0 if m.bias is None else m.bias.numel()
        stored = sum(b.values())
        fp16 = 2 * (n_w + n_b)
        bits = 8 * (stored - b["bias"]) / n_w
        tot_bytes += stored
        tot_nobias += stored - b["bias"]
        tot_fp16 += fp16
        tot_w += n_w
        short = ".".join(name.split(".")[-2:])
        dims = f"{m.in_features}x{m.out_features}"
        line = f"{short:<28}{dims:>14}" + "".join(f"{b[c]:>11,}" for c in CATEGORIES)
        print(line + f"{stored:>12,}{fp16:>12,}{bits:>8.3f}")
    bits = 8 * tot_nobias / tot_w
    print("-" * len(head))
    print(
        f"{'all':<28}{'':>14}{'':>{11 * len(CATEGORIES)}}{tot_bytes:>12,}{tot_fp16:>12,}"
        f"{bits:>8.3f}"
    )
    ratio = tot_fp16 / tot_bytes
    rel = f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger"
    print(
        f"stored / fp16 = {tot_bytes / tot_fp16:.4f} ({rel}), "
        f"effective bits per weight = {bits:.3f}"
    )
    return bits, tot_bytes, tot_fp16


def realistic(bits: str, cws: float, mac: float) -> float:
    """The 7B-width layer report; returns its effective bits per weight."""
    from splitq_modifier.format import prepare_model_for_save

    wb, ab = (int(x) for x in bits[1:].split("A"))
    layer = _Layer(wb, ab, cws, mac)
    prepare_model_for_save(layer)  # link the sites exactly as save_pretrained does
    title = (
        f"Qwen2.5-VL-7B-width decoder layer, {bits}, outliers 2%+2%, CWS {cws:.0%}, "
        f"MAC {mac:.0%} (synthetic codes)"
    )
    return report(title, layer)[0]


def _file_bytes(path: str, keys: set[str]) -> int:
    """Bytes of the tensors ``keys`` in the safetensors files of ``path``."""
    from safetensors import safe_open

    size = {"I32": 4, "F32": 4, "BF16": 2, "F16": 2, "I64": 8}
    total = 0
    for fname in sorted(os.listdir(path)):
        if fname.endswith(".safetensors"):
            with safe_open(os.path.join(path, fname), framework="pt") as f:
                for key in set(f.keys()) & keys:
                    t = f.get_slice(key)
                    total += math.prod(t.get_shape()) * size[t.get_dtype()]
    return total


def tiny_checkpoint(path: str | None) -> None:
    """Report a saved checkpoint (built from a tiny calibrated LLaVA when ``path`` is None)."""
    from transformers import AutoModelForImageTextToText

    if path is None:
        from llmcompressor import oneshot

        from splitq_modifier import SplitQModifier
        from splitq_modifier.tiny import (
            build_tiny_vlm,
            calibration_dataset,
            collate,
            synthetic_samples,
        )

        tmp = tempfile.mkdtemp(prefix="splitq_size_")
        tiny = build_tiny_vlm("llava", hidden=64, layers=1, path=os.path.join(tmp, "fp"))
        oneshot(
            model=tiny.model,
            dataset=calibration_dataset(synthetic_samples(tiny, 2)),
            data_collator=collate,
            recipe=[SplitQModifier(epochs=1, weight_bits=4, activation_bits=4, batch_size=2)],
            num_calibration_samples=2,
            processor=tiny.tokenizer,
        )
        path = os.path.join(tmp, "w4a4")
        tiny.model.save_pretrained(path, save_compressed=True)
    model = AutoModelForImageTextToText.from_pretrained(path)
    _, stored, _ = report(f"checkpoint {path} (reloaded)", model)
    # the same linears' tensors in the file (keys renamed as transformers saves them)
    from splitq_modifier.format.load import key_maps

    to_checkpoint = key_maps(model)[1]
    keys = {
        to_checkpoint(f"{n}.{k}")
        for n, m in model.named_modules()
        if isinstance(m, FrozenSplitQLinear)
        for k in m.state_dict()
    }
    in_file = _file_bytes(path, keys)
    print(f"bytes of these linears in the safetensors file: {in_file:,} (modules: {stored:,})")


def main() -> None:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", default="W4A4", help="WxAy of the main path (default W4A4)")
    ap.add_argument("--cws-rank-ratio", type=float, default=0.02)
    ap.add_argument("--mac-rank-ratio", type=float, default=0.03)
    ap.add_argument("--checkpoint", default=None, help="a saved splitq-packed model folder")
    ap.add_argument("--no-tiny", action="store_true", help="skip the tiny checkpoint")
    args = ap.parse_args()
    import splitq_modifier  # noqa: F401  (registers the format)

    torch.set_grad_enabled(False)
    bits = realistic(args.bits, args.cws_rank_ratio, args.mac_rank_ratio)
    if not args.no_tiny or args.checkpoint:
        tiny_checkpoint(args.checkpoint)
    print(f"\n7B-width layer at {args.bits}: {bits:.3f} effective bits per weight (target <= 4.7)")


if __name__ == "__main__":
    main()
