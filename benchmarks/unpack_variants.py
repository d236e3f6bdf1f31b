"""Scratch experiment: how cheaply can a Triton kernel feed 4-bit weights to an int8 ``tl.dot``
on sm_90? Compiles variants of a minimal W4 x A8 GEMM main loop for ``cuda:90`` on the CPU and
counts the SASS instructions of its K loop (:mod:`benchmarks.sass`).

    python -m benchmarks.unpack_variants                 # prefill tile 128 x 64 x 128, 8 warps
    python -m benchmarks.unpack_variants --tile 64 16 256 --warps 4 --stages 4
    TRITON_INTERPRET=1 python -m benchmarks.unpack_variants --check   # numerics on CPU

Every variant computes ``y^T[o, t] = sum_k W[o, k] * x[t, k]`` for one ``[BLOCK_O, BLOCK_T]``
tile (weights on the left, as kernel B does). The weights are the compressed-tensors dense
4-bit packing (code ``k`` of a row, offset by +8, at bits ``4k`` of the row's little-endian bit
stream: byte ``j`` holds codes ``2j`` (low nibble) and ``2j + 1`` (high nibble)). Variants:

* ``today``: kernel B's unpack (``common.load_packed_rows``): int32 words as
  ``[O, K/8, 1]``, shift by ``[1, 1, 8]`` offsets, mask, subtract 8, to int8, reshape.
* ``int8``: weights stored unpacked as int8 (no unpack: the loop's floor).
* ``bytes_join``: the same bytes loaded as uint8 ``[O, K/2]``; ``lo = b & 15``, ``hi = b >> 4``
  (the +8 offset kept: codes 0..15), ``tl.join(lo, hi)`` -> ``[O, K/2, 2]`` -> reshape
  ``[O, K]``; the epilogue subtracts ``8 * sum_k x[t, k]`` (per-token code sums).
* ``asm_join``: as ``bytes_join`` with the nibble split done 4 bytes at a time in one 32-bit
  register by inline PTX (``tl.inline_asm_elementwise(..., pack=4)``): ``and.b32 0x0F0F0F0F``
  and ``shr.u32 4`` + ``and.b32`` (3 instructions per 8 codes, QServe's unpack).
* ``split``: a save-time reorder of each row's ``BLOCK_K``-code blocks: byte ``j`` of a block
  holds codes ``j`` (low nibble) and ``j + BLOCK_K / 2`` (high nibble). Unpacked with plain
  Triton ``uint8`` ops, then ``join`` -> ``permute`` -> reshape puts the low nibbles in the
  first half of the block and the high ones in the second: in the int8 MMA fragment the
  thread that holds code ``k`` also holds ``k + BLOCK_K / 2`` (for ``BLOCK_K`` a multiple of
  64), so no byte changes thread or register.
* ``asm_split``: ``split`` with the nibble split in inline PTX (``asm_join``'s).
* ``asm_split_swapped``: ``asm_split`` with the operands swapped (tokens on the left, the
  unpacked weights as the right operand, which WGMMA reads from shared memory).

The ``+8`` offset of the byte variants is subtracted in the epilogue from per-token code sums
``sum_k x[t, k]`` passed in (kernel A would compute them exactly while it quantizes).
"""

from __future__ import annotations

import argparse
import os
import sys

import triton
import triton.language as tl

VARIANTS = (
    "today", "int8", "bytes_join", "asm_join", "split", "asm_split", "asm_split_swapped",
)  # fmt: skip


@triton.jit
def _nibbles_asm(b):
    """Low and high nibbles of uint8 ``b``, four bytes per 32-bit PTX instruction."""
    lo = tl.inline_asm_elementwise(
        "and.b32 $0, $1, 0x0F0F0F0F;", "=r,r", [b], dtype=tl.uint8, is_pure=True, pack=4
    )
    hi = tl.inline_asm_elementwise(
        "{ .reg .b32 t; shr.u32 t, $1, 4; and.b32 $0, t, 0x0F0F0F0F; }",
        "=r,r",
        [b],
        dtype=tl.uint8,
        is_pure=True,
        pack=4,
    )
    return lo, hi


@triton.jit
def w4_gemm_kernel(
    w_ptr, x_ptr, xsum_ptr, y_ptr, stride_w, K,
    VARIANT: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``y[t, o] = sum_k W[o, k] x[t, k]`` for one tile; ``w_ptr`` int32 words (``today``),
    int8 codes (``int8``) or uint8 bytes (the others); ``stride_w`` in those units."""
    o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_O, BLOCK_T], dtype=tl.int32)
    acc_t = tl.zeros([BLOCK_T, BLOCK_O], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        xb = tl.load(x_ptr + t[None, :] * K + kk[:, None])  # [BLOCK_K, BLOCK_T] int8
        if VARIANT == "today":
            E: tl.constexpr = 8
            wi = k0 // E + tl.arange(0, BLOCK_K // E)
            words = tl.load(w_ptr + o[:, None, None] * stride_w + wi[None, :, None])
            shifts = (tl.arange(0, E) * 4)[None, None, :]
            codes = (words >> shifts) & 15
            a = tl.reshape((codes - 8).to(tl.int8), [BLOCK_O, BLOCK_K])
            acc = tl.dot(a, xb, acc, out_dtype=tl.int32)
        elif VARIANT == "int8":
            a = tl.load(w_ptr + o[:, None] * stride_w + kk[None, :])
            acc = tl.dot(a, xb, acc, out_dtype=tl.int32)
        else:
            bj = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            b = tl.load(w_ptr + o[:, None] * stride_w + bj[None, :])  # [O, K/2] uint8
            if VARIANT == "bytes_join" or VARIANT == "split":
                lo = b & 15
                hi = b >> 4
            else:
                lo, hi = _nibbles_asm(b)
            if VARIANT == "bytes_join" or VARIANT == "asm_join":
                a = tl.reshape(tl.join(lo, hi), [BLOCK_O, BLOCK_K])
            else:  # [O, K/2, 2] -> [O, 2, K/2] -> [O, K]: low nibbles first, then high
                a = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), [BLOCK_O, BLOCK_K])
            a = a.to(tl.int8, bitcast=True)
            if VARIANT == "asm_split_swapped":
                acc_t = tl.dot(tl.trans(xb), tl.trans(a), acc_t, out_dtype=tl.int32)
            else:
                acc = tl.dot(a, xb, acc, out_dtype=tl.int32)
    if VARIANT == "asm_split_swapped":
        acc = tl.trans(acc_t)
    if VARIANT != "today" and VARIANT != "int8":
        xsum = tl.load(xsum_ptr + t)  # per-token code sums (from kernel A)
        acc = acc - 8 * xsum[None, :]  # the +8 offset, folded into the epilogue
    tl.store(y_ptr + t[None, :] * (tl.num_programs(0) * BLOCK_O) + o[:, None], acc)


def _spec(variant: str, tile: tuple[int, int, int]):
    bo, bt, bk = tile
    ptr = {"today": "*i32", "int8": "*i8"}.get(variant, "*u8")
    const = {"VARIANT": variant, "BLOCK_O": bo, "BLOCK_T": bt, "BLOCK_K": bk}
    return const, {"w_ptr": ptr, "x_ptr": "*i8", "xsum_ptr": "*i32", "y_ptr": "*i32"}


def count(variant: str, tile, warps: int, stages: int, dump: str | None = None) -> dict:
    """Compile one variant for sm_90; per-iteration counts of its K loop (per thread)."""
    from benchmarks import sass

    const, ptrs = _spec(variant, tile)
    k = 4096  # a real-site K: stride_w multiple of 16 in every unit
    stride = {"today": k // 8, "int8": k}.get(variant, k // 2)
    opts = {"num_warps": warps, "num_stages": stages}
    prof = sass.compile_profile(w4_gemm_kernel, const, ptrs, {"stride_w": stride, "K": k},
                                opts, f"w4 {variant} {tile}", dump=dump)  # fmt: skip
    loops = prof.mma_loops()
    if not loops:
        raise RuntimeError(f"{variant}: no MMA loop")
    lp = max(loops, key=lambda lp: len(lp.own))
    codes = tile[0] * tile[2]
    row = sass.loop_summary(lp, warps * 32, codes)
    row["regs"], row["shared"] = prof.regs, prof.shared
    row["shfl"] = sum(1 for i in lp.own if i.op.startswith("SHFL"))
    row["ldsm"] = sum(1 for i in lp.own if i.op.startswith("LDSM"))
    row["sts_ops"] = sorted({i.op for i in lp.own if i.cls == "sts"})
    return row


def check() -> None:
    """Numerics of the variants that run under Triton's interpreter (no inline PTX there)."""
    import torch

    from splitq_modifier.runtime.quant import packed_words  # noqa: F401

    torch.manual_seed(0)
    o_n, t_n, k = 64, 16, 256
    codes = torch.randint(-8, 8, (o_n, k), dtype=torch.int32)
    x = torch.randint(-8, 8, (t_n, k), dtype=torch.int8)
    ref = x.to(torch.int32) @ codes.T
    u = (codes + 8).to(torch.int64)
    words = torch.zeros(o_n, k // 8, dtype=torch.int64)
    for e in range(8):
        words |= u[:, e::8] << (4 * e)
    words = words.to(torch.uint32).view(torch.int32) if hasattr(torch, "uint32") else words
    words = words.to(torch.int32) if words.dtype != torch.int32 else words
    byts = words.contiguous().view(torch.uint8).reshape(o_n, k // 2)
    bk = 64
    blk = u.reshape(o_n, k // bk, bk)  # split layout: byte j = codes (j, j + bk/2) of a block
    split = (blk[:, :, : bk // 2] | (blk[:, :, bk // 2 :] << 4)).reshape(o_n, k // 2)
    xsum = x.to(torch.int32).sum(1).to(torch.int32)
    for variant, w, stride in (("today", words, k // 8), ("int8", codes.to(torch.int8), k),
                               ("bytes_join", byts, k // 2),
                               ("split", split.to(torch.uint8), k // 2)):  # fmt: skip
        y = torch.zeros(t_n, o_n, dtype=torch.int32)
        w4_gemm_kernel[(o_n // 64, t_n // 16)](w.contiguous(), x, xsum, y, stride, k, variant,
                                               64, 16, bk)  # fmt: skip
        print(f"{variant}: exact = {bool(torch.equal(y, ref))}")


def main(argv: list[str] | None = None) -> int:
    """Print the K-loop counts of every variant (or check numerics under the interpreter)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tile", nargs=3, type=int, default=[128, 64, 128], help="O T K")
    ap.add_argument("--warps", type=int, default=8)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--dump", default=None)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    if args.check:
        check()
        return 0
    tile = tuple(args.tile)
    print(f"W4 x A8 K loop, tile O x T x K = {tile}, {args.warps} warps, {args.stages} stages, "
          f"sm_90, Triton {triton.__version__}; per iteration and per thread:")  # fmt: skip
    print("| variant | MMA instructions | int | fp32 | ldg | lds (ldmatrix) | sts | shfl | all "
          "| int per code | registers |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v in args.variants:
        try:
            r = count(v, tile, args.warps, args.stages, args.dump)
        except Exception as e:  # a variant Triton cannot compile is a finding too
            print(f"| {v} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} |")
            continue
        mm = ", ".join(f"{k} x{n}" for k, n in r["mma_ops"].items())
        print(f"| {v} | {mm} | {r['int']} | {r['fp32']} | {r['ldg']} | {r['lds']} ({r['ldsm']}) "
              f"| {r['sts']} | {r['shfl']} | {r['total']} | **{r['int_per_code']:.2f}** "
              f"| {r['regs']} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and "--check" not in sys.argv:
        sys.exit("compiling needs TRITON_INTERPRET unset")
    sys.exit(main())
