"""SASS instruction counts of the SplitQ site kernels, compiled for sm_90 on a CPU.

    python benchmarks/sass.py                      # Qwen2.5-VL-7B attn_in + mlp_down, W4A4
    python benchmarks/sass.py --model Qwen2.5-VL-72B --bits W3A3 --dump /tmp/sass

Where the counts come from: each kernel configuration is built with ``triton.compile`` for
``cuda:90`` (the ``ASTSource`` / ``GPUTarget`` path of :mod:`benchmarks.compile_check`, with the
same 16-byte divisibility hints a launch on real tensors gets), and the cubin is disassembled by
the ``nvdisasm`` that ships in the triton wheel (``triton/backends/nvidia/bin``), with the
source line of every instruction (``-gi``: the Python line, and the lines it was inlined at).

Loops are the backward branches of the disassembly (``BRA`` to a lower address): the body of
a loop is every instruction from the target to the branch. A loop's *own* instructions are
those of its body outside any loop nested in it. Each loop is named by the Python function its
instructions come from (the innermost frame of the line table, majority vote) and the line of
the kernel that calls it.

Instruction classes (per warp, i.e. per thread, per execution):

* ``mma``: tensor-core instructions (``IGMMA``/``HGMMA``: Hopper's warpgroup MMA, issued by each
  of the 4 warps of a warpgroup; ``IMMA``/``HMMA``: the per-warp ``mma.sync``);
* ``int``: integer and logic ALU work: ``LOP3 SHF IADD3 VIADD PRMT IMAD LEA ISETP SEL SGXT
  PLOP3 P2R I2I MOV ...`` (address arithmetic, loop control and predicates included);
* ``fp32``: ``FFMA FMUL FADD FMNMX FSEL FSETP F2FP I2FP ...``;
* ``xu``: the multi-function / conversion unit (``MUFU F2I I2F F2F FRND``);
* ``ldg``/``stg``/``lds``/``sts``: global and shared memory (``LDGSTS``, the async copy, is
  counted as a global load; ``LDSM``/``STSM`` as shared);
* ``uniform``: the scalar datapath (``U*`` opcodes); ``other``: control and synchronisation.
"""

from __future__ import annotations

import argparse
import ast
import functools
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field

MMA_OPS = {"IGMMA", "HGMMA", "QGMMA", "BGMMA", "IMMA", "HMMA", "DMMA"}
INT_OPS = {
    "LOP3", "LOP", "SHF", "SHL", "SHR", "IADD3", "IADD", "VIADD", "VIADDMNMX", "PRMT", "IMAD",
    "IMUL", "IMNMX", "VIMNMX", "VIMNMX3", "IABS", "ISETP", "SEL", "LEA", "SGXT", "BMSK",
    "BREV", "FLO", "POPC", "PLOP3", "P2R", "R2P", "I2I", "I2IP", "MOV", "IDP", "IDP4A",
    "CS2R", "S2R", "VOTE", "VHMNMX",
}  # fmt: skip
FP32_OPS = {
    "FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "FSET", "F2FP", "I2FP", "FCHK", "HFMA2",
    "HADD2", "HMUL2", "HMNMX2", "FSWZADD",
}  # fmt: skip
XU_OPS = {"MUFU", "F2I", "I2F", "F2F", "FRND", "F2IP"}
LDG_OPS = {"LDG", "LDGSTS", "LD", "UTMALDG", "LDL"}
STG_OPS = {"STG", "ST", "RED", "ATOM", "ATOMG", "UTMASTG", "STL", "REDG"}
LDS_OPS = {"LDS", "LDSM", "ATOMS"}
STS_OPS = {"STS", "STSM"}
CLASSES = ("mma", "int", "fp32", "xu", "ldg", "stg", "lds", "sts", "uniform", "other")

#: Issue rates per SM per clock, in thread-instructions (sm_90: 4 sub-partitions, each with a
#: scheduler issuing one warp instruction per clock, 32 FP32 lanes and 16 INT32 lanes; the
#: CUDA C++ Programming Guide's throughput table gives 64 results/clock/SM for 32-bit integer
#: add, shift, logic, compare and multiply-add at compute capability 9.0, 128 for FP32
#: add/multiply/FMA and 16 for conversions and special functions).
ISSUE_LANES = 128
INT_LANES = 64
FP32_LANES = 128
XU_LANES = 16


def wheel_tool(name: str) -> str | None:
    """Path of a CUDA tool shipped in the triton wheel, or None."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


def op_class(opcode: str) -> str:
    """Class of a SASS opcode (see the module doc); ``opcode`` may carry modifiers."""
    base = opcode.split(".")[0]
    if base in MMA_OPS:
        return "mma"
    if base.startswith("U") and base not in {"UTMALDG", "UTMASTG"}:
        return "uniform"
    for cls, ops in (("int", INT_OPS), ("fp32", FP32_OPS), ("xu", XU_OPS), ("ldg", LDG_OPS),
                     ("stg", STG_OPS), ("lds", LDS_OPS), ("sts", STS_OPS)):  # fmt: skip
        if base in ops:
            return cls
    return "other"


@dataclass
class Instr:
    """One SASS instruction: address, guard predicate, opcode (with modifiers), operands and
    the source frames it comes from (innermost first: ``(file, line)``)."""

    addr: int
    pred: str
    op: str
    args: str
    frames: tuple[tuple[str, int], ...] = ()

    @property
    def cls(self) -> str:
        return op_class(self.op)


_LINE = re.compile(
    r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*(.*?)\s*;"
)
_LABEL = re.compile(r"^(\.L_x_\d+):")
_FRAME = re.compile(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')


def disassemble(cubin: bytes) -> list[Instr]:
    """The instructions of a cubin (``nvdisasm -gi -c``), with their source frames."""
    tool = wheel_tool("nvdisasm")
    if tool is None:
        raise RuntimeError("no nvdisasm in the triton wheel (triton/backends/nvidia/bin)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-gi", "-c", f.name], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    return parse_sass(text)


def parse_sass(text: str) -> list[Instr]:
    """Parse ``nvdisasm -gi`` text. The line table prints, before an instruction whose
    location changed, one ``//## File`` line per frame: the innermost with the line it was
    inlined at, then that caller (and so on up to the kernel)."""
    out, frames, pending = [], (), []
    labels, pending_labels = {}, []
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending_labels.append(m[1])
            continue
        m = _FRAME.search(line)
        if m:
            pending.append((m[1], int(m[2])))
            continue
        m = _LINE.match(line)
        if not m:
            continue
        if pending:
            frames, pending = tuple(pending), []
        pred = (m[2] or "").strip()
        out.append(Instr(int(m[1], 16), pred, m[3], m[4], frames))
        for name in pending_labels:
            labels[name] = out[-1].addr
        pending_labels = []
    for ins in out:  # branch targets as addresses
        m = re.search(r"(\.L_x_\d+)", ins.args)
        if m and m[1] in labels:
            ins.args = ins.args.replace(m[1], f"{m[1]}=0x{labels[m[1]]:x}")
    return out


@dataclass
class Loop:
    """A loop of the disassembly: body ``[start, end]`` (the backward branch at ``end``)."""

    start: int
    end: int
    own: list[Instr] = field(default_factory=list)  # body minus nested loops
    body: list[Instr] = field(default_factory=list)
    parent: Loop | None = None
    children: list[Loop] = field(default_factory=list)
    func: str = "?"  # Python function of most of the own instructions
    call_line: int = 0  # kernel line the function is (inlined and) called from
    name: str = "?"  # the source loop (see assign_trips)
    trips: int = 1  # iterations per execution of the parent loop

    def counts(self, own: bool = True) -> Counter:
        return Counter(i.cls for i in (self.own if own else self.body))

    def mma_shapes(self, own: bool = True) -> Counter:
        return Counter(i.op for i in (self.own if own else self.body) if i.cls == "mma")


def find_loops(instrs: list[Instr]) -> list[Loop]:
    """Loops from backward branches, outermost first within address order, with their own
    instructions (body minus nested loops) and parent links."""
    by_addr = {i.addr: k for k, i in enumerate(instrs)}
    raw = []
    for k, ins in enumerate(instrs):
        if ins.op.split(".")[0] != "BRA":
            continue
        m = re.search(r"0x([0-9a-f]+)", ins.args)
        if not m:
            continue
        target = int(m[1], 16)
        if target < ins.addr and target in by_addr:
            raw.append((by_addr[target], k))
    loops = [Loop(instrs[a].addr, instrs[b].addr, body=instrs[a : b + 1]) for a, b in raw]
    loops.sort(key=lambda lp: (lp.start, -lp.end))
    for lp in loops:
        enclosing = [o for o in loops if o is not lp and o.start <= lp.start and lp.end <= o.end]
        if enclosing:
            lp.parent = min(enclosing, key=lambda o: o.end - o.start)
            lp.parent.children.append(lp)
    for lp in loops:
        inner = [(c.start, c.end) for c in lp.children]
        lp.own = [i for i in lp.body if not any(a <= i.addr <= b for a, b in inner)]
    return loops


@functools.cache
def _functions(path: str) -> list[tuple[int, int, str]]:
    """``(first line, last line, name)`` of every function defined in a Python file."""
    try:
        tree = ast.parse(open(path).read())
    except (OSError, SyntaxError):
        return []
    return [(n.lineno, n.end_lineno or n.lineno, n.name) for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef)]  # fmt: skip


def function_at(path: str, line: int) -> str:
    """Innermost function of ``path`` that contains ``line``."""
    best = None
    for lo, hi, name in _functions(path):
        if lo <= line <= hi and (best is None or hi - lo < best[1] - best[0]):
            best = (lo, hi, name)
    return best[2] if best else "?"


def name_loops(loops: list[Loop]) -> None:
    """Set each loop's ``func`` (innermost source function of most of its own non-uniform
    instructions) and ``call_line`` (the outermost frame's line)."""
    for lp in loops:
        funcs, calls = Counter(), Counter()
        for i in lp.own:
            if not i.frames or i.cls in ("uniform", "other"):
                continue
            funcs[function_at(*i.frames[0])] += 1
            calls[i.frames[-1][1]] += 1
        if funcs:
            lp.func = funcs.most_common(1)[0][0]
            lp.call_line = calls.most_common(1)[0][0]


@dataclass
class Profile:
    """Static instruction counts of one compiled kernel."""

    label: str
    num_warps: int
    regs: int
    shared: int
    instrs: list[Instr]
    loops: list[Loop]

    def outside(self) -> Counter:
        """Counts of the instructions in no loop (run once per program, branches aside)."""
        spans = [(lp.start, lp.end) for lp in self.loops]
        return Counter(i.cls for i in self.instrs if not any(a <= i.addr <= b for a, b in spans))

    def mma_loops(self) -> list[Loop]:
        """Innermost loops whose own instructions include a tensor-core instruction."""
        return [lp for lp in self.loops if lp.counts()["mma"]]


def _cubin_resources(cubin: bytes) -> int:
    tool = wheel_tool("cuobjdump")
    if tool is None:
        return 0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout  # fmt: skip
    m = re.search(r"REG:(\d+)", out)
    return int(m[1]) if m else 0


def compile_profile(fn, constexprs: dict, ptr_types: dict, ints: dict, options: dict,
                    label: str, arch: int = 90, dump: str | None = None) -> Profile:  # fmt: skip
    """Compile ``fn`` for ``cuda:arch`` (see :mod:`benchmarks.compile_check`) and profile its
    SASS. ``dump``: a folder to write ``<label>.sass`` into."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from benchmarks.compile_check import _attrs, _signature

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("SASS counting needs TRITON_INTERPRET unset")
    src = ASTSource(fn=fn, signature=_signature(fn, constexprs, ptr_types),
                    constexprs=constexprs, attrs=_attrs(fn, constexprs, ints))  # fmt: skip
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    cubin = compiled.asm["cubin"]
    instrs = disassemble(cubin)
    loops = find_loops(instrs)
    name_loops(loops)
    if dump:
        os.makedirs(dump, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
        with open(os.path.join(dump, safe + ".sass"), "w") as f:
            for i in instrs:
                f.write(f"{i.addr:05x} {i.pred:6s} {i.op} {i.args}  // {i.frames[:1]}\n")
    return Profile(label, int(options.get("num_warps", 4)), _cubin_resources(cubin),
                   int(compiled.metadata.shared), instrs, loops)  # fmt: skip


def _profile_job(args: tuple) -> Profile:
    kind, label, const, opts, ints, dump = args
    from benchmarks.compile_check import kernel_and_ptrs

    fn, ptrs = kernel_and_ptrs(kind, const)
    return compile_profile(fn, const, ptrs, ints, opts, label, dump=dump)


def profile_specs(specs: list[tuple], jobs: int = 1, dump: str | None = None) -> list[Profile]:
    """Profiles of ``(kind, label, constexprs, options, ints)`` specs (``kind``: "quant" for
    kernel A's K1, "branch" for its K2, "gemm" for kernel B), built in ``jobs`` processes
    (Triton caches the cubins)."""
    args = [(*s, dump) for s in specs]
    if jobs <= 1:
        return [_profile_job(a) for a in args]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_profile_job, args))


# --------------------------------------------------------------------------------------------
# Kernel B: the K loop
# --------------------------------------------------------------------------------------------
def mma_macs(op: str) -> int:
    """Multiply-adds of one MMA instruction, per warpgroup (``*GMMA``) or per warp (``*MMA``)."""
    m = re.search(r"\.(\d+)x(\d+)x(\d+)", op)
    if m:
        return int(m[1]) * int(m[2]) * int(m[3])
    m = re.search(r"\.(\d+)(\d)(\d{2})\b", op)  # e.g. IMMA.16832 = m16 n8 k32
    if m:
        return int(m[1]) * int(m[2]) * int(m[3])
    return 0


def loop_summary(lp: Loop, threads: int, codes_per_iter: int | None = None) -> dict:
    """Per-iteration counts of a loop (own instructions, per thread) and derived ratios:
    ``int_per_code`` (integer instructions per weight code a thread unpacks) and
    ``int_per_mma`` (per MMA instruction in the warp's stream)."""
    c = lp.counts()
    out = {cls: c[cls] for cls in CLASSES}
    out["total"] = sum(c.values())
    out["mma_ops"] = dict(lp.mma_shapes())
    if c["mma"]:
        out["int_per_mma"] = c["int"] / c["mma"]
    if codes_per_iter:
        per_thread = codes_per_iter / threads
        out["codes_per_thread"] = per_thread
        out["int_per_code"] = c["int"] / per_thread
    return out


#: Python functions of kernel B's K loops (``kernels/site_gemm.py``).
GEMM_LOOP_FUNCS = ("_path_acc", "_weight_tile", "_pieces4", "_pieces2", "_pieces3", "_bit3",
                   "_cat", "_act_k", "_load_bytes")  # fmt: skip


def unrolled_summary(prof: Profile, steps: int, threads: int, codes_per_iter: int) -> dict:
    """:func:`loop_summary` for K loops the compiler unrolled: every instruction whose source
    line is in one of :data:`GEMM_LOOP_FUNCS` (all paths' K steps, prologue and partial last
    steps included; Triton 3.6 records no inlining frames, so the paths cannot be told
    apart), divided by ``steps``, the K steps of all paths (per thread)."""
    own = [i for i in prof.instrs if i.frames and function_at(*i.frames[0]) in GEMM_LOOP_FUNCS]
    c = Counter(i.cls for i in own)
    out = {cls: c[cls] / steps for cls in CLASSES}
    out["total"] = sum(c.values()) / steps
    out["mma_ops"] = {k: v / steps for k, v in Counter(i.op for i in own if i.cls == "mma").items()}
    out["int_per_mma"] = c["int"] / max(c["mma"], 1)
    per_thread = codes_per_iter / threads
    out["codes_per_thread"] = per_thread
    out["int_per_code"] = c["int"] / steps / per_thread
    out["unrolled"] = True
    return out


def gemm_main_loop(prof: Profile) -> Loop:
    """Kernel B's main-path K loop: the MMA loop with the most instructions among those of
    ``_path_acc`` (the last path's loop when several have the same size)."""
    cands = [lp for lp in prof.mma_loops() if lp.func in (*GEMM_LOOP_FUNCS, "site_gemm_kernel")]
    cands = cands or prof.mma_loops()
    if not cands:
        raise RuntimeError(f"{prof.label}: no loop with a tensor-core instruction")
    return max(cands, key=lambda lp: (len(lp.own), lp.start))


def print_loops(prof: Profile) -> None:
    """Every loop of a profile, with its per-iteration counts (own instructions, per thread)."""
    threads = prof.num_warps * 32
    print(f"\n{prof.label}: {len(prof.instrs)} instructions, {prof.num_warps} warps, "
          f"{prof.regs} registers, {prof.shared} B shared")  # fmt: skip
    print("| loop (SASS addresses) | depth | source function (kernel line) | mma | int | fp32 "
          "| xu | ldg | stg | lds | sts | uniform | other | MMA instructions |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for lp in prof.loops:
        depth, p = 0, lp.parent
        while p is not None:
            depth, p = depth + 1, p.parent
        c = lp.counts()
        mm = ", ".join(f"{k} x{v}" for k, v in lp.mma_shapes().items()) or "-"
        print(f"| {lp.start:#06x}-{lp.end:#06x} | {depth} | {lp.func} ({lp.call_line}) | "
              + " | ".join(str(c[k]) for k in CLASSES) + f" | {mm} |")  # fmt: skip
    out = prof.outside()
    print("| outside loops | - | - | " + " | ".join(str(out[k]) for k in CLASSES) + " | - |")
    del threads


# --------------------------------------------------------------------------------------------
# Trip counts: which source loop each SASS loop is
# --------------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def expected_gemm_loops(const: dict) -> list[tuple[str, int]]:
    """Kernel B's loops in program order, ``(name, trips)``: one K loop per path (main path
    first) over its full ``BLOCK_K`` steps when there are at least two (a single step is
    straight-line code; the partial last step is outside the loop)."""
    out = []
    for name, k in (("K loop, main path", const["KM"]), ("K loop, vision path", const["KV"]),
                    ("K loop, text path", const["KT"])):  # fmt: skip
        t = k // const["BLOCK_K"] if k else 0
        if t >= 2:
            out.append((name, t))
    return out


def _path_loops(tag: str, plan: tuple, mac: bool) -> list[tuple[str, int]]:
    """Loops of one path of one token in K1 (``site_quant._path``): mode 3's first stage over
    slice steps, then the passes over column chunks (absmax, codes, MAC codes) when the final
    tile is not the whole token. Loops of one trip are straight-line."""
    k, mode, n0, sa, nch = plan[1], plan[2], plan[3], plan[13], plan[14]
    out = []
    if not k:
        return out
    if mode == 3 and _cdiv(n0, sa) >= 2:
        out.append((f"{tag}: first stage, slice steps", _cdiv(n0, sa)))
    if nch >= 2:
        out += [(f"{tag}: absmax pass", nch), (f"{tag}: codes pass", nch)]
        if mac:
            out.append((f"{tag}: MAC codes pass", nch))
    return out


def _branch_loops(const: dict, k_steps: int) -> list[tuple[str, int]]:
    """Loops of the branch down-projections (``site_quant._branch_pieces``): per branch, one K
    loop (runtime bounds: always a loop) per group of up to four rank pieces."""
    out = []
    for name, has, pieces in (("CWS", "HAS_CWS", "PIECES1"), ("MAC", "HAS_MAC", "PIECES2")):
        if const[has]:
            for grp in const[pieces]:
                ws = [w for w in grp[1::2] if w]
                out.append((f"{name} down, {'+'.join(map(str, ws))} ranks: K steps", k_steps))
    return out


def expected_quant_loops(const: dict, geo: dict) -> list[tuple[str, int]]:
    """Kernel A K1's loops in program order (pre-order for nests), ``(name, trips)``, for the
    busiest program of the launch geometry ``geo`` (``site_quant.site_quant_grid``): the loop
    over the blocks of its token range; the outlier paths on token tiles; the token loop with
    the per-token paths' loops nested; the branch down-projections (``BRANCH`` 1) or the
    zeroing loop of K2's accumulators (``BRANCH`` 2)."""
    t = min(geo["T"], geo["per_program"])
    out = [("blocks of the program", _cdiv(geo["per_program"], geo["T"]))]
    for tag, pl in (("vision", const["PV"]), ("text", const["PT"])):
        if pl[18] > 0:
            out.append((f"{tag} path, token tiles", _cdiv(t, pl[18])))
    out.append(("tokens of the block", t))
    for tag, pl, mac in (("vision", const["PV"], False), ("text", const["PT"], False),
                         ("main", const["PM"], const["HAS_MAC"])):  # fmt: skip
        if pl[18] == 0:
            out += _path_loops(f"{tag} path", pl, mac)
    if const["BRANCH"] == 1:
        out += _branch_loops(const, _cdiv(const["PM"][1], const["BK"]))
    elif const["BRANCH"] == 2:
        out.append(("zero K2 accumulators", t))
    return out


def expected_branch_loops(const: dict, geo: dict, n: int) -> list[tuple[str, int]]:
    """Kernel A K2's loops (``site_quant.site_branch_kernel``) for its ``k_split`` channels,
    then the epilogue's loop over the real rows of a 16-token tile (the last program's),
    ``EPI_ROWS`` at a time."""
    steps = _cdiv(min(n, 16), const["EPI_ROWS"])
    return _branch_loops(const, _cdiv(geo["k_split"], const["BK"])) + [("epilogue rows", steps)]


def assign_trips(prof: Profile, expected: list[tuple[str, int]]) -> list[str]:
    """Name each loop of ``prof`` and set its ``trips`` (per execution of its parent) from the
    expected loops, matched in program order. Returns warnings (empty when the numbers of
    loops agree)."""
    loops = [lp for lp in prof.loops]
    warn = []
    if len(loops) != len(expected):
        warn.append(f"{prof.label}: {len(loops)} SASS loops, {len(expected)} expected "
                    f"({[e[0] for e in expected]}); matched in order")  # fmt: skip
    for k, lp in enumerate(loops):
        name, trips = expected[k] if k < len(expected) else ("unmatched", 1)
        lp.name, lp.trips = name, trips
    return warn


def mma_unit(op: str) -> str:
    """Tensor-core data type of an MMA opcode: int8, tf32, bf16 (also fp16) or fp8."""
    if ".S8" in op or ".U8" in op or op.startswith("IMMA") or op.startswith("IGMMA"):
        return "int8"
    if "TF32" in op:
        return "tf32"
    if "E4M3" in op or "E5M2" in op:
        return "fp8"
    return "bf16"


def per_program(prof: Profile) -> dict:
    """Dynamic counts of one program (per thread = per warp): every loop's own instructions
    times its trips and its parents', plus the straight-line code once (both sides of a
    branch included: an upper bound). Also the tensor-core multiply-adds of the program by
    data type (a warpgroup MMA counted once per warpgroup)."""
    mult = {}
    for lp in prof.loops:  # parents precede children
        mult[id(lp)] = getattr(lp, "trips", 1) * (mult[id(lp.parent)] if lp.parent else 1)
    spans = [(lp.start, lp.end) for lp in prof.loops]
    counts, macs = Counter(), Counter()

    def add(instrs, m):
        for i in instrs:
            counts[i.cls] += m
            if i.cls == "mma":
                per = prof.num_warps / 4 if "GMMA" in i.op else prof.num_warps
                macs[mma_unit(i.op)] += m * mma_macs(i.op) * per / prof.num_warps

    add([i for i in prof.instrs if not any(a <= i.addr <= b for a, b in spans)], 1)
    for lp in prof.loops:
        add(lp.own, mult[id(lp)])
    # macs are per warp so far: scale to the program
    return {"counts": dict(counts), "macs": {k: v * prof.num_warps for k, v in macs.items()}}


# --------------------------------------------------------------------------------------------
# The site kernels of one decoder layer
# --------------------------------------------------------------------------------------------
def layer_specs(model: str, bits: str, tokens: list[int], sites=None,
                kernels: str = "AB") -> list[tuple]:  # fmt: skip
    """``(site, kernel, n_tokens, spec)`` for both kernels at every site of ``model``'s layer
    and every distinct GPU configuration among ``tokens`` (recipe defaults: outlier paths and
    branches at ``max(b, 4)`` bits). Kernel ``"A"`` is kernel A's K1, ``"A2"`` its K2 (the
    decode configuration's split-K branch launch), ``"B"`` kernel B."""
    from splitq_modifier.kernels import site_gemm_config, site_quant_config

    from benchmarks.compile_check import branch_spec, gemm_spec, quant_spec, real_site
    from splitq_modifier.widths import REAL_MODELS, site_widths

    wb, ab = int(bits[1]), int(bits[3])
    fw, fa = max(wb, 4), max(ab, 4)
    out = []
    for name in site_widths(REAL_MODELS[model]):
        if sites and name not in sites:
            continue
        site = real_site(model, name)
        seen_a, seen_b = {}, {}
        for n in tokens:
            cfg = site_quant_config(n, interpret=False)
            ka = tuple(sorted(cfg.items()))
            kb = tuple(sorted(site_gemm_config(n, interpret=False).items()))
            if ka not in seen_a and "A" in kernels:
                seen_a[ka] = n
                spec = quant_spec(f"{model}:{name}", site, n, (fa, fa, ab), (fw, fa, fw, fa))
                out.append((name, "A", n, spec))
                if cfg["BRANCH"] == 2:
                    spec = branch_spec(f"{model}:{name}", site, n, (fw, fa, fw, fa))
                    out.append((name, "A2", n, spec))
            if kb not in seen_b and "B" in kernels:
                seen_b[kb] = n
                spec = gemm_spec(f"{model}:{name}", site, n, (fw, fw, wb), (fw, fa, fw, fa))
                out.append((name, "B", n, spec))
    return out


def quant_geometry(site: dict, n: int) -> tuple[dict, dict]:
    """``(config, launch geometry)`` of kernel A at a real site for ``n`` tokens on 132 SMs
    (``site_quant.site_quant_config`` / ``site_quant_grid``)."""
    from splitq_modifier.kernels.site_quant import site_quant_config, site_quant_grid

    cfg = site_quant_config(n, interpret=False)
    return cfg, site_quant_grid(n, cfg, site["sizes"][2], 132)


def layer_profiles(model: str, bits: str, tokens: list[int], jobs: int = 2,
                   dump: str | None = None, sites=None,
                   kernels: str = "AB") -> list[dict]:  # fmt: skip
    """Compile and profile every kernel configuration of :func:`layer_specs`. Records
    (JSON-able: per-program dynamic counts, loop table, kernel B's main loop): kernel B one per
    configuration; kernel A one per token count (its loops' trips follow the launch geometry:
    tokens per block, blocks per program, K2's channels per program), with ``grid``."""
    import triton
    from splitq_modifier.kernels.site_quant import site_quant_config

    from benchmarks.compile_check import real_site

    entries = layer_specs(model, bits, tokens, sites, kernels)
    profs = profile_specs([(s[1], s[0], s[2], s[3], s[4]) for _, _, _, s in entries], jobs,
                          dump)  # fmt: skip
    records = []
    for (site, kern, n0, spec), prof in zip(entries, profs):
        const = spec[2]
        if kern == "B":
            runs = [(n0, expected_gemm_loops(const), None)]
        else:
            key = site_quant_config(n0, interpret=False)
            runs = []
            for n in tokens:
                cfg, geo = quant_geometry(real_site(model, site), n)
                if cfg != key:
                    continue
                if kern == "A":
                    runs.append((n, expected_quant_loops(const, geo), geo["G"]))
                else:
                    runs.append((n, expected_branch_loops(const, geo, n),
                                 geo["S"] * geo["tiles"]))  # fmt: skip
        for n, expected, grid in runs:
            warn = assign_trips(prof, expected)
            threads = prof.num_warps * 32
            loops = []
            for lp in prof.loops:
                row = loop_summary(lp, threads)
                row.update(name=lp.name, trips=lp.trips, func=lp.func,
                           span=f"{lp.start:#x}-{lp.end:#x}")  # fmt: skip
                loops.append(row)
            rec = {"site": site, "kernel": kern, "n_tokens": n, "label": prof.label,
                   "num_warps": prof.num_warps, "regs": prof.regs, "shared": prof.shared,
                   "triton": triton.__version__, "loops": loops, "warnings": warn,
                   "lanes": {"issue": ISSUE_LANES, "int": INT_LANES, "fp32": FP32_LANES,
                             "xu": XU_LANES},
                   **per_program(prof)}  # fmt: skip
            if kern == "B":
                main = [lp for lp in prof.loops if lp.name == "K loop, main path"]
                codes = const["BLOCK_O"] * const["BLOCK_K"]
                if main and main[0].counts()["mma"]:
                    rec["main_loop"] = loop_summary(main[0], threads, codes)
                else:  # unrolled by the compiler (Triton 3.6 does at some tiles)
                    steps = sum(_cdiv(const[k], const["BLOCK_K"]) for k in ("KV", "KT", "KM"))
                    rec["main_loop"] = unrolled_summary(prof, steps, threads, codes)
                rec["main_loop"]["bits"] = const["BITS_M"]
                rec["tile"] = [const["BLOCK_O"], const["BLOCK_T"], const["BLOCK_K"]]
            else:
                rec["grid"] = grid
                rec["tile"] = [const["BK"]]
            records.append(rec)
    return records


def print_layer(records: list[dict]) -> None:
    """Kernel B's main loop per configuration, then every loop of every kernel."""
    print("\nKernel B main-path K loop, per iteration and per thread (compiled sm_90 SASS, "
          f"Triton {records[0]['triton']}):")  # fmt: skip
    print("| site | tile O x T x K, warps | bits | MMA instructions | int | fp32 | ldg | lds "
          "| sts | all | int per MMA | codes per thread | **int per code** |")  # fmt: skip
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in records:
        m = r.get("main_loop")
        if not m:
            continue
        mm = ", ".join(f"{k} x{v:g}" for k, v in m["mma_ops"].items())
        if m.get("unrolled"):
            mm += " (unrolled K loop: per step, all steps averaged)"
        n = {k: f"{m[k]:.4g}" for k in ("int", "fp32", "ldg", "lds", "sts", "total")}
        print(f"| {r['site']} | {'x'.join(map(str, r['tile']))}, {r['num_warps']} | {m['bits']} "
              f"| {mm} | {n['int']} | {n['fp32']} | {n['ldg']} | {n['lds']} | {n['sts']} "
              f"| {n['total']} | {m['int_per_mma']:.1f} | {m['codes_per_thread']:.0f} "
              f"| **{m['int_per_code']:.2f}** |")  # fmt: skip
    for r in records:
        print(f"\n{r['label']} ({r['num_warps']} warps, {r['regs']} registers, {r['shared']} B "
              "shared): loops, own instructions per iteration and per thread")  # fmt: skip
        print("| loop | trips | mma | int | fp32 | xu | ldg | stg | lds | sts | all "
              "| MMA instructions |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for lp in r["loops"]:
            mm = ", ".join(f"{k} x{v}" for k, v in lp["mma_ops"].items()) or "-"
            print(f"| {lp['name']} | {lp['trips']} | "
                  + " | ".join(str(lp[k]) for k in ("mma", "int", "fp32", "xu", "ldg", "stg",
                                                     "lds", "sts", "total"))
                  + f" | {mm} |")  # fmt: skip
        c = r["counts"]
        print(
            f"per program: {sum(c.values())} instructions per thread ("
            + ", ".join(f"{k} {c.get(k, 0)}" for k in CLASSES if c.get(k))
            + "); "
            + ", ".join(f"{k} {v / 1e6:.2f}M MACs" for k, v in r["macs"].items())
            + ")"
        )
        for w in r["warnings"]:
            print("warning:", w)


def main(argv: list[str] | None = None) -> int:
    """Compile the site kernels of one model's decoder layer for sm_90 and print their loop
    counts (or write them as JSON for ``benchmarks/kernel.py``)."""
    import json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="Qwen2.5-VL-7B")
    ap.add_argument("--bits", default="W4A4", help="main-path bits, e.g. W4A4, W3A3")
    ap.add_argument(
        "--tokens",
        nargs="+",
        type=int,
        default=[1, 2048],
        help="token counts (one build per distinct GPU configuration)",
    )
    ap.add_argument("--sites", nargs="+", default=None, help="default: all four")
    ap.add_argument("--dump", default=None, help="folder for the .sass listings")
    ap.add_argument("--json", default=None, help="write the records here instead of tables")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--kernels", default="AB", help="A, B or AB (default)")
    args = ap.parse_args(argv)
    records = layer_profiles(args.model, args.bits, args.tokens, args.jobs, args.dump, args.sites,
                             args.kernels)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f)
    else:
        print_layer(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
