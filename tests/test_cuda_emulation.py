"""Every CUDA kernel, executed on the CPU by the emulation harness (tests/cuda_emulation), against the
CPU ops: codes bit for bit, floats within the tolerances the GPU tests state.

Three builds run the same launchers: plain (-O1), AddressSanitizer + UBSan, ThreadSanitizer. Each
runs one emulator process for all its cases, at emulated SM counts 1 and 2 (every grid-stride loop of
a persistent grid wraps) and 132 (an H100). The plain build runs every case; the sanitizer builds,
up to 10x slower, run a subset that still reaches every kernel instance kind. Inputs are fresh random
numbers each session; PVQ_EMULATION_SEED=<n> repeats a session's inputs (every failure names its seed).

Adding a kernel or a case: README.md in tests/cuda_emulation.
"""

from __future__ import annotations

import math
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

import pvq_cuda
from pvq_cuda.format.activation import ACT_PRESETS, ActivationConfig, activation_levels

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emulation"))
import emulation  # noqa: E402
from test_matmul import TOL as MATMUL_TOL  # noqa: E402  (the GPU tests' tolerances, reused)

VARIANTS = list(emulation.VARIANTS)
SEED = int(os.environ.get("PVQ_EMULATION_SEED", random.SystemRandom().randrange(2**31)))
SMS = (1, 2, 132)
HESSIAN_REL_TOL = 1e-6  # tests/test_hessian.py: relative Frobenius error against fp64
# dequantize_kernel's fp32 output is the CPU's bit for bit (tests/test_matmul.py::test_cuda_matmul_matches_cpu);
# fp16/bf16 outputs are that float rounded once.


def require_toolchain():
    tc = emulation.toolchain()
    if isinstance(tc, str):
        if os.environ.get("PVQ_REQUIRE_EMULATION") == "1":
            pytest.fail(f"PVQ_REQUIRE_EMULATION=1 but the CUDA emulation cannot be built: {tc}")
        pytest.skip(f"CUDA emulation needs g++ and the CUDA headers: {tc}")


# ----- Cases ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    family: str
    sms: int
    check: Callable[[emulation.Run, dict], None]  # (run, this case's results) -> raises AssertionError
    threads_needed: int | None = None  # threads for one pass over a grid-stride kernel's work


@dataclass
class Plan:
    """The commands of one emulator process and how to check each case."""

    manifest: emulation.Manifest
    variant: str
    gen: torch.Generator
    cases: list[Case] = field(default_factory=list)
    _sms: int | None = None
    _count: int = 0

    @property
    def full(self) -> bool:
        return self.variant == "plain"

    def new_id(self, family: str) -> str:
        self._count += 1
        return f"{family}{self._count}"

    def at_sms(self, sms: int) -> None:
        if sms != self._sms:
            self.manifest.command("sms", n=sms)
            self._sms = sms

    def add(self, family: str, sms: int, command: str, check, threads_needed: int | None = None, **args) -> str:
        case_id = args.pop("id")
        self.at_sms(sms)
        self.manifest.command(command, id=case_id, **args)
        self.cases.append(Case(case_id, family, sms, check, threads_needed))
        return case_id

    def cycle_sms(self, i: int) -> int:
        return SMS[i % len(SMS)] if self.full else 2


def _rand_index(gen, V: int, n: int) -> torch.Tensor:
    """Uniform indices in [0, V), both ends included, for any V < 2^63."""
    if V < 2**62:
        idx = torch.randint(0, V, (n,), generator=gen, dtype=torch.int64)
    else:
        idx = (torch.rand(n, generator=gen, dtype=torch.float64) * float(V)).long().clamp_(0, V - 1)
    idx[0], idx[-1] = 0, V - 1
    return idx


def _codec_groups(plan: Plan, sms: int) -> int:
    """Groups for a codec case: at 1 and 2 SMs more than the persistent grid's threads (decode: 4 x 256
    a SM, encode 8 x 256, search 16 x 128), so every thread's grid-stride loop runs again; odd, so
    the last warp is partial."""
    if plan.variant == "tsan":
        return 601
    return 4501 if sms < 132 else 1501


def _check_codes(run, cid: str, output: str, want: torch.Tensor, with_bad: bool, where: str) -> None:
    """A codec kernel's output equals the CPU op's, and its status word says whether data was bad."""
    got = run.output(f"{cid}.{output}", want.dtype, want.shape)
    status = int(run.output(f"{cid}.status", torch.int32, (1,)))
    assert torch.equal(got, want), f"{where}: {(got != want).reshape(len(want), -1).any(1).sum()} groups differ"
    assert status == int(with_bad), f"{where}: status {status}, bad data: {with_bad}"


def decode_case(plan: Plan, D: int, K: int, sms: int, with_bad: bool) -> None:
    """decode, then encode of the decoded pulses; with_bad plants one bad index (and one bad pulse
    row) on an odd lane, which only a complete warp reduction of the status bits reports."""
    g, m = plan.gen, plan.manifest
    groups = _codec_groups(plan, sms)
    V = pvq_cuda.pyramid_size(D, K)
    index = _rand_index(g, V, groups)
    bad = int(torch.randint(1, groups - 1, (1,), generator=g)) | 1
    sent = index.clone()
    if with_bad:
        sent[bad] = -1 - int(torch.randint(0, 5, (1,), generator=g))  # negative: wraps above V
    want = torch.ops.pvq_cuda.decode(index, D, K)
    if with_bad:
        want[bad] = 0
    cid = plan.new_id("decode")

    def check_decode(run, res):
        _check_codes(run, cid, "y", want, with_bad, f"D={D} K={K}")

    plan.add("decode", sms, "decode", check_decode, id=cid, threads_needed=groups, D=D, K=K, V=V, groups=groups,
             index=m.tensor(sent), out=m.out(cid, "y"), status=m.out(cid, "status"))

    pulses = torch.ops.pvq_cuda.decode(index, D, K)
    if with_bad:
        pulses[bad, 0] += 1 if pulses[bad, 0] >= 0 else -1  # sum |y| = K + 1
    want_index = index.clone()
    if with_bad:
        want_index[bad] = -1
    cid2 = plan.new_id("encode")

    def check_encode(run, res):
        _check_codes(run, cid2, "index", want_index, with_bad, f"D={D} K={K}")

    plan.add("encode", sms, "encode", check_encode, id=cid2, threads_needed=groups, D=D, K=K, groups=groups,
             pulses=m.tensor(pulses), out=m.out(cid2, "index"), status=m.out(cid2, "status"))


def search_case(plan: Plan, D: int, K: int, dtype: torch.dtype, sms: int, with_bad: bool) -> None:
    g, m = plan.gen, plan.manifest
    groups = _codec_groups(plan, sms)
    x = torch.randn(groups, D, generator=g)
    x[::7] *= torch.rand(x[::7].shape, generator=g) ** 4  # uneven magnitudes
    x[5] = 0
    x = x.to(dtype)
    bad = 2 * (groups // 3) + 1
    if with_bad:
        x[bad, D // 2] = float("nan") if sms % 2 else float("-inf")
    want = torch.ops.pvq_cuda.search(torch.nan_to_num(x, nan=0.0), K)
    if with_bad:
        want[bad] = 0
    cid = plan.new_id("search")

    def check_search(run, res):
        _check_codes(run, cid, "y", want, with_bad, f"D={D} K={K} {dtype}")

    plan.add("search", sms, "search", check_search, id=cid, threads_needed=groups, D=D, K=K,
             kind=emulation.kind(dtype), groups=groups, x=m.tensor(x), out=m.out(cid, "y"),
             status=m.out(cid, "status"))


def codec_cases(plan: Plan) -> None:
    """decode and encode for every D and K up to max_pulses(D); search for every D, several K, all dtypes."""
    i = 0
    for D in pvq_cuda.SUPPORTED_D:
        top = pvq_cuda.max_pulses(D)
        # 11 and 12: the last leaf size the decoder stages in shared memory and the first it splits.
        ks = sorted({k for k in (1, 5, 11, 12, 36, top) if k <= top})
        if not plan.full:
            ks = [k for k in ks if k in (5, top)] if plan.variant == "asan" else [top]
        for K in ks:
            i += 1
            decode_case(plan, D, K, plan.cycle_sms(i), with_bad=i % 2 == 0)
    for D in pvq_cuda.SUPPORTED_D:
        top = pvq_cuda.max_pulses(D)
        ks = sorted({1, 5, 16, top} & set(range(1, top + 1)))
        dtypes = [torch.float32, torch.float16, torch.bfloat16]
        if plan.variant == "asan":
            ks = [16 if top >= 16 else top, top]
        elif plan.variant == "tsan":
            ks, dtypes = [min(16, top)], [dtypes[D.bit_length() % 3]]
        for K in ks:
            for dtype in dtypes:
                i += 1
                search_case(plan, D, K, dtype, plan.cycle_sms(i), with_bad=i % 3 == 0)


# ----- Packed layers --------------------------------------------------------------------------------------


@dataclass
class Layer:
    codes: torch.Tensor
    row_scale: torch.Tensor
    levels: torch.Tensor
    rows: int
    cols: int
    D: int
    K: int
    scale_bits: int

    @property
    def groups(self) -> int:
        return self.cols // self.D

    @property
    def index_bits(self) -> int:
        return pvq_cuda.index_bits(self.D, self.K)

    def args(self, m: emulation.Manifest) -> dict:
        return dict(codes=m.tensor(self.codes), row_scale=m.tensor(self.row_scale), levels=m.tensor(self.levels),
                    rows=self.rows, groups=self.groups, D=self.D, K=self.K, bits=self.index_bits + self.scale_bits,
                    index_bits=self.index_bits, count=pvq_cuda.pyramid_size(self.D, self.K))

    def cpu_args(self):
        return (self.codes, self.row_scale, self.levels)

    def dequantized(self) -> torch.Tensor:
        return torch.ops.pvq_cuda.pvq_dequantize(*self.cpu_args(), self.rows, self.cols, self.D, self.K,
                                                 self.scale_bits)


def random_layer(gen, rows: int, cols: int, D: int, K: int, scale_bits: int = 2) -> Layer:
    """Uniformly random codes (every index and gain equally likely), packed by the CPU op."""
    V = pvq_cuda.pyramid_size(D, K)
    ib = pvq_cuda.index_bits(D, K)
    scale_bits = min(scale_bits, 64 - ib)
    index = _rand_index(gen, V, rows * (cols // D)).reshape(rows, cols // D)
    gain = torch.randint(0, 2**scale_bits, index.shape, generator=gen)
    codes = torch.ops.pvq_cuda._pack_codes(index, gain, ib, scale_bits)
    sign = torch.where(torch.rand(rows, generator=gen) < 0.5, -1.0, 1.0)
    row_scale = (sign * (0.05 + torch.rand(rows, generator=gen))).half()
    levels = torch.sort(0.5 + torch.rand(2**scale_bits, generator=gen)).values
    return Layer(codes, row_scale, levels, rows, cols, D, K, scale_bits)


def quantized_layer(gen, rows: int, cols: int, preset: str) -> Layer:
    """A layer from the project's quantizer (realistic pulses: most leaves light, a few heavy)."""
    config = pvq_cuda.PVQConfig.preset(preset, rotate=False)
    q = pvq_cuda.quantize_weight(torch.randn(rows, cols, generator=gen), config)
    c = q.config
    return Layer(q.codes, q.row_scale, q.levels, rows, cols, c.D, c.K, c.scale_bits)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6))


def packed_cases(plan: Plan) -> None:
    g, m = plan.gen, plan.manifest
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    # Dequantize: every D, K up to its limit, rows not a multiple of 32, all three output types,
    # and row ranges.
    shapes = [(70, 1, 37), (45, 2, 23), (100, 4, 9), (33, 8, 16), (70, 16, 30), (64, 32, 11)]
    tops = {D: pvq_cuda.max_pulses(D) for D in pvq_cuda.SUPPORTED_D}
    i = 0
    for rows, D, K in shapes:
        for k in ([K, tops[D]] if plan.variant != "tsan" else [K]):
            layer = random_layer(g, rows, D * (11 + D % 5), D, k)
            full = layer.dequantized()
            # Any row range (launch_dequantize's contract), not only the 32-row tiles of the large-batch path.
            for r0, r1 in ([(0, rows), (32, rows), (5, rows - 3), (17, 31)] if rows > 32 else [(0, rows), (3, 9)]):
                for dtype in (dtypes if plan.variant != "tsan" else [dtypes[i % 3]]):
                    i += 1
                    dequantize_case(plan, layer, r0, r1, dtype, plan.cycle_sms(i), full)
    # Column batches with a short last batch on 16-byte aligned rows (full batches take the 16-byte
    # store path, the last one stores element by element): groups not a multiple of the batch
    # (32 bytes of a row: 16 groups at fp16 D=1, 8 at D=2, 4 at D=4, 2 at D=8; half as many at fp32).
    for rows, D, K, groups in [(40, 1, 37, 40), (45, 2, 23, 20), (70, 4, 9, 18), (70, 8, 16, 13)]:
        layer = random_layer(g, rows, D * groups, D, K)
        full = layer.dequantized()
        for r0, r1 in [(0, rows), (5, rows - 3)]:
            for dtype in (dtypes if plan.variant != "tsan" else [dtypes[i % 3]]):
                i += 1
                dequantize_case(plan, layer, r0, r1, dtype, plan.cycle_sms(i), full)
    # More (tile, column batch) items than one SM holds warps (at most 64): every warp's loop walks
    # several items, its batch counter carrying into the tile counter (20 batches a tile).
    layer = random_layer(g, 130, 8 * 40, 8, 16)
    dequantize_case(plan, layer, 0, 130, torch.float16, 1)
    # A corrupt code (index >= V, as raw codes or a wrong D/K can hold) decodes to zero weights and
    # never reads past the tables (packed_layer.h); the CPU op raises instead, so the expected
    # weights come from a valid copy with that group zeroed.
    for D, K in ([(8, 16), (16, 30)] if plan.variant != "tsan" else [(16, 30)]):
        layer, row, group = random_layer(g, 45, D * 13, D, K), 37, 5
        index, gain = torch.ops.pvq_cuda._unpack_codes(layer.codes, layer.rows, layer.groups, layer.index_bits,
                                                      layer.scale_bits)
        want = layer.dequantized()
        want[row, group * D:(group + 1) * D] = 0
        index[row, group] = pvq_cuda.pyramid_size(D, K)  # one past the last index
        corrupt = Layer(torch.ops.pvq_cuda._pack_codes(index, gain, layer.index_bits, layer.scale_bits),
                        layer.row_scale, layer.levels, layer.rows, layer.cols, D, K, layer.scale_bits)
        i += 1
        dequantize_case(plan, corrupt, 0, layer.rows, torch.float32, plan.cycle_sms(i), want)

    # Fused GEMV and finalize: every D, batch 1, 2, 4, 5, 16, all dtypes, with and without bias.
    # Group counts are not multiples of the 4 warps; rows not multiples of 32.
    batches = [1, 2, 4, 5, 16]
    gemv_layers = {D: random_layer(g, 70 + D, D * (37 + 2 * D), D, min(tops[D], 30 if D < 16 else 14))
                   for D in pvq_cuda.SUPPORTED_D}
    gemv_layers[16] = quantized_layer(g, 90, 16 * 41, "pvq-3.25")
    gemv_layers[8] = quantized_layer(g, 75, 8 * 67, "pvq8-3.25")
    for D, layer in gemv_layers.items():
        for M in batches:
            for dtype in dtypes:
                i += 1
                asan_set = ((1, dtypes[i % 3]), (5, torch.float16), (16, torch.float32))
                if plan.variant == "asan" and (M, dtype) not in asan_set:
                    continue
                if plan.variant == "tsan" and (M, dtype) not in ((4, dtypes[D.bit_length() % 3]),):
                    continue
                bias_dtype = [None, dtype, torch.float32][i % 3]
                gemv_case(plan, layer, M, dtype, bias_dtype, plan.cycle_sms(i))
    # The tables decoder (K above the staged decoder's range), every D that has such K.
    for j, D in enumerate(d for d in pvq_cuda.SUPPORTED_D if tops[d] > STAGED_MAX_K):
        if plan.variant == "tsan" and D != 16:
            continue
        layer = random_layer(g, 40 + 9 * j, D * (19 + 3 * j), D, min(tops[D], 40 + 11 * j))
        i += 1
        gemv_case(plan, layer, [1, 5, 16][j % 3], dtypes[i % 3], [None, torch.float32][j % 2], plan.cycle_sms(i))
    # The largest K the staged decoder takes (its records and the batch-16 sums above 48 KB).
    edge = random_layer(g, 70, 16 * 23, 16, STAGED_MAX_K)
    gemv_case(plan, edge, 16 if plan.variant != "tsan" else 4, torch.float16, None, plan.cycle_sms(i + 1))
    # Large layers at one SM: persistent blocks loop over many work items; with the tables decoder
    # the leaf table is at its largest budget (40 KB).
    if plan.variant != "tsan":
        big = quantized_layer(g, 640, 4096, "pvq-3.25")
        gemv_case(plan, big, 1, torch.float16, torch.float16, 1, loops=True)
        gemv_case(plan, big, 16, torch.bfloat16, None, 132)
        big8 = random_layer(g, 630, 8 * 480, 8, 16)
        gemv_case(plan, big8, 2, torch.float32, torch.float32, 1, loops=True)
        wide = random_layer(g, 600, 16 * 192, 16, 48)
        gemv_case(plan, wide, 1, torch.float16, torch.float16, 1, expect_largest_leaf=True)
    else:  # blocks that loop over work items reuse their cross-warp sums: the barrier TSan must see
        gemv_case(plan, random_layer(g, 320, 16 * 64, 16, 30), 5, torch.float16, torch.float32, 1, loops=True)

    # Large-batch path: dequantized tiles into a GEMM, several tiles and a partial last one.
    for j, (layer, M, dtype) in enumerate([(gemv_layers[16], 17, torch.float32), (gemv_layers[8], 33, torch.float16),
                                           (random_layer(g, 150, 4 * 40, 4, 20), 20, torch.bfloat16)]):
        if plan.variant == "tsan" and j > 0:
            continue
        i += 1
        x = torch.randn(M, layer.cols, generator=g).to(dtype)
        want = torch.ops.pvq_cuda.pvq_matmul(x, *layer.cpu_args(), None, None, layer.rows, layer.D, layer.K,
                                             layer.scale_bits)
        cid = plan.new_id("tiled")
        tile_weights = 64 * layer.cols  # 64-row tiles

        def check_tiled(run, res, cid=cid, want=want, dtype=dtype, layer=layer, M=M):
            got = run.output(f"{cid}.y", dtype, want.shape)
            err = _rel_err(got, want)
            assert err <= MATMUL_TOL[dtype], f"M={M} {dtype}: relative error {err:.2e} > {MATMUL_TOL[dtype]:.0e}"
            expected_tiles = math.ceil(layer.rows / 64)
            assert int(res["tiles"]) == expected_tiles > 1, f"{res['tiles']} tiles, expected {expected_tiles}"

        plan.add("tiled", plan.cycle_sms(i), "tiled_matmul", check_tiled, id=cid, kind=emulation.kind(dtype), M=M,
                 tile_weights=tile_weights, x=m.tensor(x), out=m.out(cid, "y"), **layer.args(m))


def grad_input_cases(plan: Plan) -> None:
    """pvq_matmul_grad_input's large-batch CUDA path: dequantized row tiles, each tile's GEMM
    accumulated in float32 (a host GEMM standing for cuBLAS), the Hadamard transform back to the
    input basis and the signed cast. Presets and random layers of every D, rows not multiples of
    32, batches 1 to 17, all dtypes, rotated (cols a Hadamard size) and not; tiles of 32 or 64 rows
    (2 or 3 tiles, the last partial) and one single-tile case."""
    g = plan.gen
    # (layer, M, dtype, rotated, tile rows or None for one tile)
    specs = [
        (lambda: quantized_layer(g, 90, 640, "pvq-3.25"), 1, torch.float32, True, 64),
        (lambda: quantized_layer(g, 75, 576, "pvq8-3.25"), 5, torch.float16, True, 32),
        (lambda: quantized_layer(g, 33, 16 * 37, "pvq-2.25"), 17, torch.bfloat16, False, 32),
        (lambda: quantized_layer(g, 71, 8 * 23, "pvq-4.25"), 3, torch.float32, False, 64),
        (lambda: random_layer(g, 150, 96, 4, 20), 3, torch.bfloat16, True, 64),
        (lambda: random_layer(g, 45, 320, 32, 11), 2, torch.float16, False, 32),
        (lambda: random_layer(g, 37, 12, 1, 37), 4, torch.float32, True, 32),
        (lambda: random_layer(g, 65, 2 * 20, 2, 23), 9, torch.float16, True, 32),
        (lambda: quantized_layer(g, 40, 640, "pvq-3.25"), 8, torch.float16, True, None),
    ]
    if plan.variant == "asan":
        specs = [specs[i] for i in (0, 2, 4, 5)]
    elif plan.variant == "tsan":
        specs = [specs[1]]
    for i, (make, M, dtype, rotated, tile) in enumerate(specs):
        grad_input_case(plan, make(), M, dtype, rotated, tile, plan.cycle_sms(i))


def grad_gemv_cases(plan: Plan) -> None:
    """The fused small-batch input gradient (then the same return to the input basis): every D at every
    batch bound it takes (1, 4, 8 rows; 4 at D=32) and between them, all dtypes, rotated and not; rows
    not multiples of 32, group counts not multiples of the 4 warps. Narrow tall layers cut their tiles
    into several ranges (the split sum) at every SM count; a wide one at 1 SM has every warp loop."""
    g = plan.gen
    tops = {D: pvq_cuda.max_pulses(D) for D in pvq_cuda.SUPPORTED_D}
    cols = {1: 20, 2: 40, 4: 96, 8: 576, 16: 640, 32: 320}  # Hadamard sizes: rotated cases need one
    layers = {D: random_layer(g, 70 + D, cols[D], D, min(tops[D], 30 if D < 16 else 14)) for D in cols}
    layers[16] = quantized_layer(g, 90, 640, "pvq-3.25")
    layers[8] = quantized_layer(g, 75, 576, "pvq8-3.25")
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    i = 0
    for D, layer in layers.items():
        batches = [1, 3, 4] if D == 32 else [1, 2, 4, 5, 8]
        for M in batches:
            i += 1
            if plan.variant == "asan" and M != batches[-1] and not (D == 16 and M == 1):
                continue
            if plan.variant == "tsan" and (D, M) not in ((16, 5), (4, 1)):
                continue
            grad_gemv_case(plan, layer, M, dtypes[i % 3], i % 2 == 0, plan.cycle_sms(i))
    narrow = random_layer(g, 650, 64, 16, 30)  # 21 tiles, 4 columns: few items, so the tiles split
    for j, sms in enumerate(SMS if plan.variant == "plain" else [2]):
        grad_gemv_case(plan, narrow, [8, 1, 5][j], dtypes[j], j != 1, sms, expect_splits=True)
    if plan.variant != "tsan":
        wide = quantized_layer(g, 200, 16 * 160, "pvq-3.25")  # 160 columns: more than a 1-SM grid's warps
        grad_gemv_case(plan, wide, 2, torch.bfloat16, True, 1, expect_loops=True)


def _grad_input_references(gen, layer: Layer, M: int, dtype: torch.dtype, rotated: bool):
    """(grad, signs or None, the CPU op's gradient, grad · Ŵ in float64 rotated back)."""
    grad = torch.randn(M, layer.rows, generator=gen).to(dtype)
    signs = torch.where(torch.rand(layer.cols, generator=gen) < 0.5, -1.0, 1.0) if rotated else None
    want = torch.ops.pvq_cuda.pvq_matmul_grad_input(grad, *layer.cpu_args(), signs, layer.cols, layer.D, layer.K,
                                                    layer.scale_bits)
    exact = grad.double() @ layer.dequantized().double()
    if rotated:
        exact = pvq_cuda.hadamard_transform(exact) * signs.double()
    return grad, signs, want, exact


def _check_grad_input(got: torch.Tensor, want: torch.Tensor, exact: torch.Tensor, where: str) -> None:
    """Within the GPU matmul tests' tolerance of the dtype, against the CPU op and float64."""
    assert float(exact.abs().max()) > 0, f"{where}: a zero gradient tests nothing"
    tol = MATMUL_TOL[got.dtype]
    for name, ref in (("the CPU op", want), ("float64 grad · W", exact)):
        err = _rel_err(got, ref)
        assert err <= tol, f"{where}: relative error {err:.2e} > {tol:.0e} against {name}"


def grad_gemv_case(plan: Plan, layer: Layer, M: int, dtype: torch.dtype, rotated: bool, sms: int,
                   expect_splits: bool = False, expect_loops: bool = False) -> None:
    """Against the CPU op (whose fused path this kernel mirrors) and grad · Ŵ in float64, within the GPU
    matmul tests' tolerances; expect_splits asserts split ranges (the split sum runs), expect_loops
    that the warps loop over work items."""
    m = plan.manifest
    grad, signs, want, exact = _grad_input_references(plan.gen, layer, M, dtype, rotated)
    cid = plan.new_id("grad_gemv")

    def check_grad_gemv(run, res, cid=cid, want=want, exact=exact):
        got = run.output(f"{cid}.gx", dtype, want.shape)
        where = (f"D={layer.D} K={layer.K} rows={layer.rows} cols={layer.cols} M={M} {dtype} rotated={rotated} "
                 f"plan={res}")
        _check_grad_input(got, want, exact, where)
        items = int(res["splits"]) * layer.groups
        if expect_splits:
            assert int(res["splits"]) > 1 and int(res["sum_blocks"]) > 0, f"{where}: the tiles were not split"
        if expect_loops:
            assert items > 4 * int(res["blocks"]), f"{where}: warps do not loop over work items"

    plan.add("grad_gemv", sms, "grad_gemv", check_grad_gemv, id=cid, kind=emulation.kind(dtype), M=M,
             grad=m.tensor(grad), signs="none" if signs is None else m.tensor(signs), out=m.out(cid, "gx"),
             **layer.args(m))


def grad_input_case(plan: Plan, layer: Layer, M: int, dtype: torch.dtype, rotated: bool, tile: int | None,
                    sms: int) -> None:
    """Against the CPU op and against grad · Ŵ from the dequantized weight in float64 (rotated back),
    within the GPU matmul tests' tolerances; the tile count as planned."""
    m = plan.manifest
    grad, signs, want, exact = _grad_input_references(plan.gen, layer, M, dtype, rotated)
    tile_rows = layer.rows if tile is None else tile
    tile_weights = (2**20 if tile is None else tile) * layer.cols
    expected_tiles = math.ceil(layer.rows / tile_rows)
    cid = plan.new_id("grad_input")

    def check_grad_input(run, res, cid=cid, want=want, exact=exact):
        got = run.output(f"{cid}.gx", dtype, want.shape)
        where = f"D={layer.D} K={layer.K} rows={layer.rows} cols={layer.cols} M={M} {dtype} rotated={rotated}"
        _check_grad_input(got, want, exact, where)
        assert int(res["tiles"]) == expected_tiles, f"{where}: {res['tiles']} tiles, expected {expected_tiles}"
        assert int(res["tile_rows"]) == tile_rows, f"{where}: tiles of {res['tile_rows']} rows, expected {tile_rows}"

    plan.add("grad_input", sms, "grad_input", check_grad_input, id=cid, kind=emulation.kind(dtype), M=M,
             tile_weights=tile_weights, grad=m.tensor(grad), signs="none" if signs is None else m.tensor(signs),
             out=m.out(cid, "gx"), **layer.args(m))


def dequantize_case(plan: Plan, layer: Layer, r0: int, r1: int, dtype: torch.dtype, sms: int,
                    full: torch.Tensor | None = None) -> None:
    """Rows [r0, r1) as dtype: fp32 is the CPU op's bit for bit, fp16/bf16 that float rounded once."""
    m = plan.manifest
    want = (layer.dequantized() if full is None else full)[r0:r1].to(dtype)
    cid = plan.new_id("dequantize")

    def check_dequantize(run, res):
        got = run.output(f"{cid}.w", dtype, want.shape)
        assert torch.equal(got, want), (f"D={layer.D} K={layer.K} {dtype} rows [{r0}, {r1}): "
                                         f"{(got != want).sum()} weights differ")

    tiles = (r1 - 1) // 32 - r0 // 32 + 1
    # A warp per (tile, column batch): a batch is 32 bytes of every row, or one group if that is more.
    batch = max(1, 32 // (layer.D * dtype.itemsize))
    batches = -(-layer.groups // batch)
    plan.add("dequantize", sms, "dequantize", check_dequantize, id=cid, threads_needed=tiles * batches * 32,
             kind=emulation.kind(dtype), row_begin=r0, row_end=r1, out=m.out(cid, "w"), **layer.args(m))


def gemv_case(plan: Plan, layer: Layer, M: int, dtype, bias_dtype, sms: int, expect_largest_leaf: bool = False,
              loops: bool = False):
    """The fused GEMV and its finalize against the CPU op; expect_largest_leaf also asserts that the
    blocks loop over several work items (loops: over more than one) and stage the largest leaf
    prefix the budget allows."""
    g, m = plan.gen, plan.manifest
    x = torch.randn(M, layer.cols, generator=g).to(dtype)
    bias = None if bias_dtype is None else torch.randn(layer.rows, generator=g).to(bias_dtype)
    want = torch.ops.pvq_cuda.pvq_matmul(x, *layer.cpu_args(), None, bias, layer.rows, layer.D, layer.K,
                                         layer.scale_bits)
    cid = plan.new_id("gemv")

    def check_gemv(run, res, cid=cid, want=want):
        got = run.output(f"{cid}.y", dtype, want.shape)
        err = _rel_err(got, want)
        where = f"D={layer.D} K={layer.K} M={M} {dtype} bias={bias_dtype} plan={res}"
        assert err <= MATMUL_TOL[dtype], f"{where}: relative error {err:.2e} > {MATMUL_TOL[dtype]:.0e}"
        items = math.ceil(layer.rows / 32) * int(res["splits"])
        assert res["staged"] == str(int(layer.K <= STAGED_MAX_K)), f"{where}: wrong decoder"
        rounds = math.ceil(items / int(res["blocks"]))  # no tail: each block runs rounds or rounds - 1 items
        assert int(res["blocks"]) * rounds - items < rounds, f"{where}: unbalanced work split"
        if expect_largest_leaf:
            assert items > 2 * int(res["blocks"]), f"{where}: blocks do not loop over several items"
            assert int(res["smem_leaf_k"]) == LARGEST_LEAF_K[(layer.D, layer.K)], f"{where}: leaf table not largest"
        if loops:
            assert items > int(res["blocks"]), f"{where}: blocks do not loop over items"

    args = dict(x=m.tensor(x), M=M, kind=emulation.kind(dtype), out=m.out(cid, "y"), **layer.args(m))
    args["bias"] = "none" if bias is None else m.tensor(bias)
    if bias is not None:
        args["bias_kind"] = emulation.kind(bias_dtype)
    plan.add("gemv", sms, "gemv", check_gemv, id=cid, **args)


# leaf_prefix_k(D, K, 40960 bytes): the largest leaf prefix the GEMV's budget allows. Leaf words
# per k are V(4, k); the prefix of k' <= k takes sum V(4, k') words.
def _largest_leaf_k(K: int, budget: int = 40960) -> int:
    k, total = -1, 0
    while k < min(K, 16) and (total + pvq_cuda.pyramid_size(4, k + 1)) * 4 <= budget:
        k += 1
        total += pvq_cuda.pyramid_size(4, k)
    return k


LARGEST_LEAF_K = {(16, 48): _largest_leaf_k(48)}
# The GEMV's staged decoder takes K up to this (csrc/packed/staged_decode.cuh, kStagedMaxK); above it
# the tables decoder runs.
STAGED_MAX_K = 35


# ----- Hadamard and Hessian -------------------------------------------------------------------------------


def hadamard_case(plan: Plan, n: int, dtype: torch.dtype, with_signs: bool, rows: int, sms: int) -> None:
    """Bit for bit against the CPU op (both add in the same order and round once)."""
    g, m = plan.gen, plan.manifest
    x = (torch.randn(rows, n, generator=g) * 4).to(dtype)
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if with_signs else None
    want = pvq_cuda.hadamard_transform(x, signs)
    cid = plan.new_id("hadamard")

    def check_hadamard(run, res):
        got = run.output(f"{cid}.y", dtype, want.shape)
        assert torch.equal(got, want), f"n={n} {dtype} signs={with_signs}: {(got != want).sum()} values differ"

    plan.add("hadamard", sms, "hadamard", check_hadamard, id=cid, kind=emulation.kind(dtype), rows=rows, n=n,
             x=m.tensor(x), signs="none" if signs is None else m.tensor(signs), out=m.out(cid, "y"))


def hadamard_cases(plan: Plan) -> None:
    """Every base m, several 2^p, the largest n (132 KB of shared memory: the > 48 KB opt-in), all dtypes."""
    bases = pvq_cuda.HADAMARD_BASES
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    ns = []
    for base in bases:
        ps = [0, 1, 3, 5, 8] if plan.variant != "tsan" else [3]
        ns += [base << p for p in ps if base << p <= pvq_cuda.HADAMARD_MAX_N]
    ns += [4096, 14336, 32768] if plan.variant != "tsan" else [32768]
    i = 0
    for j, n in enumerate(ns):
        for dtype in dtypes:
            i += 1
            with_signs = (i + j) % 2 == 0  # each dtype meets both, over the sizes
            if plan.variant == "asan" and i % 2 != 0 and n not in (32768, 14336):
                continue
            if plan.variant == "tsan" and dtype != dtypes[j % 3]:
                continue
            # Full tiles of ~8192 elements and a partial one (odd row counts hit partial windows).
            rows = (max(3, 3 * 8192 // n) + 5) if plan.variant != "tsan" else max(2, 8192 // n + 3)
            hadamard_case(plan, n, dtype, with_signs, rows, plan.cycle_sms(i))


def hessian_case(plan: Plan, n: int, tokens: int, dtype: torch.dtype, sms: int) -> None:
    """H0 + x^T x against fp64 and against the CPU op, within the GPU tests' 1e-6; exactly symmetric."""
    g, m = plan.gen, plan.manifest
    x = (torch.randn(tokens, n, generator=g) + 0.5).to(dtype)  # non-zero mean: large diagonals
    H0 = torch.randn(n, n, generator=g)
    H0 = H0 @ H0.T
    ref = H0.double() + x.double().T @ x.double()
    cpu = H0.clone()
    pvq_cuda.hessian_accumulate_(cpu, x)
    cid = plan.new_id("hessian")

    def check_hessian(run, res):
        got = run.output(f"{cid}.H", torch.float32, (n, n))
        fp64 = float((got.double() - ref).norm() / ref.norm())
        vs_cpu = float((got.double() - cpu.double()).norm() / cpu.double().norm())
        where = f"n={n} tokens={tokens} {dtype}"
        assert fp64 <= HESSIAN_REL_TOL, f"{where}: error {fp64:.2e} against fp64"
        assert vs_cpu <= HESSIAN_REL_TOL, f"{where}: differs from the CPU op by {vs_cpu:.2e}"
        assert torch.equal(got, got.T), f"{where}: not symmetric"

    plan.add("hessian", sms, "hessian", check_hessian, id=cid, kind=emulation.kind(dtype), tokens=tokens, n=n,
             x=m.tensor(x), H=m.tensor(H0), out=m.out(cid, "H"))


def hessian_cases(plan: Plan) -> None:
    # n = 257: a last tile one column wide; tokens past a 64-token chunk.
    shapes = [(1, 5), (70, 300), (130, 133), (257, 70)] if plan.variant == "plain" else [(1, 5), (70, 100)]
    for i, (n, tokens) in enumerate(shapes):
        for dtype in (torch.float16, torch.bfloat16):
            hessian_case(plan, n, tokens, dtype, SMS[i % 3] if plan.full else 2)


# ----- Activations ----------------------------------------------------------------------------------------

# encode_activations' flags per token (activation/launchers.h: TokenFlag).
TOKEN_NON_FINITE, TOKEN_SCALE_OVERFLOW = 1, 2


def activation_input(gen, tokens: int, n: int) -> torch.Tensor:
    """Activation-like tokens: Gaussian, a few outlier channels 20x larger, uneven token norms, one
    all-zero token."""
    x = torch.randn(tokens, n, generator=gen)
    outliers = torch.randperm(n, generator=gen)[: max(1, n // 64)]
    x[:, outliers] *= 20
    x *= torch.rand(tokens, 1, generator=gen) * 4 + 0.05
    x[tokens // 2] = 0
    return x


def encode_activations_case(plan: Plan, n: int, config, dtype: torch.dtype, with_signs: bool, tokens: int,
                            sms: int, bad: str | None = None, tiles_per_block: bool = False) -> None:
    """Every output of the fused kernel (pulses, index, gain code, fp16 scale bits, flags) equals the CPU
    op's bit for bit. bad plants one token with NaN, Inf or (fp32) a norm past fp16's range: the CPU op
    raises for it, so its expected codes are the CPU kernel's zeros (non-finite) or those of the same
    token scaled down by 2^-24 (overflow: scaling by a power of two changes no code, only the scale).
    tiles_per_block also asserts that the persistent grid is smaller than the tiles, so blocks reuse
    their shared memory for a second tile."""
    g, m = plan.gen, plan.manifest
    x = activation_input(g, tokens, n).to(dtype)
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if with_signs else None
    levels = activation_levels(config, n)
    D, K, gain_bits = config.D, config.K, config.gain_bits
    row = tokens - 2
    sent = x.clone()
    if bad == "nan":
        sent[row, n // 3] = float("nan")
    elif bad == "inf":
        sent[row, n - 1] = float("-inf")
    elif bad == "overflow":
        assert dtype == torch.float32
        sent[row] = x[row] * 2.0**24
    pulses, index, gain, scale = torch.ops.pvq_cuda.encode_activations(x, signs, levels, D, K, gain_bits)
    scale = scale.view(torch.int16)
    flags = torch.zeros(tokens, dtype=torch.int32)
    if bad in ("nan", "inf"):
        pulses[row], index[row], gain[row], scale[row], flags[row] = 0, 0, 0, 0, TOKEN_NON_FINITE
    elif bad == "overflow":
        flags[row] = TOKEN_SCALE_OVERFLOW
    cid = plan.new_id("encode_activations")
    where = f"n={n} D={D} K={K} gain_bits={gain_bits} {dtype} signs={with_signs} tokens={tokens} bad={bad}"

    def check_encode_activations(run, res):
        got_flags = run.output(f"{cid}.flags", torch.int32, (tokens,))
        assert torch.equal(got_flags, flags), f"{where}: flags {got_flags.nonzero().flatten().tolist()}"
        got_scale = run.output(f"{cid}.scale", torch.int16, (tokens,))
        if bad == "overflow":  # the scale past fp16's range is +Inf, the other tokens' as on the CPU
            assert int(got_scale[row]) == 0x7C00, f"{where}: overflowing scale {int(got_scale[row]):#x}"
            got_scale[row] = scale[row]
        for name, want, dt in (("pulses", pulses, torch.int8), ("index", index, torch.int64),
                               ("gain", gain, torch.uint8), ("scale", scale, torch.int16)):
            got = got_scale if name == "scale" else run.output(f"{cid}.{name}", dt, want.shape)
            diff = (got != want).reshape(tokens, -1).any(1)
            assert not diff.any(), (f"{where}: {name} differs in {int(diff.sum())} tokens "
                                    f"(first {int(diff.nonzero()[0])})")
        if tiles_per_block:
            tiles = math.ceil(tokens / _encoder_tile_rows(n))
            grid = run.launches[cid][0]["grid"][0]
            assert grid < tiles, f"{where}: {grid} blocks for {tiles} tiles: no block loops"

    plan.add("encode_activations", sms, "encode_activations", check_encode_activations, id=cid,
             kind=emulation.kind(dtype), tokens=tokens, n=n, D=D, K=K, level_count=2**gain_bits,
             x=m.tensor(sent), signs="none" if signs is None else m.tensor(signs), levels=m.tensor(levels),
             pulses=m.out(cid, "pulses"), index=m.out(cid, "index"), gain=m.out(cid, "gain"),
             scale=m.out(cid, "scale"), flags=m.out(cid, "flags"))


def _encoder_tile_rows(n: int) -> int:
    """hadamard_tile's tile_rows: tokens per tile, whole 32-element windows, about 8192 elements."""
    unit = 32 // math.gcd(n, 32)
    return 1 if n >= 8192 else 8192 // n // unit * unit


def encode_activations_cases(plan: Plan) -> None:
    """Every activation preset and every other D, hidden sizes with every Hadamard base m (576 = 36·16,
    1536 = 12·128, 3840 = 60·64, ...), the smallest and the largest n, tokens that leave the last
    tile partial, all three dtypes, with and without signs, and bad tokens."""
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    presets = [ActivationConfig.preset(name) for name in ACT_PRESETS]
    others = [ActivationConfig(D=1, K=3, gain_bits=2), ActivationConfig(D=4, K=40, gain_bits=0),
              ActivationConfig(D=16, K=50, gain_bits=5), ActivationConfig(D=32, K=21, gain_bits=3)]
    shapes = [(576, presets[0]), (1536, presets[1]), (3840, presets[2]), (4096, presets[3]), (1664, others[2]),
              (448, others[3]), (2560, presets[0]), (12, others[0]), (640, others[1]), (8192, presets[1]),
              (32768, presets[0]), (1280, presets[3])]
    if plan.variant == "asan":
        shapes = [shapes[i] for i in (0, 2, 5, 7, 10)]
    elif plan.variant == "tsan":
        shapes = [(576, presets[0]), (12, others[0])]
    for i, (n, config) in enumerate(shapes):
        rows = _encoder_tile_rows(n)
        tokens = rows + rows // 2 + 1 if n < 8192 else 3
        if plan.variant != "plain":
            tokens = min(tokens, rows + 1)
        if n == 32768:
            tokens = 2
        dtype = dtypes[i % 3]
        bad = [None, "nan", None, "inf"][i % 4] if plan.variant == "plain" else None
        encode_activations_case(plan, n, config, dtype, i % 2 == 0, tokens, plan.cycle_sms(i), bad)
    if plan.variant == "plain":
        encode_activations_case(plan, 1024, presets[0], torch.float32, True, 9, 2, "overflow")
    # At one SM, 8 tokens a tile: more tiles than resident blocks, so blocks loop (the barrier that ends
    # a tile guards the next one's shared memory: what TSan must see).
    encode_activations_case(plan, 1024, presets[1], torch.float16, False, 8 * 6 + 3, 1, tiles_per_block=True)


def _decoded_activations(pulses, gain, scale, levels, act_D: int, invalid: torch.Tensor):
    """(float32 x̂', float32 factor per group) as the CPU kernel's factors give them: group_factor(a,
    level, |y|^2) = (a · level) · fl(1/sqrt(|y|^2)), each product rounded once
    (activation/activation_code.h), then one product per pulse. An invalid group's factor is 0 (the
    decoder's rule), its x̂' 0 · y (signed zeros)."""
    y = pulses.view(*pulses.shape[:-1], -1, act_D)
    sq = y.long().square().sum(-1)
    inv_norm = torch.where(sq > 0, 1.0 / sq.double().clamp_min(1).sqrt(), 0.0).float()
    level = levels[gain.long().clamp_max(levels.shape[0] - 1)]
    f = torch.where(invalid, 0.0, (scale.float().unsqueeze(-1) * level) * inv_norm)
    return (f.unsqueeze(-1) * y.float()).view(pulses.shape), f


def wa_matmul_case(plan: Plan, layer: Layer, config, M: int, with_bias: bool, sms: int, bad: str | None = None,
                   exact: bool = False, tile_weights: int = 1 << 25) -> None:
    """wa_matmul's CUDA path (decode_activations_kernel, then the fp32 GEMV or, above 16 tokens, the
    tiles): x̂' equals the CPU factors' bit for bit, the invalid-group flags are exact, and the
    product is within the float32 bound of a float64 product of x̂' and the layer's weights, as the
    CPU op is. bad plants a group whose pulses do not sum to act_K ("sum") or a gain code past the
    levels ("gain"): the CPU op raises for it; here it is flagged and counts as zeros. exact: a
    one-group layer, whose output divided by the float64 factors is the integer pulse dot product."""
    g, m = plan.gen, plan.manifest
    n, act_D, act_K, gain_bits = layer.cols, config.D, config.K, config.gain_bits
    x = activation_input(g, M, n)
    levels = activation_levels(config, n)
    pulses, _, gain, scale = torch.ops.pvq_cuda.encode_activations(x, None, levels, act_D, act_K, gain_bits)
    bias = torch.randn(layer.rows, generator=g) if with_bias else None
    want_cpu = torch.ops.pvq_cuda.wa_matmul(pulses, gain, scale, levels, *layer.cpu_args(), bias, layer.rows,
                                            layer.D, layer.K, layer.scale_bits, act_D, act_K)
    Ga = n // act_D
    flags = torch.zeros(M, Ga, dtype=torch.uint8)
    sent_pulses, sent_gain = pulses.clone(), gain.clone()
    if bad is not None:
        t, j = M - 1, Ga // 2
        flags[t, j] = 1
        if bad == "sum":
            d = int(sent_pulses[t, j * act_D:(j + 1) * act_D].abs().argmax()) + j * act_D
            sent_pulses[t, d] += 1 if sent_pulses[t, d] >= 0 else -1
        else:
            sent_gain[t, j] = 2**gain_bits
            assert 2**gain_bits < 256
    xhat, factor = _decoded_activations(sent_pulses, sent_gain, scale, levels, act_D, flags.bool())
    weights = layer.dequantized().double()
    want = xhat.double() @ weights.T + (0 if bias is None else bias.double())
    # Any order of n fp32 FMAs, the cross-warp and split sums and the row scale: (n + 64) u of the
    # absolute products; the weights' own fp32 rounding (dequantized() rounds each once) 2 u more.
    bound = (n + 66) * 2.0**-24 * (xhat.double().abs() @ weights.abs().T) + 2.0**-24 * (
        0 if bias is None else bias.double().abs())
    cid = plan.new_id("wa_matmul")
    where = f"D={layer.D} K={layer.K} act={config} M={M} bias={with_bias} bad={bad}"

    def check_wa_matmul(run, res):
        got_x = run.output(f"{cid}.xhat", torch.float32, (M, n))
        diff = (got_x.view(torch.int32) != xhat.view(torch.int32)).any(1)
        assert not diff.any(), f"{where}: x̂ differs from the CPU factors' in {int(diff.sum())} tokens"
        got_flags = run.output(f"{cid}.bad", torch.uint8, (M, Ga))
        assert torch.equal(got_flags, flags), f"{where}: flagged groups {got_flags.nonzero().tolist()}"
        got = run.output(f"{cid}.y", torch.float32, (M, layer.rows)).double()
        excess = float(((got - want).abs() - bound).max())
        assert excess <= 0, f"{where}: past the float32 bound of the float64 product by {excess:.3e}"
        if bad is None:  # the CPU op: within its own bound of the same product, so within both of the kernel
            excess = float(((got - want_cpu.double()).abs() - 2 * bound).max())
            assert excess <= 0, f"{where}: past twice the bound from the CPU op by {excess:.3e}"
        assert res["path"] == ("gemv" if M <= 16 else "tiled"), f"{where}: {res}"
        if exact:
            index, wgain = torch.ops.pvq_cuda._unpack_codes(layer.codes, layer.rows, layer.groups, layer.index_bits,
                                                           layer.scale_bits)
            yw = pvq_cuda.decode(index.flatten(), layer.D, layer.K).view(layer.rows, layer.D)
            fw = (layer.row_scale.double() * layer.levels.double()[wgain.flatten().long()]
                  / yw.double().square().sum(-1).sqrt())
            live = factor[:, 0] != 0  # the all-zero token has scale 0
            dots = (sent_pulses.long() @ yw.long().T)[live]
            assert bool((dots != 0).any()) and int(live.sum()) >= M - 1
            recovered = torch.round(got[live] / (factor[live, 0].double()[:, None] * fw[None, :])).long()
            assert torch.equal(recovered, dots), f"{where}: integer dot products not recovered exactly"

    args = dict(M=M, act_D=act_D, act_K=act_K, level_count=2**gain_bits, pulses=m.tensor(sent_pulses),
                gain=m.tensor(sent_gain), scale=m.tensor(scale), act_levels=m.tensor(levels),
                tile_weights=tile_weights, xhat=m.out(cid, "xhat"), bad=m.out(cid, "bad"), out=m.out(cid, "y"),
                **layer.args(m))
    args["bias"] = "none" if bias is None else m.tensor(bias)
    plan.add("wa_matmul", sms, "wa_matmul", check_wa_matmul, id=cid, **args)


def wa_matmul_cases(plan: Plan) -> None:
    """Every activation preset against the pvq-3.25 and pvq8-3.25 layers the quantizer makes, group
    sizes that differ both ways, batches 1, 5 and 16 on the GEMV and 20 on the tiles, both bad-code
    kinds, and one-group layers whose integer dot products come back exactly."""
    g = plan.gen
    presets = [ActivationConfig.preset(name) for name in ACT_PRESETS]
    l16 = quantized_layer(g, 70, 16 * 36, "pvq-3.25")
    l8 = quantized_layer(g, 45, 8 * 72, "pvq8-3.25")
    cases = [(l16, presets[0], 1, True, None), (l16, presets[1], 5, False, "sum"), (l16, presets[3], 16, True, None),
             (l8, presets[2], 3, True, "gain"), (l8, ActivationConfig(D=16, K=30, gain_bits=5), 4, False, None),
             (l16, presets[0], 20, True, None), (random_layer(g, 50, 32 * 18, 32, 20), presets[2], 3, True, None),
             (random_layer(g, 40, 4 * 144, 4, 40), ActivationConfig(D=32, K=21, gain_bits=3), 16, False, "sum")]
    if plan.variant == "asan":
        cases = [cases[i] for i in (0, 3, 5, 7)]
    elif plan.variant == "tsan":
        cases = [cases[1]]
    for i, (layer, config, M, with_bias, bad) in enumerate(cases):
        wa_matmul_case(plan, layer, config, M, with_bias, plan.cycle_sms(i), bad,
                       tile_weights=32 * layer.cols if M > 16 else 1 << 25)
    if plan.variant == "plain":
        for D in (8, 16):
            one = random_layer(g, 40, D, D, 20)
            wa_matmul_case(plan, one, ActivationConfig(D=D, K=17, gain_bits=3), 7, False, plan.cycle_sms(D),
                           exact=True)


def table_cases(plan: Plan) -> None:
    def check_tables(run, res):
        assert res["equal"] == "1", "the device tables differ from the host's"
        assert res["cached"] == "1", "a second request uploaded the tables again"
        assert res["leaf_max_k"] == "16", res
        assert res["bad_device"] == res["past_last_device"] == "cudaErrorInvalidDevice", res

    plan.add("tables", 2, "tables", check_tables, id=plan.new_id("tables"))


FAMILIES = {"codec": codec_cases, "packed": packed_cases, "grad_input": grad_input_cases,
            "grad_gemv": grad_gemv_cases, "hadamard": hadamard_cases, "hessian": hessian_cases,
            "encode_activations": encode_activations_cases, "wa_matmul": wa_matmul_cases, "tables": table_cases}


# ----- Running --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def emulated(request, tmp_path_factory):
    """The emulator run of every variant this session's tests ask for, all cases of a variant in one
    process; the processes run side by side."""
    require_toolchain()
    wanted = {item.callspec.params.get("variant", "plain") if hasattr(item, "callspec") else "plain"
              for item in request.session.items if "emulated" in getattr(item, "fixturenames", ())} or {"plain"}
    variants = [v for v in VARIANTS if v in wanted]
    builds = emulation.build_all(variants)
    # One CPU per process where there are three; with two, the plain build (the most cases) gets
    # one and the two sanitizer builds share the other (their totals are about equal).
    cpus = sorted(os.sched_getaffinity(0))
    cpu_of = {"plain": 0, "asan": 1, "tsan": 2 if len(cpus) > 2 else 1}
    plans, procs = {}, {}
    for variant in variants:
        workdir = tmp_path_factory.mktemp(f"emulation-{variant}")
        plan = Plan(emulation.Manifest(workdir), variant, torch.Generator().manual_seed(SEED))
        for make in FAMILIES.values():
            make(plan)
        plans[variant] = plan
        procs[variant] = emulation.start(builds[variant], plan.manifest, cpus[cpu_of[variant] % len(cpus)])
    return {v: (plans[v], emulation.finish(procs[v])) for v in variants}


def _check_family(emulated, variant: str, family: str) -> None:
    plan, run = emulated[variant]
    cases = [c for c in plan.cases if c.family == family]
    assert cases, f"no {family} case in the {variant} build"
    failures = []
    for case in cases:
        res = run.results.get(case.id)
        if res is None:
            continue  # the process stopped before it; reported below
        if res.get("error") != "cudaSuccess":
            failures.append(f"{case.id} (SMs {case.sms}): launcher returned {res.get('error')}")
            continue
        try:
            case.check(run, res)
        except AssertionError as e:
            failures.append(f"{case.id} (SMs {case.sms}): {e}")
    missing = [c.id for c in cases if c.id not in run.results]
    if missing or run.returncode != 0:
        failures.append(f"{len(missing)} case(s) without a result (first: {missing[:1]}); {run.describe()}")
    assert not failures, f"{variant} build, seed {SEED}:\n" + "\n".join(failures[:20])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", ["decode", "encode", "search", "dequantize", "gemv", "tiled", "grad_input",
                                    "grad_gemv", "hadamard", "hessian", "encode_activations", "wa_matmul",
                                    "tables"])
def test_emulated_kernels_match_cpu(emulated, variant, family):
    _check_family(emulated, variant, family)


def test_every_sm_count_and_grid_stride_wrap(emulated):
    """The plain build runs every kernel at 1, 2 and 132 SMs; at 1 and 2 SMs the persistent grid of
    each grid-stride kernel is smaller than its work, so every thread's loop runs more than once (the
    GEMV's blocks loop over work items in the large-layer cases, checked there)."""
    plan, run = emulated["plain"]
    sms_seen, wrapped = {}, {}
    for case in plan.cases:
        for launch in run.launches.get(case.id, []):
            name = re.search(r"::(\w+_kernel)\b", launch["kernel"]).group(1)
            sms_seen.setdefault(name, set()).add(launch["sms"])
            if case.threads_needed is not None and name.startswith(case.family) and case.sms < 132:
                threads = launch["grid"][0] * launch["block"][0]
                wrapped.setdefault((name, case.sms), []).append(threads < case.threads_needed)
    for kernel in ("decode_kernel", "encode_kernel", "search_kernel", "dequantize_kernel", "gemv_kernel",
                   "finalize_kernel", "grad_gemv_kernel", "split_sum_kernel", "signed_cast_kernel",
                   "hadamard_kernel", "hessian_kernel", "encode_activations_kernel", "decode_activations_kernel"):
        assert sms_seen.get(kernel) == set(SMS), f"{kernel} ran at SM counts {sms_seen.get(kernel)}"
    for kernel in ("decode_kernel", "encode_kernel", "search_kernel"):
        for sms in (1, 2):
            assert wrapped.get((kernel, sms)) and all(wrapped[(kernel, sms)]), (kernel, sms, wrapped.get((kernel, sms)))
    assert any(wrapped.get(("dequantize_kernel", 1), [])), "no dequantize case wraps at 1 SM"

