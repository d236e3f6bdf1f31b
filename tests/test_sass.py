"""The SASS reader of ``benchmarks/sass.py`` on a hand-written ``nvdisasm -gi`` listing: loops
from backward branches (labels resolved), nesting, own instructions, classes, MMA sizes and the
per-program dynamic counts the hardware model uses."""

from __future__ import annotations

from benchmarks import sass

LISTING = """\
        .text.k:
        //## File "/x/k.py", line 10
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        //## File "/x/k.py", line 20 inlined at "/x/k.py", line 12
        //## File "/x/k.py", line 12
        /*0010*/                   LOP3.LUT R2, R3, 0xf0f0f0f, RZ, 0xc0, !PT ;
        /*0020*/                   SHF.R.U32.HI R4, RZ, 0x4, R3 ;
.L_x_1:
        /*0030*/                   IGMMA.64x64x32.S8.S8 R24, R56, gdesc[UR4], R24 ;
        /*0040*/                   FFMA R5, R5, R6, R7 ;
        /*0050*/               @P0 BRA `(.L_x_1) ;
        /*0060*/                   LDS.U16 R8, [R9] ;
        /*0070*/                   UIADD3 UR4, UR4, 0x1, URZ ;
        /*0080*/              @!P1 BRA `(.L_x_0) ;
        /*0090*/                   IMMA.16832.S8.S8.SAT R10, R12, R14, R10 ;
        /*00a0*/                   EXIT ;
.L_x_2:
        /*00b0*/                   BRA `(.L_x_2) ;
"""


def test_loops_classes_and_dynamic_counts() -> None:
    instrs = sass.parse_sass(LISTING)
    assert [i.addr for i in instrs] == list(range(0, 0xC0, 0x10))
    assert instrs[1].frames == (("/x/k.py", 20), ("/x/k.py", 12))
    loops = sass.find_loops(instrs)  # the self-branch at 0xb0 is not a loop
    assert [(lp.start, lp.end) for lp in loops] == [(0x10, 0x80), (0x30, 0x50)]
    outer, inner = loops
    assert inner.parent is outer and outer.children == [inner]
    assert [i.op for i in outer.own] == ["LOP3.LUT", "SHF.R.U32.HI", "LDS.U16", "UIADD3",
                                         "BRA"]  # fmt: skip
    assert outer.counts() == {"int": 2, "lds": 1, "uniform": 1, "other": 1}
    assert inner.counts() == {"mma": 1, "fp32": 1, "other": 1}
    assert sass.mma_macs("IGMMA.64x64x32.S8.S8") == 64 * 64 * 32
    assert sass.mma_macs("IMMA.16832.S8.S8.SAT") == 16 * 8 * 32
    assert sass.mma_unit("HGMMA.64x32x8.F32.TF32") == "tf32"

    prof = sass.Profile("k", 8, 0, 0, instrs, loops)
    outer.trips, inner.trips = 3, 5
    dyn = sass.per_program(prof)
    # straight line: MOV, IMMA, EXIT, BRA; outer own x3; inner own x15
    assert dyn["counts"]["int"] == 1 + 2 * 3
    assert dyn["counts"]["mma"] == 1 + 15
    # IGMMA: once per warpgroup (2 of them at 8 warps); IMMA: once per warp
    assert dyn["macs"]["int8"] == 15 * 2 * 64 * 64 * 32 + 8 * 16 * 8 * 32
    summary = sass.loop_summary(outer, 256, codes_per_iter=128 * 128)
    assert summary["int_per_code"] == 2 / 64
