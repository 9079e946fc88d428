"""Instructions per weight of the decode-GEMV, without a GPU: the sm_90a SASS's hot loop, counted per
group along its control-flow graph and weighted by how often the real codes of the default model take
each data-dependent branch; plus registers, occupancy, bytes in flight and the predicted fraction of
the H100/H200 bandwidth bound (issue 14, item 2), and the tile dequantization's store efficiency.

What is measured and what is modelled:
- *Static, exact*: the SASS (nvdisasm of a `-lineinfo` cubin built with the Release flags; the script
  checks that its instruction stream equals `cuobjdump -sass` of the cubin built without `-lineinfo`),
  its basic blocks, branches and loops, and the instructions of each block.
- *Counted on real codes*: how often each decode decision happens (leaf table hit or 2+2 fallback,
  guide-walk steps, the N=2 cases), by replaying decode_node's rules (codec/pyramid.h) in Python on
  the codes of data-free pvq-3.25 quantized layers of the default model; the replay's pulses are
  checked against the CPU decode op. Each SASS block gets the count of the source lines it holds
  (line info with the inlining chain names the tree node), per lane (no divergence) and per warp
  (a block runs if any of its 32 lanes needs it; a loop runs as often as its slowest lane).
- *Modelled*: the throughput bounds (issue slots, HBM bandwidth, latency covered by bytes in flight).

Usage: python bench/kernel_budget.py [--out bench/results/kernel-budget-<date>.md] [--blocks 0,15]
       [--projections self_attn.q_proj,...] [--label TEXT] [--before OLD_REPORT.md --note TEXT]
(--before puts an earlier report's figures beside this one's: an old-vs-new table and its tables.)
Needs nvcc (as bench/kernel_static.py), nvdisasm and cuobjdump (PATH, $CUDA_HOME/bin, or the pip
wheels nvidia-cuda-nvdisasm / nvidia-cuda-cuobjdump), and the built pvq_cuda for the real codes.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# ----- SASS parsing ---------------------------------------------------------------------------------

_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
_LABEL = re.compile(r"^\s*(\.L\w+):")
_FUNC = re.compile(r"^\s*(?:Function : (\S+)|\.text\.(\S+):)")
_TARGET = re.compile(r"`\((\.L\w+)\)|\b0x([0-9a-f]+)\b")


@dataclass
class Instr:
    addr: int
    pred: str             # "" or the guard ("@P0", "@!UP1")
    op: str               # opcode with modifiers, e.g. "LDG.E.64"
    operands: str
    chain: tuple = ()     # ((file basename, line), ...) innermost first: the inlining chain
    target: object = None  # branch target: a label name or an address

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


def parse_sass(text: str) -> dict[str, list[Instr]]:
    """Functions of a `cuobjdump -sass` or `nvdisasm [-g|-gi]` listing -> their instructions.

    Line-info comments (nvdisasm -g/-gi) give each following instruction its source chain; a
    `//## File` line that is not `inlined at` ends a chain (the outermost frame)."""
    funcs: dict[str, list[Instr]] = {}
    labels: dict[str, dict[str, int]] = {}
    current, chain, building, chain_open = None, (), [], False
    for raw in text.splitlines():
        if m := _FUNC.match(raw):
            current = m.group(1) or m.group(2)
            funcs[current], labels[current], chain, building = [], {}, (), []
            continue
        if current is None:
            continue
        if m := _LINE.search(raw):
            if not chain_open:
                building = []
            building.append((os.path.basename(m.group(1)), int(m.group(2))))
            chain, chain_open = tuple(building), m.group(3) is not None
            continue
        if m := _LABEL.match(raw):
            labels[current][m.group(1)] = -1  # resolved to the next instruction's address
            continue
        if m := _INSTR.match(raw):
            addr = int(m.group(1), 16)
            for name, a in labels[current].items():
                if a == -1:
                    labels[current][name] = addr
            ins = Instr(addr, (m.group(2) or "").strip(), m.group(3), m.group(4).strip(), chain)
            if ins.base in ("BRA", "CALL", "BSSY", "SSY", "BRX", "JMP", "JMX"):
                if t := _TARGET.search(ins.operands):
                    ins.target = t.group(1) or int(t.group(2), 16)
            funcs[current].append(ins)
    for name, instrs in funcs.items():
        for ins in instrs:
            if isinstance(ins.target, str):
                ins.target = labels[name].get(ins.target)
    return funcs


# ----- Control-flow graph ------------------------------------------------------------------------------

@dataclass
class Block:
    index: int
    instrs: list
    succs: list = field(default_factory=list)
    preds: list = field(default_factory=list)


def build_cfg(instrs: list[Instr]) -> list[Block]:
    """Basic blocks and edges. BRA: taken (+ fall-through when guarded); EXIT/RET end a path unless
    guarded; CALL falls through (the callee, e.g. a 64-bit division routine, is a separate
    subroutine at the end of the function and is not part of any loop here)."""
    if not instrs:
        return []
    at = {ins.addr: i for i, ins in enumerate(instrs)}
    leaders = {0}
    for i, ins in enumerate(instrs):
        if ins.base in ("BRA", "EXIT", "RET", "BRX", "JMP", "JMX") and i + 1 < len(instrs):
            leaders.add(i + 1)
        if ins.base == "BRA" and ins.target in at:
            leaders.add(at[ins.target])
    starts = sorted(leaders)
    blocks, block_of = [], {}
    for b, s in enumerate(starts):
        e = starts[b + 1] if b + 1 < len(starts) else len(instrs)
        blocks.append(Block(b, instrs[s:e]))
        block_of[s] = b
    for b, blk in enumerate(blocks):
        last = blk.instrs[-1]
        nxt = b + 1 if b + 1 < len(blocks) else None
        if last.base == "BRA":
            if last.target in at:
                blk.succs.append(block_of[at[last.target]])
            if last.pred and nxt is not None:
                blk.succs.append(nxt)
        elif last.base in ("EXIT", "RET", "BRX", "JMP", "JMX"):
            if last.pred and nxt is not None:
                blk.succs.append(nxt)
        elif nxt is not None:
            blk.succs.append(nxt)
        blk.succs = list(dict.fromkeys(blk.succs))
        for s in blk.succs:
            blocks[s].preds.append(b)
    return blocks


def dominators(blocks: list[Block]) -> list[set]:
    reachable, stack = {0}, [0]
    while stack:
        for s in blocks[stack.pop()].succs:
            if s not in reachable:
                reachable.add(s)
                stack.append(s)
    dom = [set(reachable) if b in reachable else set() for b in range(len(blocks))]
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for b in sorted(reachable - {0}):
            preds = [dom[p] for p in blocks[b].preds if p in reachable]
            new = set.intersection(*preds) | {b} if preds else {b}
            if new != dom[b]:
                dom[b], changed = new, True
    return dom


def natural_loops(blocks: list[Block]) -> dict[int, set]:
    """Loop header -> body (blocks), merging the back edges that share a header."""
    dom = dominators(blocks)
    loops: dict[int, set] = {}
    for b, blk in enumerate(blocks):
        for h in blk.succs:
            if h in dom[b]:  # b -> h is a back edge
                body, stack = {h, b}, ([b] if b != h else [])
                while stack:
                    for p in blocks[stack.pop()].preds:
                        if p not in body:
                            body.add(p)
                            stack.append(p)
                loops.setdefault(h, set()).update(body)
    return loops


def hot_loop(blocks: list[Block], loops: dict[int, set], marker: str = "FFMA") -> tuple[int, set]:
    """The per-group loop: of the loops without a barrier, the one with the most `marker`
    instructions (FFMA: the GEMV's dot products; STG: the dequantization's stores), the smallest
    such loop on a tie (the GEMV's item loop around it also holds a barrier)."""
    def count(body, base):
        return sum(ins.base == base for b in body for ins in blocks[b].instrs)
    candidates = [(h, body) for h, body in loops.items() if count(body, "BAR") == 0 and count(body, marker) > 0]
    if not candidates:
        raise ValueError(f"kernel_budget: no loop with {marker} and without a barrier in this function")
    return max(candidates, key=lambda hb: (count(hb[1], marker), -len(hb[1])))


@dataclass
class LoopReport:
    header: int
    blocks: list          # block indices of the hot loop
    inner: dict           # inner loop header -> body (inside the hot loop)
    instructions: int     # static instructions in the hot loop
    shortest: int         # fewest instructions from the header back to it (inner loops once)
    longest: int          # most instructions from the header back to it (inner loops once)


def analyse_loop(blocks: list[Block], marker: str = "FFMA") -> LoopReport:
    loops = natural_loops(blocks)
    header, body = hot_loop(blocks, loops, marker)
    inner = {h: b for h, b in loops.items() if h != header and b < body}
    # Acyclic view of one iteration: drop the hot loop's and the inner loops' back edges.
    back = {(b, h) for h, lb in list(inner.items()) + [(header, body)] for b in lb if h in blocks[b].succs}
    order, seen = [], set()

    def visit(b):  # post-order DFS over forward edges, iterative
        stack = [(b, iter(blocks[b].succs))]
        seen.add(b)
        while stack:
            node, it = stack[-1]
            for s in it:
                if s in body and (node, s) not in back and s not in seen:
                    seen.add(s)
                    stack.append((s, iter(blocks[s].succs)))
                    break
            else:
                order.append(node)
                stack.pop()
    visit(header)
    order.reverse()
    size = {b: len(blocks[b].instrs) for b in body}
    lo, hi = {header: size[header]}, {header: size[header]}
    for b in order:
        if b == header:
            continue
        preds = [p for p in blocks[b].preds if p in lo and (p, b) not in back]
        if preds:
            lo[b] = min(lo[p] for p in preds) + size[b]
            hi[b] = max(hi[p] for p in preds) + size[b]
    latches = [b for b in body if header in blocks[b].succs and b in lo]
    return LoopReport(header, sorted(body), inner, sum(size.values()),
                      min(lo[b] for b in latches), max(hi[b] for b in latches))


# ----- Source lines -> decode events --------------------------------------------------------------------

# decode_node's statements in source order (comments, blank and brace-only lines skipped), each with
# the event that runs it. The list must match codec/pyramid.h line for line: a change to the decoder
# makes this script stop instead of silently weighting the wrong blocks.
DECODE_NODE_LINES = [
    ("PVQ_HD void decode_node(", "entry"),
    ("if constexpr (N == 1) {", "entry"),
    ("y[0] = int8_t(k == 0 ? 0 : (i ? -k : k));", "n1"),
    ("} else if constexpr (N == 2) {", "n2_entry"),
    ("if (k == 0) {", "n2_entry"),
    ("y[0] = 0;", "n2_k0"),
    ("y[1] = 0;", "n2_k0"),
    ("} else if (i < 2) {", "n2_nz"),
    ("y[0] = 0;", "n2_lt2"),
    ("y[1] = int8_t(i ? -k : k);", "n2_lt2"),
    ("} else if (i >= I(4 * k - 2)) {", "n2_ge"),
    ("y[0] = int8_t(i > I(4 * k - 2) ? -k : k);", "n2_hi"),
    ("y[1] = 0;", "n2_hi"),
    ("} else {", "n2_mid"),
    ("const uint32_t u = uint32_t(i) - 2u;", "n2_mid"),
    ("const int k1 = 1 + int(u >> 2), k2 = k - k1;", "n2_mid"),
    ("y[0] = int8_t(u & 2u ? -k1 : k1);", "n2_mid"),
    ("y[1] = int8_t(u & 1u ? -k2 : k2);", "n2_mid"),
    ("} else {", "entry"),
    ("if (N == 4 && k <= t.leaf_max_k) {", "n4_entry"),
    ("const uint32_t w = t.leaf[t.leaf_base[k] + uint32_t(i)];", "leaf_hit"),
    ("y[0] = int8_t(w);", "leaf_hit"),
    ("y[1] = int8_t(w >> 8);", "leaf_hit"),
    ("y[2] = int8_t(w >> 16);", "leaf_hit"),
    ("y[3] = int8_t(w >> 24);", "leaf_hit"),
    ("return;", "leaf_hit"),
    ("constexpr int L = Log2<N>::value, H = N / 2;", "split"),
    ("using Child = std::conditional_t<(H <= 4), uint32_t, I>;", "split"),
    ("const int node = (L - 1) * (kMaxK + 1) + k;", "split"),
    ("const uint64_t* off = t.offset + (L - 1) * kOffsetsPerLevel + tri(k);", "split"),
    ("int k1 = t.guide[node * (1 << kGuideBits) + int(i >> t.guide_shift[node])];", "split"),
    ("while (I(off[k1 + 1]) <= i) ++k1;", "walk"),
    ("const int k2 = k - k1;", "split"),
    ("const I r = i - I(off[k1]);", "split"),
    ("const int child = (L - 1) * (kMaxK + 1) + k2;", "split"),
    ("Child i1, i2;", "split"),
    ("if constexpr (N <= 4) {", "split"),
    ("const uint32_t r32 = uint32_t(r);", "split"),
    ("i1 = divide32(r32, t.magic[child], t.magic_log[child]);", "split"),
    ("i2 = r32 - i1 * uint32_t(count_at(t, L - 1, k2));", "split"),
    ("} else {", "split"),
    ("const uint64_t q = divide(r, t.magic[child], t.magic_log[child]);", "split"),
    ("i1 = Child(q);", "split"),
    ("i2 = Child(r - q * count_at(t, L - 1, k2));", "split"),
    ("decode_node<H, Child>(t, i1, k1, y);", "child0"),
    ("decode_node<H, Child>(t, i2, k2, y + H);", "child1"),
]
# decode_group (packed/packed_layer.h): the corrupt-index path; every other line runs once a group.
DECODE_GROUP_INVALID = ("for (int j = 0; j < D; ++j) y[j] = 0;", "return 0.f;")

# staged_node (packed/staged_decode.cuh), the GEMV's staged decoder, in the same form. Its 2-leaves are
# one read of the pair table ("pair"); it has no leaf table and no corrupt-index branch.
STAGED_NODE_LINES = [
    ("__device__ __forceinline__ void staged_node(", "entry"),
    ("if constexpr (N == 1) {", "entry"),
    ("y[0] = float(k == 0 ? 0 : (i ? -k : k));", "n1"),
    ("} else if constexpr (N == 2) {", "pair"),
    ("const float2 v = reinterpret_cast<const float2*>(smem + s.pairs)[pair_base(k) + int(i)];", "pair"),
    ("y[0] = v.x;", "pair"),
    ("y[1] = v.y;", "pair"),
    ("} else {", "entry"),
    ("constexpr int L = pvq::Log2<N>::value, H = N / 2;", "split"),
    ("using Child = std::conditional_t<(H <= 8), uint32_t, I>;", "split"),
    ("const I* off = reinterpret_cast<const I*>(smem + s.offsets[L]) + pvq::tri(k);", "split"),
    ("int k1 = (smem + s.guide[L])[(k << pvq::kGuideBits) + int(i >> (smem + s.shift[L])[k])];", "split"),
    ("while (off[k1 + 1] <= i) ++k1;", "walk"),
    ("const int k2 = k - k1;", "split"),
    ("const I r = i - off[k1];", "split"),
    ("Child i1, i2;", "split"),
    ("if constexpr (N == 4) {", "split"),
    ("const uint32_t m = reinterpret_cast<const uint32_t*>(smem + s.magic[2])[k2];", "split"),
    ("i1 = k2 == 0 ? r : __umulhi(r, m);", "split"),
    ("i2 = r - i1 * (k2 == 0 ? 1u : 4u * uint32_t(k2));", "split"),
    ("} else if constexpr (N == 8) {", "split"),
    ("i1 = pvq::divide32(r, reinterpret_cast<const uint64_t*>(smem + s.magic[3])[k2], (smem + s.magic_log[3])[k2]);",
     "split"),
    ("i2 = r - i1 * reinterpret_cast<const uint32_t*>(smem + s.count[3])[k2];", "split"),
    ("} else {", "split"),
    ("const uint64_t q = pvq::divide(r, reinterpret_cast<const uint64_t*>(smem + s.magic[L])[k2],", "split"),
    ("(smem + s.magic_log[L])[k2]);", "split"),
    ("i1 = Child(q);", "split"),
    ("i2 = Child(r - q * reinterpret_cast<const uint64_t*>(smem + s.count[L])[k2]);", "split"),
    ("staged_node<H, Child>(smem, s, i1, k1, y);", "child0"),
    ("staged_node<H, Child>(smem, s, i2, k2, y + H);", "child1"),
]


@dataclass
class Decoder:
    """One of the GEMV's decoders: where its node function is and the events of its lines."""
    name: str
    staged: bool                 # the pair-table decoder (no leaf table, no corrupt-index branch)
    node_file: str               # repository path of the node function
    signature: str
    lines: list
    group_file: str | None = None  # where the corrupt-index path is (the tables decoder)


# Above this K the GEMV decodes with the tables decoder (plan_gemv); read from the header, not copied.
STAGED_MAX_K = int(re.search(r"kStagedMaxK = (\d+);", (REPO / "csrc/packed/staged_decode.cuh").read_text()).group(1))

DECODERS = {
    True: Decoder("staged", True, "csrc/packed/staged_decode.cuh", "__device__ __forceinline__ void staged_node(",
                  STAGED_NODE_LINES),
    False: Decoder("tables", False, "csrc/codec/pyramid.h", "PVQ_HD void decode_node(", DECODE_NODE_LINES,
                   "csrc/packed/packed_layer.h"),
}


@dataclass
class SourceMap:
    node_lines: dict      # node function's line -> event
    node_range: tuple     # (first, last) line of the node function
    invalid_lines: set    # the group decode's lines of the corrupt-index path (tables decoder only)
    node_file: str = "pyramid.h"         # file names as the line info gives them (base names)
    group_file: str = "packed_layer.h"


def _function_lines(text: str, signature: str) -> list[tuple[int, str]]:
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if signature in l), None)
    if start is None:
        raise ValueError(f"kernel_budget: '{signature}' not found")
    depth, out = 0, []
    for i in range(start, len(lines)):
        out.append((i + 1, lines[i]))
        depth += lines[i].count("{") - lines[i].count("}")
        if depth == 0 and "{" in "".join(l for _, l in out):
            return out
    raise ValueError(f"kernel_budget: unbalanced braces after '{signature}'")


def source_map(decoder: Decoder, node_text: str | None = None, group_text: str | None = None) -> SourceMap:
    """The events of the decoder's lines, from the repository's files (or the texts given)."""
    node_text = node_text if node_text is not None else (REPO / decoder.node_file).read_text()
    body = _function_lines(node_text, decoder.signature)
    node_lines, expected, event = {}, iter(decoder.lines), "entry"
    for number, line in body:
        s = line.strip()
        if not s or s.startswith("//") or set(s) <= set("{}"):
            node_lines[number] = event if s != "}" or number != body[-1][0] else "entry"
            continue
        want, event = next(expected, (None, None))
        if want is None or want not in s:
            raise ValueError(f"kernel_budget: {decoder.node_file}:{number} '{s}' does not match the replay's "
                             f"{decoder.name} decoder (expected '{want}'); update its lines and replay_group together")
        node_lines[number] = event
    if next(expected, None) is not None:
        raise ValueError(f"kernel_budget: {decoder.node_file}'s node function is shorter than its replay lines")
    invalid = set()
    if decoder.group_file is not None:
        group_text = group_text if group_text is not None else (REPO / decoder.group_file).read_text()
        group = _function_lines(group_text, "PVQ_HD float decode_group(")
        invalid = {n for n, l in group if any(p in l for p in DECODE_GROUP_INVALID)}
        if len(invalid) != len(DECODE_GROUP_INVALID):
            raise ValueError("kernel_budget: decode_group's corrupt-index path changed")
    return SourceMap(node_lines, (body[0][0], body[-1][0]), invalid, Path(decoder.node_file).name,
                     Path(decoder.group_file or decoder.node_file).name)


def event_of(chain: tuple, smap: SourceMap, D: int) -> tuple[int, str]:
    """(tree depth, event) of an instruction from its inlining chain: depth 0 is the top decode_node
    (N = D), depth d has N = D / 2^d. Helpers inlined into decode_node (divide, count_at) take the
    event of the decode_node line that called them.

    nvcc's inlining chains sometimes repeat a decode_node frame (an N=4 node three calls deep, say),
    so the number of frames only bounds the depth from above; the depth is taken from the event
    where the event fixes it (N=2 and N=4 code) and capped otherwise. The counts are then averaged
    over the 2^depth nodes of that depth (replay_group counts every node)."""
    first, last = smap.node_range
    frames = [line for f, line in chain if f == smap.node_file and first <= line <= last]
    if frames:
        event = smap.node_lines.get(frames[0], "entry")
        if event in ("child0", "child1"):
            event = "split"
        n2, n4 = _depth(D, 2), _depth(D, 4)
        if event.startswith("n2_") or event == "pair":
            return n2, event
        if event in ("leaf_hit", "n4_entry"):
            return n4, event
        return min(len(frames) - 1, n4 if event in ("split", "walk") else n2), event
    if any(f == smap.group_file and line in smap.invalid_lines for f, line in chain[:1]):
        return 0, "invalid"
    return 0, "group"


# ----- Replaying the decoder on codes -------------------------------------------------------------------

class Tables:
    """V(n, k), the split offsets and the guide buckets, built by split_tables.cpp's rules."""

    def __init__(self, D: int, K: int, guide_bits: int = 6):
        self.V = {1: [1] + [2] * K}
        n = 1
        while n < D:
            h, n = n, 2 * n
            self.V[n] = [sum(self.V[h][j] * self.V[h][k - j] for j in range(k + 1)) for k in range(K + 1)]
        self.off, self.guide, self.shift = {}, {}, {}
        n = 2
        while n <= D:
            h = n // 2
            for k in range(K + 1):
                off, acc = [], 0
                for k1 in range(k + 2):
                    off.append(acc)
                    if k1 <= k:
                        acc += self.V[h][k1] * self.V[h][k - k1]
                bits = (self.V[n][k] - 1).bit_length()
                shift = max(bits - guide_bits, 0)
                guide, k1 = [], 0
                for b in range(1 << guide_bits):
                    while k1 < k and off[k1 + 1] <= (b << shift):
                        k1 += 1
                    guide.append(k1)
                self.off[n, k], self.guide[n, k], self.shift[n, k] = off, guide, shift
            n *= 2


def replay_group(t: Tables, index: int, K: int, D: int, leaf_max_k: int, events: collections.Counter,
                 staged: bool = False) -> list[int]:
    """decode_node<D>(index, K) with pyramid.h's rules (staged: staged_node's, whose 2-leaves are one
    pair-table read and which has no leaf table); adds (position, event) counts to `events` (the
    events of DECODE_NODE_LINES or STAGED_NODE_LINES) and returns the pulses."""
    y = [0] * D

    def node(N, i, k, pos, at, ev):
        ev[pos, "entry"] += 1
        if N == 2:
            y[at], y[at + 1] = pair_pulses(i, k)
            if staged:
                ev[pos, "pair"] += 1
                return
            ev[pos, "n2_entry"] += 1
            if k == 0:
                ev[pos, "n2_k0"] += 1
                return
            ev[pos, "n2_nz"] += 1
            if i < 2:
                ev[pos, "n2_lt2"] += 1
                return
            ev[pos, "n2_ge"] += 1
            if i >= 4 * k - 2:
                ev[pos, "n2_hi"] += 1
                return
            ev[pos, "n2_mid"] += 1
            return
        hit = N == 4 and k <= leaf_max_k and not staged
        if N == 4 and not staged:
            ev[pos, "n4_entry"] += 1
        ev[pos, "leaf_hit" if hit else "split"] += 1
        off = t.off[N, k]
        k1 = t.guide[N, k][i >> t.shift[N, k]]
        walk = 1  # the loop body (compare, and branch back while off[k1+1] <= i) runs once more per step
        while off[k1 + 1] <= i:
            k1 += 1
            walk += 1
        # A table hit's pulses are the table's, which were made by this same split: they are computed
        # here for the check, but only the path the kernel takes adds events.
        if not hit:
            ev[pos, "walk"] += walk
        sink = ev if not hit else collections.Counter()
        H = N // 2
        i1, i2 = divmod(i - off[k1], t.V[H][k - k1])
        node(H, i1, k1, pos + "0", at, sink)
        node(H, i2, k - k1, pos + "1", at + H, sink)

    if D == 1:
        events["", "entry"] += 1
        events["", "n1"] += 1
        return [0 if K == 0 else (-K if index else K)]
    node(D, index, K, "", 0, events)
    return y


def pair_pulses(i: int, k: int) -> tuple[int, int]:
    """The 2-leaf of index i and k pulses (decode_node<2>'s closed form, which the pair table holds)."""
    if k == 0:
        return 0, 0
    if i < 2:
        return 0, (-k if i else k)
    if i >= 4 * k - 2:
        return (-k if i > 4 * k - 2 else k), 0
    u = i - 2
    k1 = 1 + (u >> 2)
    return (-k1 if u & 2 else k1), (-(k - k1) if u & 1 else k - k1)


@dataclass
class EventCounts:
    lane: dict        # (depth, event) -> mean executions per node of that depth and per group (a lane)
    warp: dict        # (depth, event) -> the same per chunk for a warp: the most of its 32 lanes
    groups: int
    chunks: int
    hit_rate: float   # fraction of 4-leaves decoded by the table
    walk_extra: float  # mean extra guide-walk steps per split node (beyond the one compare)


def _depth(D: int, N: int) -> int:
    return (D // N).bit_length() - 1


def _by_depth(per_pos: dict, D: int, scale: float) -> dict:
    out = collections.Counter()
    for (pos, event), v in per_pos.items():
        out[len(pos), event] += v / (2 ** len(pos)) / scale
    return dict(out)


def count_events(index_tiles, K: int, D: int, leaf_max_k: int, check=None, staged: bool = False) -> EventCounts:
    """index_tiles: iterable of tiles, each a list of up to 32 rows (lanes) of group indices; column j of
    a tile is one chunk, i.e. one warp iteration. `check(pulses, indices)` verifies the replay."""
    t = Tables(D, K)
    lane, warp = collections.Counter(), collections.Counter()
    groups = chunks = 0
    for tile in index_tiles:
        for j in range(len(tile[0])):
            per_lane, pulses = [], []
            for row in tile:
                ev = collections.Counter()
                pulses.append(replay_group(t, int(row[j]), K, D, leaf_max_k, ev, staged))
                per_lane.append(ev)
                lane.update(ev)
            if check is not None:
                check(pulses, [int(row[j]) for row in tile])
            for key in set().union(*per_lane):
                warp[key] += max(ev[key] for ev in per_lane)
            groups += len(tile)
            chunks += 1
    hits = sum(v for (p, e), v in lane.items() if e == "leaf_hit")
    leaves = sum(v for (p, e), v in lane.items() if e == "n4_entry")
    splits = sum(v for (p, e), v in lane.items() if e == "split")
    walks = sum(v for (p, e), v in lane.items() if e == "walk")
    return EventCounts(_by_depth(lane, D, groups), _by_depth(warp, D, chunks), groups, chunks,
                       hits / leaves if leaves else 0.0, (walks - splits) / splits if splits else 0.0)


def scenario(D: int, leaf: str) -> dict:
    """The (depth, event) counts of one uniform path: every 4-leaf a table hit ('table') or split
    2+2 into two N=2 nodes of the generic case ('split'), or the staged decoder's one path ('staged':
    every 2-leaf a pair-table read); the guide bucket always exact (one walk compare a node)."""
    ev = collections.Counter()
    def node(N, pos):
        ev[pos, "entry"] += 1
        if N == 2 and leaf == "staged":
            ev[pos, "pair"] += 1
            return
        if N == 2:
            for e in ("n2_entry", "n2_nz", "n2_ge", "n2_mid"):
                ev[pos, e] += 1
            return
        if N == 4 and leaf != "staged":
            ev[pos, "n4_entry"] += 1
            if leaf == "table":
                ev[pos, "leaf_hit"] += 1
                return
        ev[pos, "split"] += 1
        ev[pos, "walk"] += 1
        node(N // 2, pos + "0")
        node(N // 2, pos + "1")
    node(D, "")
    return _by_depth(ev, D, 1.0)


def instruction_counts(blocks: list[Block], loop: LoopReport, smap: SourceMap, events: dict, D: int,
                       rule: str = "max"):
    """Yields (instruction, its source (depth, event), its block's count per iteration).

    A block runs as often as the most frequent source line among its instructions: nvcc hoists and
    if-converts decode code into blocks that run more often than its line (a leaf-table read issued
    before the leaf test, the N=2 sign selects folded into the case test), while the one move the
    other way, loop-invariant set-up of the guide walk placed before the walk loop, is mapped to the
    node's count explicitly. rule="mode" (the count of most of the block's instructions) instead
    treats that moved code as if it stayed put: the report gives both, bracketing the estimate."""
    in_inner = set().union(*loop.inner.values()) if loop.inner else set()
    for b in loop.blocks:
        rows = []
        for ins in blocks[b].instrs:
            depth, event = event_of(ins.chain, smap, D)
            if event == "walk" and b not in in_inner:
                event = "split"  # the while line's set-up outside its loop runs once a node
            # One SASS instance is one node: the mean count of a node of that depth.
            c = 1.0 if event == "group" else events.get((depth, event), 0.0)
            rows.append((ins, (depth, event), c))
        if rule == "max":
            count = max(c for _, _, c in rows)
        else:
            count = collections.Counter(c for _, _, c in rows).most_common(1)[0][0]
        for ins, key, c in rows:
            yield ins, key, count, c


def loop_cost(blocks: list[Block], loop: LoopReport, smap: SourceMap, events: dict, D: int,
              rule: str = "max") -> tuple[float, float]:
    """Expected instructions of one hot-loop iteration: each block's size times its count. Returns
    (cost, fraction of the loop's instructions whose own line runs less often than their block:
    code the compiler moved across branches, the attribution's main uncertainty)."""
    total = disagree = 0.0
    for _, _, count, own in instruction_counts(blocks, loop, smap, events, D, rule):
        total += count
        disagree += own != count
    return total, disagree / max(1, loop.instructions)


def cost_by_source(blocks: list[Block], loop: LoopReport, smap: SourceMap, events: dict, D: int) -> dict:
    """(depth, event) -> instructions per iteration that source line accounts for (static, expected)."""
    static, expected = collections.Counter(), collections.Counter()
    for _, key, count, _ in instruction_counts(blocks, loop, smap, events, D):
        static[key] += 1
        expected[key] += count
    return {k: (static[k], expected[k]) for k in static}


# ----- Tools ---------------------------------------------------------------------------------------------

def tool(name: str) -> str | None:
    """nvdisasm/cuobjdump: PATH, $CUDA_HOME/bin, then the nvidia-cuda-* pip wheels (nvidia/cu13/bin)."""
    found = shutil.which(name)
    if found:
        return found
    for v in ("CUDA_HOME", "CUDA_PATH"):
        if v in os.environ and (Path(os.environ[v]) / "bin" / name).exists():
            return str(Path(os.environ[v]) / "bin" / name)
    try:
        import nvidia  # namespace package of the NVIDIA wheels
        for root in nvidia.__path__:
            for candidate in Path(root).glob(f"cu*/bin/{name}"):
                return str(candidate)
    except ImportError:
        pass
    return None


def compile_cubin(source: str, arch: str, out: Path, lineinfo: bool) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    from kernel_static import nvcc
    cmd = [nvcc(), "-std=c++20", "-O3", "-DNDEBUG", f"-I{REPO / 'csrc'}", "-cubin", f"-arch={arch}",
           *(["-lineinfo"] if lineinfo else []), str(REPO / "csrc" / source), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"kernel_budget: {' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")


def demangled_names(names) -> dict[str, str]:
    sys.path.insert(0, str(REPO / "bench"))
    from kernel_static import short_name
    names = list(names)
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return {short_name(d): n for n, d in zip(names, out)}


# ----- The report ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gpu:
    name: str
    bandwidth: float  # HBM bytes/s
    sms: int = 132
    clock: float = 1.755e9
    lanes: int = 4 * 32  # 4 schedulers, each issuing one 32-lane warp instruction a cycle

    @property
    def issue(self) -> float:  # lane-instructions per second
        return self.sms * self.lanes * self.clock


# The H200 has the H100's SMs and clock; only its memory is faster (what the issue's budget assumes).
GPUS = (Gpu("H100 SXM", 3.35e12), Gpu("H200", 4.8e12))
# HBM latency under load, for the bytes-in-flight bound (Little's law). An assumption, not a measurement:
# the issue's 25-32 KB per SM at 3.35 TB/s corresponds to 1.0-1.3 us.
LATENCY_S = 1.0e-6
SHAPE = (4096, 4096)                   # the representative layer of kernel_static.py
BATCHES = (1, 16)


def batch_kernel(D: int, M: int, staged: bool = True) -> str:
    """The GEMV instance a batch of M fp16 rows runs at group size D (plan_gemv's batch bound)."""
    return f"gemv_kernel<{D}, {M}, __half, {'true' if staged else 'false'}>"
DEQUANT_KERNELS = ("dequantize_kernel<16, __half>", "dequantize_kernel<16, float>", "dequantize_kernel<8, __half>")


def sass_of(source: str, workdir: Path, want: list[str]) -> dict[str, list[Instr]]:
    """The wanted kernels' SASS for sm_90a with line info; stops if -lineinfo changed the code."""
    nvdisasm, cuobjdump = tool("nvdisasm"), tool("cuobjdump")
    stem = Path(source).stem
    li, plain = workdir / f"{stem}-li.cubin", workdir / f"{stem}.cubin"
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda a: compile_cubin(source, "sm_90a", *a), [(li, True), (plain, False)]))
    with_lines = parse_sass(subprocess.run([nvdisasm, "-gi", str(li)], capture_output=True, text=True,
                                           check=True).stdout)
    release = parse_sass(subprocess.run([cuobjdump, "-sass", str(plain)], capture_output=True, text=True,
                                        check=True).stdout)
    names_li, names_rel = demangled_names(with_lines), demangled_names(release)
    out = {}
    for name in want:
        a, b = with_lines[names_li[name]], release[names_rel[name]]
        if [(i.pred, i.op) for i in a] != [(i.pred, i.op) for i in b]:
            sys.exit(f"kernel_budget: {name}: the -lineinfo SASS differs from the Release SASS")
        out[name] = a
    return out


def emulated_plans(workdir: Path, D: int, K: int, sb: int, index_bits: int, count: int, facts: dict) -> dict:
    """plan_gemv and the launches at the representative shape on the emulated H100 (dry run), the
    emulator knowing ptxas's registers (facts: kernel -> resources), so the plan is the GPU's."""
    sys.path.insert(0, str(REPO / "tests" / "cuda_emulation"))
    import emulation
    from kernel_static import set_registers
    m = emulation.Manifest(workdir)
    rows, cols = SHAPE
    bits = index_bits + sb
    words = (rows // 32) * (cols // D) * bits
    layer = dict(codes=f"zeros:{4 * words}", row_scale=f"zeros:{2 * rows}", levels=f"zeros:{4 << sb}",
                 rows=rows, groups=cols // D, D=D, K=K, bits=bits, index_bits=index_bits, count=count)
    m.command("gpu", name="h100")
    set_registers(m, facts)
    m.command("dry_run", on=1)
    for M in BATCHES:
        m.command("gemv", id=f"gemv{M}", kind="float16", M=M, x=f"zeros:{2 * M * cols}", bias="none", out="none",
                  **layer)
    m.command("dequantize", id="dequant", kind="float16", row_begin=0, row_end=rows, out="none", **layer)
    run = emulation.run(emulation.build("plain"), m)
    if run.returncode != 0:
        sys.exit(f"kernel_budget: the dry run failed: {run.describe()}")
    return {"results": run.results, "launches": run.launches}


def real_code_tiles(blocks: list[int], projections: list[str], preset: str):
    """Index tiles of the default model's layers, quantized data-free at the preset (no quantized
    checkpoint is kept in the cache; data-free is what `pvq-cuda quantize` does without calibration)."""
    import torch
    from safetensors.torch import load_file
    import pvq_cuda
    from pvq_cuda.apps.loading import ensure_default_model
    from pvq_cuda.ops.packed import unpack_codes
    weights = load_file(str(ensure_default_model(quiet=True) / "model.safetensors"))
    config = pvq_cuda.PVQConfig.preset(preset)
    layers = []
    for b in blocks:
        for proj in projections:
            key = next(k for k in weights if k.endswith(f"layers.{b}.{proj}.weight"))
            W = weights[key].float()
            q = pvq_cuda.quantize_weight(W, config)
            index, _ = unpack_codes(q.codes, q.out_features, q.groups_per_row, config.index_bits, config.scale_bits)
            layers.append((key, tuple(W.shape), index))
    return layers, torch


STORE_WIDTHS = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}  # STG modifiers; none: 4 bytes


def store_width(op: str) -> int:
    return next((v for k, v in STORE_WIDTHS.items() if k in op.split(".")[1:]), 4)


def dequant_stores(name: str, instrs: list[Instr], res=None) -> dict:
    """The store figures of one dequantize_kernel instance, from its SASS hot loop (the loop with the
    most STG). Staged = the loop writes shared memory (STS) and reads it back (LDS.128) with a warp
    barrier in between: then its 16-byte STGs are the warp-cooperative row stores, lane i writing piece
    i of a row segment (consecutive lanes on consecutive addresses), and its narrower STGs are the
    element-by-element path of a short last column batch. Unstaged = one lane per row (the old kernel)."""
    blocks = build_cfg(instrs)
    loop = analyse_loop(blocks, marker="STG")
    body = [i for b in loop.blocks for i in blocks[b].instrs]
    stores = [i for i in body if i.base == "STG"]
    widths = collections.Counter(store_width(i.op) for i in stores)
    # __syncwarp() is `BRA.DIV` to a `WARPSYNC.COLLECTIVE` fallback (plain WARPSYNC on other targets).
    staged = (any(i.base == "STS" for i in body) and any(i.op.startswith("LDS.128") for i in body)
              and any(i.base == "WARPSYNC" or i.op == "BRA.DIV" for i in body))
    Dn = int(name.split("<")[1].split(",")[0])
    elem = 2 if ("__half" in name or "bfloat16" in name) else 4
    group = Dn * elem
    out = dict(name=name, widths=widths, calls=sum(i.base == "CALL" for i in body), group_bytes=group, res=res,
               staged=staged, sts=sum(i.base == "STS" for i in body),
               lds128=sum(i.op.startswith("LDS.128") for i in body))
    if staged and widths.get(16):
        # Each lane stores widths[16] pieces of 16 B an item: 32 rows x segment = 32 lanes x 16 B x n.
        seg = 16 * widths[16]
        out.update(segment=seg, columns=seg // group, store=16, per_instr=32 * 16,
                   sectors=32 * 16 // 32, useful=32,
                   tail={w: c for w, c in widths.items() if w != 16})
    else:
        w = max(widths)
        out.update(segment=group, columns=1, store=w, per_instr=32 * w, sectors=32, useful=min(w, 32), tail={})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=REPO / "bench" / "results" / f"kernel-budget-{datetime.date.today():%Y-%m-%d}.md")
    parser.add_argument("--blocks", default="0,15", help="transformer blocks whose layers give the codes")
    parser.add_argument("--projections", default="self_attn.q_proj,self_attn.k_proj,self_attn.o_proj,mlp.gate_proj,"
                                                  "mlp.down_proj")
    parser.add_argument("--label", default="current kernel", help="what the report describes")
    parser.add_argument("--preset", default="pvq-3.25", help="the codes' preset (D, K, gain bits)")
    parser.add_argument("--before", type=Path, help="an earlier report of this script: its figures are appended "
                                                    "under 'Before', for an old-vs-new comparison")
    parser.add_argument("--before-name", help="how the report names --before (default: its file name)")
    parser.add_argument("--note", default="", help="a sentence under the old-vs-new table: what changed")
    args = parser.parse_args()
    for name in ("nvdisasm", "cuobjdump"):
        if tool(name) is None:
            sys.exit(f"kernel_budget: no {name} (looked on PATH, in $CUDA_HOME/bin and in the pip wheel: "
                     f"pip install nvidia-cuda-{name})")
    sys.path.insert(0, str(REPO / "bench"))
    import kernel_static

    import pvq_cuda
    config = pvq_cuda.PVQConfig.preset(args.preset)
    D, K, sb = config.D, config.K, config.scale_bits
    index_bits = pvq_cuda.index_bits(D, K)
    bits = index_bits + sb
    staged = K <= STAGED_MAX_K
    decoder = DECODERS[staged]
    kernels = {M: batch_kernel(D, M, staged) for M in BATCHES}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gemv = sass_of("packed/gemv.cu", tmp, list(kernels.values()))
        dequant = sass_of("packed/dequantize.cu", tmp, list(DEQUANT_KERNELS))
        ptx = {**kernel_static.ptxas_facts("packed/gemv.cu", "sm_90a"),
               **kernel_static.ptxas_facts("packed/dequantize.cu", "sm_90a")}
        (tmp / "plan").mkdir()
        plans = emulated_plans(tmp / "plan", D, K, sb, index_bits, pvq_cuda.pyramid_size(D, K), ptx)
        launches = {case: l[0] for case, l in plans["launches"].items()}
        queries = []
        for case, launch in launches.items():
            res = ptx[kernel_static.short_name(launch["kernel"])]
            threads = launch["block"][0] * launch["block"][1] * launch["block"][2]
            queries.append(("h100", threads, res.registers, res.static_smem, launch["dynamic_smem"],
                            max(launch["dynamic_smem"], 48 * 1024 - res.static_smem)))
        (tmp / "occ").mkdir()
        occ = dict(zip(launches, kernel_static.occupancies(queries, tmp / "occ")))

    smap = source_map(decoder)
    layers, torch = real_code_tiles([int(b) for b in args.blocks.split(",")], args.projections.split(","),
                                    args.preset)

    rows_out, counted = [], {}
    for M, name in kernels.items():
        blocks = build_cfg(gemv[name])
        loop = analyse_loop(blocks)
        plan = plans["results"][f"gemv{M}"]
        if plan["staged"] != str(int(staged)):
            sys.exit(f"kernel_budget: plan_gemv picked staged={plan['staged']}, the script expected {int(staged)}")
        leaf_k = int(plan["smem_leaf_k"])
        # The uniform paths: the tables decoder's all-table and all-split leaves; the staged decoder's one.
        table, dis_t = loop_cost(blocks, loop, smap, scenario(D, "table"), D) if not staged else (None, 0.0)
        split, dis_s = loop_cost(blocks, loop, smap, scenario(D, "staged" if staged else "split"), D)
        walk_step = sum(len(blocks[h].instrs) for h in loop.inner) / max(1, len(loop.inner))

        def check(pulses, tile_index):
            got = pvq_cuda.decode(torch.as_tensor(tile_index), D, K)
            if not torch.equal(got.to(torch.int64), torch.tensor(pulses, dtype=torch.int64).reshape(got.shape)):
                sys.exit("kernel_budget: the replay's pulses differ from the decode op: its rules are not the kernel's")

        if leaf_k not in counted:  # batch 1 and 16 usually get the same leaf prefix
            tiles = [index[t0:t0 + 32].tolist() for _, shape, index in layers for t0 in range(0, shape[0], 32)]
            counted[leaf_k] = count_events(tiles, K, D, leaf_k, staged=staged)
        ev = counted[leaf_k]
        # Check the replay against the decode op on the first tile of every layer (all its columns).
        for _, shape, index in layers:
            sub = index[:32]
            t = Tables(D, K)
            pulses = [[replay_group(t, int(v), K, D, leaf_k, collections.Counter(), staged) for v in row]
                      for row in sub.tolist()]
            check(pulses, sub)
        lane, dis_l = loop_cost(blocks, loop, smap, ev.lane, D)
        warp, dis_w = loop_cost(blocks, loop, smap, ev.warp, D)
        warp_mode, _ = loop_cost(blocks, loop, smap, ev.warp, D, rule="mode")
        bysrc = cost_by_source(blocks, loop, smap, ev.warp, D)
        rows_out.append(dict(M=M, name=name, loop=loop, table=table, split=split, lane=lane, warp=warp, bysrc=bysrc,
                             warp_mode=warp_mode,
                             walk_step=walk_step, leaf_k=leaf_k, ev=ev, plan=plan, launch=launches[f"gemv{M}"],
                             staged=staged,
                             occ=occ[f"gemv{M}"], res=ptx[name], disagree=max(dis_t, dis_s, dis_l, dis_w),
                             loads=collections.Counter(i.op for b in loop.blocks for i in blocks[b].instrs
                                                       if i.base == "LDG")))

    # Tile dequantization: its stores.
    store_rows = [dequant_stores(name, dequant[name], ptx[name]) for name in DEQUANT_KERNELS]

    write_report(args, rows_out, store_rows, layers, bits, D, K, plans)


def headline(text: str) -> dict:
    """batch -> figures of a report of this script: its per-weight and resources tables' rows."""
    out, section = {}, ""
    for line in text.splitlines():
        if line.startswith("## "):
            section = line
        cells = [c.strip().strip("*`") for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or not cells[0].isdigit():
            continue
        fig = out.setdefault(int(cells[0]), {})
        if section.startswith("## Instructions per weight"):
            fig.update(static=cells[2], table=cells[4], split=cells[5], lane=cells[7], warp=cells[8])
        elif section.startswith("## Resources"):
            fig.update(regs=cells[1], spills=cells[2])
    return out


def compare_section(old_text: str, new_text: str, name: str) -> list[str]:
    old, new = headline(old_text), headline(new_text)
    L = ["", f"## Old vs new (old: {name})", "",
         "| batch | per warp | per lane | all leaves in table | all leaves split | static instr. in loop | registers |",
         "|---|---|---|---|---|---|---|"]
    for M in sorted(set(old) & set(new)):
        o, n = old[M], new[M]
        L.append(f"| {M} | " + " | ".join(f"{o.get(k, '-')} -> {n.get(k, '-')}"
                                         for k in ("warp", "lane", "table", "split", "static", "regs")) + " |")
    return L + ["", "Instructions per weight except the static count (per iteration) and registers."]


def before_section(text: str, name: str) -> list[str]:
    """The per-weight, branch-frequency and bandwidth tables of an earlier report, headings one level down."""
    lines = text.splitlines()
    title = lines[0].lstrip("# ") if lines else name
    keep, out = False, ["", f"## Before: {title} ({name})", ""]
    for line in lines:
        if line.startswith("## "):
            keep = line.startswith(("## Instructions per weight", "## Branch frequencies", "## Predicted fraction"))
        if keep and not line.startswith("Targets"):
            out.append("#" + line if line.startswith("#") else line)
    return out


TARGETS = {1: 6.0, 16: 12.0}  # issue 14: instructions per weight per warp at batch 1 and 16


def target_gap(rows: list[dict], D: int, K: int) -> list[str]:
    """By how much each batch misses its target, and where the instructions go, from the counts."""
    L = ["### Against the targets", ""]
    for r in rows:
        ipw, target = r["warp"] / D, TARGETS.get(r["M"])
        if target is None:
            continue
        decode = sum(ex for (depth, event), (_, ex) in r["bysrc"].items() if event != "group") / D
        group = ipw - decode
        verdict = "met" if ipw <= target else f"missed by {ipw / target:.1f}x"
        L.append(f"- Batch {r['M']}: {ipw:.1f} against <= {target:g}, {verdict}. Decoding the pulses takes "
                 f"{decode:.1f} per weight ({D // 2 - 1} split nodes a group, each a guide read, a compare walk and "
                 f"a division, and {D // 2} 2-leaves, one table read each); the rest, {group:.1f}, is per-group "
                 f"work: reading the code, the norm (D FMAs), the activations and the dot products, at least "
                 f"{r['M']} FMA per weight for {r['M']} batch row{'s' if r['M'] > 1 else ''} on CUDA cores.")
    leaf_kb = sum(Tables(4, K).V[4]) * 4 / 1024  # a 4-leaf word for every index of every k <= K
    L += ["", "So the decode alone is above the batch-1 budget: with exact split-order decoding every group pays "
          "a guide read, a compare walk and a division for each of its D/2 - 1 split nodes, and no arrangement "
          "of tables removes that work, only its addressing. Closing the gap needs fewer nodes a weight (4-leaves "
          f"from a table for every k <= K = {K}: {leaf_kb:,.0f} KB, against 227 KB of shared memory an SM and "
          "a fill per block), several weights a node (larger "
          "leaves), or a code that is cheaper to decode than the pyramid's enumeration. At batch 16 the FMAs on "
          "CUDA cores (16 a weight per lane) exceed the target by themselves: only tensor cores (decoded weights "
          "in fragment order into mma) can meet it."]
    return L


def source_kind(D: int, depth: int, event: str) -> str:
    """The report's name for a (depth, event) of either decoder."""
    N = D >> depth
    if event == "group":
        return "per group: chunk read, activations, FMAs, gain, loop"
    if event == "invalid":
        return "corrupt-index path"
    if event.startswith("n2_"):
        return "N=2 nodes (leaf split 2+2): closed-form cases"
    if event == "pair":
        return "N=2 leaves: one pair-table read each"
    if event == "n1":
        return "N=1 group: the sign"
    if event in ("leaf_hit", "n4_entry"):
        return "N=4 leaf test and shared-memory table read"
    return f"N={N} split node{'s' if depth else ''}: guide, walk, divide"


DEQUANT_COLUMNS = ("bytes per warp store instruction", "sectors per warp store", "useful bytes per 32-B sector",
                   "64-bit divide calls in the loop")


def dequant_table(stores: list[dict]) -> list[str]:
    staged = [s for s in stores if s["staged"]]
    L = []
    if staged:
        L += ["Read from the SASS: the hot loop (the loop with the most global stores) writes shared memory (STS) "
              "and reads it back 16 bytes at a time (LDS.128) across a warp barrier, so the warp stages a tile of "
              "32 rows x a row segment and stores the segment rows cooperatively. Each lane issues n 16-byte STGs "
              "an item, so the segment is 32 lanes x 16 B x n / 32 rows = 16n bytes of each row (the columns of "
              "an item: segment / bytes a group row). **Assumption (the kernel's design, not visible in SASS):** "
              "lane i stores piece i, i+32, ... of the row-major segment tile, so the 32 lanes of one 16-byte STG "
              "write 512 consecutive-by-row bytes: 512 / 32 = 16 whole sectors when segments start on 32-byte "
              "boundaries, i.e. the output is 32-B aligned (torch allocations are 256-B aligned) and a row "
              "(in_features x element size) is a multiple of 32 B (at 4096 inputs it is). Narrower STGs are the "
              "element-by-element path of a short last column batch (or rows not 16-B aligned): consecutive "
              "lanes on consecutive elements, 2 (fp16) or 4 (fp32) whole sectors an instruction at those "
              "alignments; a 4096-wide layer never takes it."]
    if len(staged) < len(stores):
        L += ["Unstaged kernels: one lane per row stores its group's D values; the 32 lanes of a warp store to 32 "
              "different rows (row stride = in_features x element size, far apart), so every warp store "
              "instruction touches 32 separate 32-byte sectors. Useful bytes per sector = bytes each lane stores "
              "per instruction; a coalesced store puts 32 useful bytes in every sector."]
    L += ["", "| kernel | bytes a group row | row segment an item (columns) | staging in the loop (STS / LDS.128) "
          "| stores an item, full batch (width) | " + " | ".join(DEQUANT_COLUMNS[:3]) + " | tail-path stores "
          "(width) | " + DEQUANT_COLUMNS[3] + " |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in stores:
        n = s["widths"].get(s["store"], 0)
        tail = ", ".join(f"{c} x {w} B" for w, c in sorted(s["tail"].items(), reverse=True)) or "-"
        staging = f"{s['sts']} / {s['lds128']}" if s["staged"] else "none"
        L.append(f"| `{s['name']}` | {s['group_bytes']} | {s['segment']} B ({s['columns']}) | {staging} | "
                 f"{n} x {s['store']} B | {s['per_instr']} | {s['sectors']} | {s['useful']} of 32 "
                 f"({100 * s['useful'] / 32:.0f} %) | {tail} | {s['calls']} |")
    return L


def dequant_figures(text: str) -> dict:
    """kernel -> {column: cell} of a report's tile dequantization table (any version of it)."""
    out, header, section = {}, None, False
    for line in text.splitlines():
        if line.startswith("## "):
            section, header = line.startswith("## Tile dequantization"), None
        if not section or not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif cells[0].startswith("`"):
            out[cells[0].strip("`")] = dict(zip(header, cells))
    return out


def dequant_compare(old_text: str, stores: list[dict], name: str) -> list[str]:
    old, new = dequant_figures(old_text), dequant_figures("\n".join(["## Tile dequantization", *dequant_table(stores)]))
    L = ["", f"### Old vs new (old: {name})", "",
         "| kernel | " + " | ".join(DEQUANT_COLUMNS) + " |", "|---|" + "---|" * len(DEQUANT_COLUMNS)]
    for k in [s["name"] for s in stores if s["name"] in old]:
        L.append(f"| `{k}` | " + " | ".join(f"{old[k].get(c, '-')} -> {new[k].get(c, '-')}" for c in DEQUANT_COLUMNS)
                 + " |")
    return L


def write_report(args, rows, stores, layers, bits, D, K, plans) -> None:
    today = f"{datetime.date.today():%Y-%m-%d}"
    bpw = bits / D
    staged = rows[0]["staged"]
    decoder = DECODERS[staged]
    kinds = {}
    for r in rows:
        for (depth, event), (st, ex) in r["bysrc"].items():
            k = kinds.setdefault(source_kind(D, depth, event), {})
            a, b = k.get(r["M"], (0, 0.0))
            k[r["M"]] = (a + st, b + ex)
    ranked = sorted(kinds.items(), key=lambda kv: -kv[1].get(rows[0]["M"], (0, 0))[1])
    top, top_cost = ranked[0][0], ranked[0][1][rows[0]["M"]][1]
    if staged:
        why = (f"Every 4-node splits and every 2-leaf is one pair-table read, so the only data-dependent "
               f"branches are the guide walks ({rows[0]['ev'].walk_extra:.3f} extra steps per split node).")
    else:
        why = (f"{100 * (1 - rows[0]['ev'].hit_rate):.0f} % of 4-leaves miss the shared-memory table, so nearly "
               "every warp issues both leaf paths.")
    L = [f"# Decode-GEMV instruction budget ({args.label}, {today})", "",
         f"Generated by `python bench/kernel_budget.py --preset {args.preset}` (no GPU). {args.preset} (D={D}, K={K}, "
         f"{bits}-bit codes, {bpw:.2f} bits per weight), fp16 activations, the {decoder.name} decoder "
         f"(`{decoder.node_file}`), the sm_90a SASS of `csrc/packed/gemv.cu` as the "
         "Release build compiles it (nvcc -O3; the `-lineinfo` listing used for source attribution was checked "
         "to be the same instruction stream as `cuobjdump -sass` of the Release cubin).", "",
         "**What is what.** Instruction counts per block are *static and exact* (the SASS control-flow graph). "
         "How often each block runs is *counted on real codes*: the decoder's rules replayed in Python on the "
         f"codes of data-free {args.preset} quantizations of the default model's layers (replay checked bit for "
         "bit against the CPU decode op), mapped to blocks through the line info's inlining chains. Throughput "
         "figures are a *model* (issue slots, HBM bandwidth, bytes in flight) - no GPU timed anything.", "",
         "**Summary.** " + " ".join(
             f"Batch {r['M']}: {r['warp'] / D:.1f} instructions per weight per warp ({r['lane'] / D:.1f} per lane), "
             f"{r['warp'] / D / (GPUS[0].issue / (GPUS[0].bandwidth / (bpw / 8))):.1f}x the H100 budget;"
             for r in rows) +
         f" {rows[0]['res'].spill_stores + rows[0]['res'].spill_loads} spill bytes at batch 1. The largest item at "
         f"batch {rows[0]['M']}: {top} ({top_cost / D:.1f} per weight). {why}", "",
         "Codes: " + ", ".join(f"`{k.replace('model.', '')}` {s[0]}x{s[1]}" for k, s, _ in layers) +
         f" ({rows[0]['ev'].groups:,} groups in {rows[0]['ev'].chunks:,} chunks).", "",
         "## Instructions per weight (hot loop: one group column of a 32-row tile per warp iteration)", "",
         "Per lane = the average lane's path (no divergence). Per warp = what the warp issues: a block runs "
         "if any of its 32 lanes needs it and a loop as often as its slowest lane (the figure that counts). "
         "Uniform paths: every 4-leaf a shared-memory table hit, or every leaf split 2+2 (the staged decoder has "
         "one path, in the split column); guide buckets exact.", "",
         "| batch | kernel | static instr. in loop | shortest / longest path | all leaves in table | all leaves split "
         "| +1 guide-walk step | real codes, per lane | **real codes, per warp** |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lp = r["loop"]
        table_cell = "-" if r["table"] is None else f"{r['table'] / D:.1f}"
        L.append(f"| {r['M']} | `{r['name']}` | {lp.instructions} | {lp.shortest / D:.1f} / {lp.longest / D:.1f} | "
                 f"{table_cell} | {r['split'] / D:.1f} | +{r['walk_step'] / D:.2f} | {r['lane'] / D:.1f} | "
                 f"**{r['warp'] / D:.1f}** |")
    L += ["", f"Instructions per group are these times D={D}. Shortest/longest: fewest and most instructions from the "
          "loop header back to it, each inner loop (guide walk) once; the shortest is the corrupt-index path.", "",
          "### Where they go (real codes, per warp, instructions per weight)", "",
          "Each SASS instruction is charged to its own source line (the line info's inlining chain) at its "
          "block's count.", "",
          "| source | " + " | ".join(f"batch {r['M']}: static / per weight" for r in rows) + " |",
          "|---|" + "---|" * len(rows)]
    for k, v in ranked:
        L.append(f"| {k} | " + " | ".join(f"{v.get(r['M'], (0, 0))[0]} / {v.get(r['M'], (0, 0.0))[1] / D:.2f}"
                                         for r in rows) + " |")
    L += ["",
          "## Branch frequencies on the real codes", "",
          "| batch | shared memory a block (with the cross-warp sums) | 4-leaves decoded by the table | "
          "extra guide-walk steps per split node | code run more often than its line (hoisted) | "
          "per warp if it were not (lower bracket) |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        smem = (f"staged records, {r['plan']['smem']} B" if r["staged"] else
                f"leaf prefix k <= {r['leaf_k']}, {r['plan']['smem']} B")
        hits = "none (no leaf table)" if r["staged"] else f"{100 * r['ev'].hit_rate:.1f} %"
        L.append(f"| {r['M']} | {smem} | {hits} | {r['ev'].walk_extra:.3f} | "
                 f"{100 * r['disagree']:.1f} % of the loop's "
                 f"instructions | {r['warp_mode'] / D:.1f} |")
    L += ["", "The shared memory is what `plan_gemv` picks for a 4096x4096 layer on a 132-SM GPU (emulated H100, "
          "dry run; the H200 has the same SMs and shared memory, so the same plan). A block runs as often as the "
          "most frequent source line among its instructions: nvcc hoists code across branches (with the tables "
          "decoder, leaf-table reads above the leaf test and the N=2 sign selects into the case tests), so that "
          "code runs more often than its line. Charging "
          "every block at the count of most of its instructions instead (as if nothing were hoisted) gives the "
          "last column, a lower bracket of the estimate.", "",
          "## Resources, occupancy, bytes in flight", "",
          "| batch | regs | spills (st/ld B) | grid | splits x tiles = items (rounds, tail efficiency) | "
          "blocks/SM (limited by) | warps/SM | global loads in the loop (static) | bytes in flight per SM | "
          "shared-memory fill per launch (x the layer's bytes) |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    layer_bytes = SHAPE[0] // 32 * (SHAPE[1] // D) * bits * 4
    for r in rows:
        res, occ, launch = r["res"], r["occ"], r["launch"]
        # plan_gemv's own work split: the emulator knew ptxas's registers (emulated_plans).
        splits, grid = int(r["plan"]["splits"]), int(r["plan"]["blocks"])
        if grid != launch["grid"][0]:
            sys.exit(f"kernel_budget: the plan's grid {grid} is not the launch's {launch['grid'][0]}")
        per_sm = min(int(occ["blocks_per_sm"]), -(-grid // 132))
        warps = per_sm * launch["block"][0] // 32
        chunk = bits * 4
        r["inflight"] = warps * chunk
        loads = ", ".join(f"{n}x `{op}`" for op, n in sorted(r["loads"].items()))
        items = splits * (SHAPE[0] // 32)
        rounds = -(-items // grid)
        # Every block fills its decoder's tables from L2, but for the staged decoder's pair table, which
        # it computes ((K + 1)(2K + 1) float pairs: staged_decode.cuh's pair_base(K + 1)).
        loaded = int(r["plan"]["table_bytes"]) - ((K + 1) * (2 * K + 1) * 8 if r["staged"] else 0)
        fill = grid * loaded
        L.append(f"| {r['M']} | {res.registers} | {res.spill_stores}/{res.spill_loads} | {grid} | "
                 f"{splits} x {SHAPE[0] // 32} = {items} ({rounds}, {100 * items / (rounds * grid):.0f} %) | "
                 f"{occ['blocks_per_sm']} ({occ['limited_by'].replace('_', ' ')}) | {warps} | {loads} | "
                 f"{warps} x {chunk} B = {r['inflight'] / 1024:.1f} KB | {fill / 2**20:.2f} MB "
                 f"({fill / layer_bytes:.2f}x) |")
    L += ["", "Tail efficiency: items / (rounds x grid), the share of block-rounds that have work. "
          f"Bytes in flight: each warp loads its chunk (B = {bits} words, {4 * bits} B) at the top of an iteration and "
          "decodes it in the same iteration (no prefetch of the next chunk), so at most one chunk per resident "
          "warp is outstanding; activations (staged once per block in a shared-memory window) are not counted. "
          "Grid, splits and blocks/SM: plan_gemv's work split at the occupancy that ptxas's registers and the "
          "plan's shared memory allow. Shared-memory fill: the decoder tables every resident block loads from "
          "L2 at its start, against the layer's code bytes.", "",
          "## Predicted fraction of the bandwidth bound (batch 1 and 16 read the same weight bytes)", "",
          f"Budget = issue rate / weight rate at full bandwidth: 132 SMs x 4 x 32 lanes x 1.755 GHz = "
          f"{GPUS[0].issue:.3g} lane-instructions/s against {bpw:.2f} bits per weight. Issue bound = budget / "
          f"instructions per weight (per warp). Latency bound = bytes in flight per SM / (bandwidth x "
          f"{LATENCY_S * 1e6:.1f} us / 132), Little's law with an assumed loaded HBM latency. Predicted = the "
          "smaller, capped at 1; it ignores the tail of the work split, the finalize kernel and launch gaps, so it "
          "is an upper bound.", "",
          "| GPU | bandwidth | budget instr/weight | batch | instr/weight | issue bound | latency bound | **predicted "
          "fraction of bandwidth bound** |", "|---|---|---|---|---|---|---|---|"]
    for g in GPUS:
        budget = g.issue / (g.bandwidth / (bpw / 8))
        need = g.bandwidth * LATENCY_S / g.sms
        for r in rows:
            ipw = r["warp"] / D
            issue, lat = min(1.0, budget / ipw), min(1.0, r["inflight"] / need)
            L.append(f"| {g.name} | {g.bandwidth / 1e12:.2f} TB/s | {budget:.2f} | {r['M']} | {ipw:.1f} | "
                     f"{100 * issue:.0f} % | {100 * lat:.0f} % | **{100 * min(issue, lat):.0f} %** |")
    L += ["", "Targets (issue 14): batch 1 <= 6 instructions per weight (3.6 the moonshot), batch 16 <= 12, "
          "zero spills.", "", *target_gap(rows, D, K),
          "", "## Tile dequantization: store efficiency (for issue 14 item 3)", ""]
    L += dequant_table(stores)
    if args.before is not None:
        L += dequant_compare(args.before.read_text(), stores, args.before_name or args.before.name)
    if args.before is not None:
        name = args.before_name or args.before.name
        L[L.index("## Instructions per weight (hot loop: one group column of a 32-row tile per warp iteration)") - 1:
          ] = compare_section(args.before.read_text(), "\n".join(L), name) + ["", args.note, "", *L[L.index(
              "## Instructions per weight (hot loop: one group column of a 32-row tile per warp iteration)"):]]
        L += before_section(args.before.read_text(), name)
    L += ["", "## How to read and rerun", "",
          "`python bench/kernel_budget.py [--preset pvq-3.25] [--blocks 0,15] [--projections ...] [--label ...] "
          "[--out ...] [--before OLD.md --note ...]`. A changed decoder (packed/staged_decode.cuh staged_node, or "
          "codec/pyramid.h decode_node for K > 35) makes the script stop until its replay (`STAGED_NODE_LINES` or "
          "`DECODE_NODE_LINES`, and `replay_group`) is updated to the same rules.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(L))
    for r in rows:
        print(f"kernel_budget: batch {r['M']}: {r['warp'] / D:.1f} instructions per weight per warp "
              f"({r['lane'] / D:.1f} per lane; uniform path {r['split'] / D:.1f})")
    print(f"kernel_budget: -> {args.out}")


if __name__ == "__main__":
    main()
