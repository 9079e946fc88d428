"""bench/kernel_budget.py: SASS parsing, the control-flow graph, loop finding and the weighting of blocks
by replayed decode decisions, on a small hand-written SASS listing (no cuobjdump needed); the replay
against the decode op; and, where nvdisasm/cuobjdump/nvcc are installed, the real report."""

import collections
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import kernel_budget as kb  # noqa: E402

import pvq_cuda  # noqa: E402

# A D=4 GEMV-like kernel. Outer loop .L_x_0 holds a barrier; the hot loop .L_x_1 decodes one group:
# a 4-node that either reads the leaf table (.L_x_3) or splits (guide walk .L_x_2, then the second
# child's N=2 code), then two FFMAs and the back edge. Line numbers follow SMAP below.
NVDISASM = """
.text._Z6kernelv:
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_0:
        /*0010*/                   MOV R1, RZ ;
.L_x_1:
	//## File "/src/gemv.cu", line 80
        /*0020*/                   LDG.E R2, desc[UR4][R4.64] ;
	//## File "/src/pyramid.h", line 12 inlined at "/src/packed_layer.h", line 104
	//## File "/src/packed_layer.h", line 104 inlined at "/src/gemv.cu", line 80
	//## File "/src/gemv.cu", line 80
        /*0030*/                   ISETP.GT.AND P0, PT, R2, 0x5, PT ;
        /*0040*/               @!P0 BRA `(.L_x_3) ;
	//## File "/src/pyramid.h", line 20 inlined at "/src/packed_layer.h", line 104
	//## File "/src/packed_layer.h", line 104 inlined at "/src/gemv.cu", line 80
	//## File "/src/gemv.cu", line 80
        /*0050*/                   IMAD R6, R2, 0x40, RZ ;
        /*0060*/                   IADD3 R7, R6, 0x1, RZ ;
.L_x_2:
	//## File "/src/pyramid.h", line 21 inlined at "/src/packed_layer.h", line 104
	//## File "/src/packed_layer.h", line 104 inlined at "/src/gemv.cu", line 80
	//## File "/src/gemv.cu", line 80
        /*0070*/                   LDG.E.64 R8, desc[UR4][R6.64] ;
        /*0080*/                   ISETP.GT.U32.AND P1, PT, R8, R2, PT ;
        /*0090*/               @!P1 BRA `(.L_x_2) ;
	//## File "/src/pyramid.h", line 22 inlined at "/src/packed_layer.h", line 104
	//## File "/src/packed_layer.h", line 104 inlined at "/src/gemv.cu", line 80
	//## File "/src/gemv.cu", line 80
        /*00a0*/                   IADD3 R9, R8, -R2, RZ ;
	//## File "/src/pyramid.h", line 30 inlined at "/src/pyramid.h", line 25
	//## File "/src/pyramid.h", line 25 inlined at "/src/packed_layer.h", line 104
	//## File "/src/packed_layer.h", line 104 inlined at "/src/gemv.cu", line 80
	//## File "/src/gemv.cu", line 80
        /*00b0*/                   IADD3 R10, R9, -0x2, RZ ;
        /*00c0*/                   LOP3.LUT R11, R10, 0x2, RZ, 0xc0, !PT ;
        /*00d0*/                   BRA `(.L_x_4) ;
.L_x_3:
	//## File "/src/pyramid.h", line 14 inlined at "/src/packed_layer.h", line 104
	//## File "/src/packed_layer.h", line 104 inlined at "/src/gemv.cu", line 80
	//## File "/src/gemv.cu", line 80
        /*00e0*/                   LDS R12, [R2] ;
        /*00f0*/                   PRMT R13, R12, 0x8880, RZ ;
.L_x_4:
	//## File "/src/gemv.cu", line 90
        /*0100*/                   FFMA R14, R13, R3, R14 ;
        /*0110*/                   FFMA R14, R11, R3, R14 ;
        /*0120*/                   ISETP.NE.AND P2, PT, R2, RZ, PT ;
        /*0130*/                @P2 BRA `(.L_x_1) ;
        /*0140*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0150*/                   FFMA R15, R14, R3, R15 ;
        /*0160*/                @P3 BRA `(.L_x_0) ;
        /*0170*/                   EXIT ;
.L_x_5:
        /*0180*/                   BRA `(.L_x_5);
"""

SMAP = kb.SourceMap(node_lines={10: "entry", 12: "n4_entry", 14: "leaf_hit", 20: "split", 21: "walk",
                                22: "split", 24: "child0", 25: "child1", 30: "n2_mid"},
                    node_range=(10, 40), invalid_lines={101})


def synthetic():
    funcs = kb.parse_sass(NVDISASM)
    instrs = funcs["_Z6kernelv"]
    return instrs, kb.build_cfg(instrs)


def test_parse_instructions_predicates_targets_and_inline_chains():
    instrs, _ = synthetic()
    assert len(instrs) == 25
    by_addr = {i.addr: i for i in instrs}
    assert by_addr[0x40].pred == "@!P0" and by_addr[0x40].op == "BRA" and by_addr[0x40].target == 0xE0
    assert by_addr[0x90].target == 0x70 and by_addr[0x130].target == 0x20 and by_addr[0x160].target == 0x10
    assert by_addr[0x70].op == "LDG.E.64" and by_addr[0x70].base == "LDG"
    # innermost frame first; the chain of 0xb0 has two pyramid.h frames (an N=2 node inside the N=4 node)
    assert by_addr[0xB0].chain == (("pyramid.h", 30), ("pyramid.h", 25), ("packed_layer.h", 104), ("gemv.cu", 80))
    assert by_addr[0x20].chain == (("gemv.cu", 80),)
    assert by_addr[0x0].chain == ()


def test_parse_cuobjdump_format_with_absolute_targets():
    text = """
		Function : _Z1fv
        /*0000*/                   ISETP.GE.AND P0, PT, R0, 0x1, PT ;   /* 0x0000000100007c0c */
                                                                        /* 0x000fda000bf06270 */
        /*0010*/              @!P0 BRA 0x30 ;                           /* 0x0000000000048947 */
                                                                        /* 0x000fea0003800000 */
        /*0020*/                   FFMA R1, R1, R1, R1 ;                /* 0x0000000101017223 */
                                                                        /* 0x000fe20000000001 */
        /*0030*/                   EXIT ;                               /* 0x000000000000794d */
                                                                        /* 0x000fea0003800000 */
"""
    instrs = kb.parse_sass(text)["_Z1fv"]
    assert [i.op for i in instrs] == ["ISETP.GE.AND", "BRA", "FFMA", "EXIT"]
    blocks = kb.build_cfg(instrs)
    assert [len(b.instrs) for b in blocks] == [2, 1, 1]
    assert blocks[0].succs == [2, 1] and blocks[1].succs == [2] and blocks[2].succs == []


def test_cfg_blocks_edges_and_loops():
    _, blocks = synthetic()
    starts = [b.instrs[0].addr for b in blocks]
    assert starts == [0x0, 0x10, 0x20, 0x50, 0x70, 0xA0, 0xE0, 0x100, 0x140, 0x170, 0x180]
    idx = {b.instrs[0].addr: b.index for b in blocks}
    assert sorted(blocks[idx[0x20]].succs) == sorted([idx[0xE0], idx[0x50]])  # guarded: taken + fall-through
    assert blocks[idx[0xA0]].succs == [idx[0x100]]  # unguarded BRA: no fall-through
    assert sorted(blocks[idx[0x70]].succs) == sorted([idx[0x70], idx[0xA0]])  # the walk loop
    assert blocks[idx[0x170]].succs == []  # EXIT
    loops = kb.natural_loops(blocks)
    assert loops[idx[0x70]] == {idx[0x70]}
    assert loops[idx[0x20]] == {idx[a] for a in (0x20, 0x50, 0x70, 0xA0, 0xE0, 0x100)}
    assert idx[0x140] in loops[idx[0x10]]  # the outer loop holds the barrier ...
    loop = kb.analyse_loop(blocks)
    assert loop.header == idx[0x20]  # ... so the hot loop is the inner one, although both hold FFMAs
    assert set(loop.inner) == {idx[0x70]}
    assert loop.instructions == 3 + 2 + 3 + 4 + 2 + 4
    assert (loop.shortest, loop.longest) == (3 + 2 + 4, 3 + 2 + 3 + 4 + 4)


def test_event_of_depth_and_helpers():
    assert kb.event_of((("pyramid.h", 30), ("pyramid.h", 25), ("packed_layer.h", 104)), SMAP, 4) == (1, "n2_mid")
    assert kb.event_of((("pyramid.h", 21), ("packed_layer.h", 104)), SMAP, 4) == (0, "walk")
    # a helper (outside decode_node's lines) inlined into line 22 takes line 22's event
    assert kb.event_of((("pyramid.h", 5), ("pyramid.h", 22), ("packed_layer.h", 104)), SMAP, 4) == (0, "split")
    # the child call line itself belongs to the parent's split
    assert kb.event_of((("pyramid.h", 25), ("packed_layer.h", 104)), SMAP, 4) == (0, "split")
    assert kb.event_of((("packed_layer.h", 101), ("gemv.cu", 80)), SMAP, 4) == (0, "invalid")
    assert kb.event_of((("gemv.cu", 80),), SMAP, 4) == (0, "group")
    # repeated frames (nvcc's chains) cannot push N=2 code below its depth
    deep = (("pyramid.h", 30), ("pyramid.h", 25), ("pyramid.h", 24), ("pyramid.h", 24), ("packed_layer.h", 104))
    assert kb.event_of(deep, SMAP, 4) == (1, "n2_mid")


def test_loop_cost_per_path_and_weighted():
    _, blocks = synthetic()
    loop = kb.analyse_loop(blocks)
    table, _ = kb.loop_cost(blocks, loop, SMAP, kb.scenario(4, "table"), 4)
    split, disagree = kb.loop_cost(blocks, loop, SMAP, kb.scenario(4, "split"), 4)
    assert table == 3 + 2 + 4  # header, leaf read, FMAs
    assert split == 3 + 2 + 3 + 4 + 4  # header, split, one walk compare, split tail + N=2, FMAs
    assert disagree == 0
    # Weighted: 25 % of groups hit the table; a split node walks 2.5 times on average.
    events = {(0, "n4_entry"): 1.0, (0, "leaf_hit"): 0.25, (0, "split"): 0.75, (0, "walk"): 0.75 * 2.5,
              (1, "n2_mid"): 0.75}
    cost, disagree = kb.loop_cost(blocks, loop, SMAP, events, 4)
    # block 0xa0 mixes a split line and N=2 lines, both at 0.75: they agree
    assert cost == pytest.approx(3 + 0.75 * 2 + 3 * 0.75 * 2.5 + 0.75 * 4 + 0.25 * 2 + 4)
    assert disagree == 0
    # A block runs as often as its most frequent line (code hoisted into it runs with it), and the
    # lines that run less often are reported: make the N=2 code rarer than the split around it.
    events[(1, "n2_mid")] = 0.5
    cost, disagree = kb.loop_cost(blocks, loop, SMAP, events, 4)
    assert disagree == pytest.approx(3 / loop.instructions)  # the three N=2 instructions of block 0xa0
    assert cost == pytest.approx(3 + 0.75 * 2 + 3 * 0.75 * 2.5 + 0.75 * 4 + 0.25 * 2 + 4)
    # The lower bracket: each block at the count of most of its instructions (3 of 4 at 0.5 here).
    mode, _ = kb.loop_cost(blocks, loop, SMAP, events, 4, rule="mode")
    assert mode == pytest.approx(cost - 0.25 * 4)
    by_source = kb.cost_by_source(blocks, loop, SMAP, events, 4)
    assert by_source[(1, "n2_mid")] == (3, pytest.approx(3 * 0.75))
    assert by_source[(0, "walk")] == (3, pytest.approx(3 * 0.75 * 2.5))
    assert sum(e for _, e in by_source.values()) == pytest.approx(cost)


@pytest.mark.parametrize("D,K,leaf_k,staged", [(16, 30, 5, False), (16, 30, -1, False), (8, 16, 16, False),
                                               (4, 7, 7, False), (4, 7, 6, False), (2, 5, -1, False),
                                               (16, 30, -1, True), (8, 16, -1, True), (32, 20, -1, True),
                                               (4, 7, -1, True), (2, 5, -1, True), (1, 9, -1, True)])
def test_replay_matches_the_decode_op(D, K, leaf_k, staged):
    t = kb.Tables(D, K)
    V = t.V[D][K]
    g = torch.Generator().manual_seed(D * 100 + K)
    index = (torch.rand(400, generator=g, dtype=torch.float64) * V).to(torch.int64).clamp_max(V - 1)
    index[:4] = torch.tensor([0, 1, V - 2, V - 1])
    expected = pvq_cuda.decode(index, D, K).to(torch.int64)
    events = collections.Counter()
    got = torch.tensor([kb.replay_group(t, int(i), K, D, leaf_k, events, staged) for i in index.tolist()])
    assert torch.equal(got, expected)
    if staged:  # one pair-table read per 2-leaf, no leaf table, no N=2 cases
        assert sum(v for (p, e), v in events.items() if e == "pair") == len(index) * (D // 2)
        assert not any(e.startswith("n2_") or e in ("leaf_hit", "n4_entry") for _, e in events)
    elif D >= 4:  # every 4-node either hits the table or splits, and hits only at k <= leaf_k
        fours = sum(v for (p, e), v in events.items() if e == "n4_entry")
        assert fours == len(index) * D // 4
        hits = sum(v for (p, e), v in events.items() if e == "leaf_hit")
        if D == 4:  # the 4-node is the top node, with K pulses
            assert hits == (len(index) if K <= leaf_k else 0)
        else:
            assert (hits == 0) == (leaf_k < 0)
        assert sum(v for (p, e), v in events.items() if e == "split") == \
            len(index) * (D // 4 - 1) + fours - hits
        # each split node compares at least once in its walk
        assert sum(v for (p, e), v in events.items() if e == "walk") >= \
            sum(v for (p, e), v in events.items() if e == "split")


def test_count_events_warp_is_the_slowest_lane():
    D, K = 4, 7
    t = kb.Tables(D, K)
    # one tile of 2 lanes x 1 column: lane 0 has k=7 at the 4-node (split with leaf_k=3), lane 1 too
    ev = kb.count_events([[[0], [t.V[4][K] - 1]]], K, D, leaf_max_k=3)
    assert ev.groups == 2 and ev.chunks == 1 and ev.hit_rate == 0.0
    # per lane: the mean; per warp: the larger of the two lanes
    walks = [collections.Counter() for _ in range(2)]
    for lane, i in enumerate([0, t.V[4][K] - 1]):
        kb.replay_group(t, i, K, D, 3, walks[lane])
    assert ev.lane[0, "walk"] == pytest.approx((walks[0]["", "walk"] + walks[1]["", "walk"]) / 2)
    assert ev.warp[0, "walk"] == max(walks[0]["", "walk"], walks[1]["", "walk"])


@pytest.mark.parametrize("staged", [False, True])
def test_source_map_matches_the_real_decoder(staged):
    decoder = kb.DECODERS[staged]
    smap = kb.source_map(decoder)
    assert sorted(set(smap.node_lines.values())) == sorted({e for _, e in decoder.lines})
    assert len(smap.invalid_lines) == (0 if staged else 2)
    # A decoder edited without the replay makes the script stop.
    walk = next(text for text, event in decoder.lines if event == "walk")
    changed = (REPO / decoder.node_file).read_text().replace(walk, walk.replace("++k1", "k1 += 1"))
    assert changed != (REPO / decoder.node_file).read_text()
    with pytest.raises(ValueError, match="does not match the replay"):
        kb.source_map(decoder, changed)


def _tools_missing() -> str | None:
    for name in ("nvdisasm", "cuobjdump"):
        if kb.tool(name) is None:
            return f"{name} not installed (pip install nvidia-cuda-{name if name == 'cuobjdump' else 'nvdisasm'})"
    if shutil.which("nvcc") is None and kb.tool("nvcc") is None:
        return "no nvcc"
    if not pvq_cuda.cuda_built():
        return "pvq_cuda built without CUDA kernels"
    return None


@pytest.mark.skipif(_tools_missing() is not None, reason=str(_tools_missing()))
def test_real_report_runs(tmp_path):
    out = tmp_path / "budget.md"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "kernel_budget.py"), "--out", str(out),
                           "--blocks", "0", "--projections", "self_attn.k_proj"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "gemv_kernel<16, 1, __half, true>" in text and "gemv_kernel<16, 16, __half, true>" in text
    assert "dequantize_kernel<16, __half>" in text
    assert "instructions per weight per warp" in proc.stdout


# A staged dequantization loop: two columns' STS.128, a __syncwarp (BRA.DIV + its WARPSYNC fallback),
# the 16-byte row stores and an element-by-element tail loop; the 64-bit divide CALL is before the loop.
DEQUANT_SASS = """
.text._Z4deqv:
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0020*/                   CALL.REL.NOINC `(.L_x_9) ;
.L_x_0:
        /*0030*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0040*/                   STS.128 [R3], R4 ;
        /*0050*/                   STS.128 [R3+0x10], R8 ;
        /*0060*/                   BRA.DIV UR7, `(.L_x_8) ;
        /*0070*/                   NOP ;
.L_x_1:
        /*0080*/               @P2 BRA `(.L_x_2) ;
        /*0090*/                   LDS.128 R8, [R60] ;
        /*00a0*/                   LDS.128 R12, [R59] ;
        /*00b0*/               @!P0 STG.E.128 desc[UR12][R22.64], R8 ;
        /*00c0*/               @!P1 STG.E.128 desc[UR12][R20.64], R12 ;
        /*00d0*/                   BRA `(.L_x_3) ;
.L_x_2:
        /*00e0*/                   LDS.U16 R21, [R21] ;
        /*00f0*/                   STG.E.U16 desc[UR12][R14.64], R21 ;
        /*0100*/               @!P3 BRA `(.L_x_2) ;
.L_x_3:
        /*0110*/               @P4 BRA `(.L_x_0) ;
        /*0120*/                   EXIT ;
.L_x_8:
        /*0130*/                   WARPSYNC.COLLECTIVE R15, `(.L_x_1) ;
        /*0140*/                   BRA `(.L_x_1) ;
.L_x_9:
        /*0150*/                   RET.REL.NODEC R20 `(_Z4deqv) ;
"""


def test_dequant_stores_of_a_staged_loop_and_the_old_vs_new_table():
    instrs = kb.parse_sass(DEQUANT_SASS)["_Z4deqv"]
    s = kb.dequant_stores("dequantize_kernel<8, __half>", instrs)
    assert s["staged"] and (s["sts"], s["lds128"]) == (2, 2) and s["calls"] == 0
    # Two 16-byte stores a lane an item: a 32-byte row segment, 2 groups of 16 B; 512 B in 16 sectors.
    assert (s["segment"], s["columns"], s["per_instr"], s["sectors"], s["useful"]) == (32, 2, 512, 16, 32)
    assert s["tail"] == {2: 1}
    table = kb.dequant_table([s])
    assert "| `dequantize_kernel<8, __half>` | 16 | 32 B (2) | 2 / 2 | 2 x 16 B | 512 | 16 | 32 of 32 (100 %) " \
           "| 1 x 2 B | 0 |" in table
    old = "\n".join(["## Tile dequantization: store efficiency", "",
                     "| kernel | bytes a lane stores per group | store instructions per group (width) | bytes per warp "
                     "store instruction | sectors per warp store | useful bytes per 32-B sector | 64-bit divide calls "
                     "in the loop |", "|---|---|---|---|---|---|---|",
                     "| `dequantize_kernel<8, __half>` | 16 | 8 (8 x 2 B) | 64 | 32 | 2 of 32 (6 %) | 1 |", "",
                     "## How to read and rerun", "| `dequantize_kernel<8, __half>` | x |"])
    got = kb.dequant_compare(old, [s], "old.md")
    assert got[-1] == "| `dequantize_kernel<8, __half>` | 64 -> 512 | 32 -> 16 | 2 of 32 (6 %) -> 32 of 32 (100 %) " \
                      "| 1 -> 0 |"


def test_before_section_keeps_the_old_figures():
    old = "\n".join(["# Decode-GEMV instruction budget (old, 2026-12-01)", "intro", "## Instructions per weight (x)",
                     "| 1 | 63.6 |", "### Where they go", "| a | b |", "## Branch frequencies on the real codes",
                     "| 23.1 % |", "## Resources, occupancy, bytes in flight", "| 56 regs |",
                     "## Predicted fraction of the bandwidth bound", "| 6 % |", "Targets (issue 14): ...",
                     "## Tile dequantization", "| stores |"])
    got = kb.before_section(old, "old.md")
    assert got[1] == "## Before: Decode-GEMV instruction budget (old, 2026-12-01) (old.md)"
    text = "\n".join(got)
    assert "### Instructions per weight (x)" in text and "#### Where they go" in text and "| 63.6 |" in text
    assert "| 23.1 % |" in text and "| 6 % |" in text
    assert "56 regs" not in text and "stores" not in text and "Targets" not in text


def test_compare_section_pairs_old_and_new_figures():
    def report(warp, regs):
        return "\n".join(["# t", "## Instructions per weight (x)", "| batch | kernel | a | b | c | d | e | f | g |",
                          f"| 1 | `k` | 950 | 6.9 / 55.5 | 27.3 | 55.5 | +0.65 | 48.0 | **{warp}** |",
                          "## Resources, occupancy, bytes in flight", f"| 1 | {regs} | 0/0 | 792 |"])
    old, new = report("63.6", 56), report("57.5", 48)
    assert kb.headline(old) == {1: dict(static="950", table="27.3", split="55.5", lane="48.0", warp="63.6",
                                        regs="56", spills="0/0")}
    rows = [l for l in kb.compare_section(old, new, "old.md") if l.startswith("| 1 |")]
    assert rows == ["| 1 | 63.6 -> 57.5 | 48.0 -> 48.0 | 27.3 -> 27.3 | 55.5 -> 55.5 | 950 -> 950 | 56 -> 48 |"]


def test_target_gap_says_by_how_much_and_where():
    rows = [dict(M=1, warp=16 * 12.0, bysrc={(0, "group"): (10, 16 * 4.0), (1, "split"): (5, 16 * 8.0)}),
            dict(M=16, warp=16 * 11.0, bysrc={(0, "group"): (10, 16 * 11.0)})]
    text = "\n".join(kb.target_gap(rows, 16, 30))
    assert "Batch 1: 12.0 against <= 6, missed by 2.0x. Decoding the pulses takes 8.0 per weight (7 split nodes" in text
    assert "the rest, 4.0, is per-group work" in text
    assert "Batch 16: 11.0 against <= 12, met." in text
    assert "2,262 KB" in text  # the 4-leaf words of every k <= 30
