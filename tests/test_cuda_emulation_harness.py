"""The CUDA emulator's own semantics, against what the CUDA documentation specifies (expected values
computed here independently): intrinsics, warp collectives, atomics, shared-memory poison, the WMMA
layout scrambling, launch limits and occupancy, and each programming-model violation it must stop
on. The kernels are tests/cuda_emulation/selftest.cu."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch  # noqa: F401  (test_cuda_emulation needs it first)

from test_cuda_emulation import require_toolchain

import emulation  # noqa: E402  (on sys.path once test_cuda_emulation is imported)

VALUE_TESTS = ["intrinsics", "collectives", "atomics", "poison", "wmma_layout", "wmma_mma", "limits"]
POISON_WORD = 0x7FA5A5A5


@pytest.fixture(scope="module")
def selftests(tmp_path_factory):
    """Every value self-test in each build (the sanitizers also watch the harness's own code)."""
    require_toolchain()
    builds = emulation.build_all(list(emulation.VARIANTS))
    runs = {}
    for variant, build in builds.items():
        m = emulation.Manifest(tmp_path_factory.mktemp(f"selftest-{variant}"))
        for name in VALUE_TESTS:
            m.command("selftest", id=name, name=name)
        runs[variant] = emulation.run(build, m)
    return runs


def _values(run, name: str, key: str, dtype=int) -> list:
    assert run.returncode == 0, run.describe()
    return [dtype(v) for v in run.results[name][key].split(",")]


def _u64(x: int) -> int:
    return x % 2**64


@pytest.mark.parametrize("variant", list(emulation.VARIANTS))
def test_intrinsics(selftests, variant):
    lo, hi = 0x89ABCDEF, 0x01234567
    pair = hi << 32 | lo
    want = [
        17, 40, 32, 15, 63, 0, 5, 41,
        0x80000000, int(f"{0x12345678:032b}"[::-1], 2), int(f"{0x8000000000000003:064b}"[::-1], 2),
        (pair << 8 >> 32) & 0xFFFFFFFF, (pair << 8 >> 32) & 0xFFFFFFFF, lo,  # _l by 8, by 40 mod 32, _lc clamped
        (pair >> 8) & 0xFFFFFFFF, hi,                                           # _r by 8, _rc by 40 clamped
        (0xFEDCBA9876543210 * 0x0123456789ABCDEF) >> 64, _u64((-5 * 0x7FFFFFFFFFFFFFFF) >> 64),
        (0xFFFFFFFF * 0xFFFFFFFE) >> 32, _u64((-7 * 0x40000000) >> 32),
        0xBFC00000, POISON_WORD, 0x7BFF, 0x3F80, 17,
    ]
    assert _values(selftests[variant], "intrinsics", "values") == want


@pytest.mark.parametrize("variant", list(emulation.VARIANTS))
def test_warp_collectives(selftests, variant):
    got = np.array(_values(selftests[variant], "collectives", "values")).reshape(64, 12)
    for t in range(64):
        w, lane = divmod(t, 32)
        v = lambda src: 100 * w + src  # noqa: E731
        seg8, seg16 = lane & ~7, lane & ~15
        as_int = lambda u: u - 2**32 if u >= 2**31 else u  # noqa: E731
        want = [
            v(lane * 7 % 32),
            v(seg8 + (lane + 3) % 8),                        # idx: modulo the width
            v(lane - 3) if lane - 3 >= seg16 else v(lane),   # up: below the segment keeps its own
            v(lane + 5) if lane + 5 <= 31 else v(lane),      # down: past the warp keeps its own
            v(lane ^ 9),
            v(lane ^ 16) if lane >= 16 else v(lane),         # xor: a later segment keeps its own
            as_int(sum(1 << k for k in range(0, 32, 3))),
            int(w == 0), 1,
            v(15) if lane < 16 else v(16),                   # two half-warp collectives at once
            as_int(0xAAAA if lane < 16 else 0xAAAA0000),
            int(2.5 * v(31)),
        ]
        assert list(got[t]) == want, f"thread {t}"


@pytest.mark.parametrize("variant", list(emulation.VARIANTS))
def test_atomics(selftests, variant):
    run = selftests[variant]
    threads = 1024
    xor = 0
    for t in range(threads):
        xor ^= t
    ints = _values(run, "atomics", "ints")
    assert ints[:6] == [threads, threads - 1, -(threads - 1), 2**31 - 1, -(2**31), xor]
    assert 1 <= ints[6] <= threads and ints[7] == 1, "exactly one atomicCAS swaps, writing its t + 1"
    assert ints[8] == 7
    assert int(run.results["atomics"]["ull"]) == threads << 33
    assert float(run.results["atomics"]["float"]) == threads * 0.5


@pytest.mark.parametrize("variant", list(emulation.VARIANTS))
def test_shared_memory_starts_poisoned_in_every_block(selftests, variant):
    # Block 0 reads, then zeroes, a static and a dynamic word; blocks 1 and 2 read poison again.
    assert _values(selftests[variant], "poison", "words") == [POISON_WORD] * 6


@pytest.mark.parametrize("variant", list(emulation.VARIANTS))
def test_wmma_fragments_are_scrambled_permutations(selftests, variant):
    a = _values(selftests[variant], "wmma_layout", "a", float)
    c = _values(selftests[variant], "wmma_layout", "c", float)
    # Every tile element in exactly one lane slot ...
    assert sorted(a) == list(range(256)) and sorted(c) == list(range(256))
    # ... but not where a row-major or column-major guess puts it, and differently for a and c.
    for layout in (a, c):
        assert sum(x == i for i, x in enumerate(layout)) < 16
        assert sum(x == (i % 16) * 16 + i // 16 for i, x in enumerate(layout)) < 16
    assert a != c


@pytest.mark.parametrize("variant", list(emulation.VARIANTS))
def test_wmma_mma_is_exact_for_small_integers(selftests, variant):
    i = np.arange(256)
    A = (i % 7 - 3).reshape(16, 16)                  # row-major
    B = (i % 5 - 2).reshape(16, 16).T                # stored column-major
    C = (i % 11).reshape(16, 16)
    D = np.array(_values(selftests[variant], "wmma_mma", "D", float)).reshape(2, 16, 16)  # per warp, column-major
    for warp in range(2):
        assert np.array_equal(D[warp].T, A @ B + C), f"warp {warp}"


def test_launch_limits_and_occupancy(selftests):
    res = selftests["plain"].results["limits"]
    assert res["threads_1024"] == "cudaSuccess"
    for key in ("threads_1025", "block_32x32x2", "block_z65", "grid_y65536"):
        assert res[key] == "cudaErrorInvalidConfiguration", key
    assert res["smem_48k"] == "cudaSuccess" and res["smem_48k_plus_1"] == "cudaErrorInvalidValue"
    assert res["optin_227k"] == "cudaSuccess" and res["smem_227k"] == "cudaSuccess"
    assert res["smem_227k_plus_1"] == "cudaErrorInvalidValue"
    assert res["optin_227k_plus_1"] == "cudaErrorInvalidValue"
    # H100: 2048 threads, 32 blocks and 228 KB (1 KB reserved per block) an SM.
    assert (res["occupancy_256"], res["occupancy_1024"], res["occupancy_32"], res["occupancy_128_100k"]) == \
        ("8", "2", "32", "2")


def test_kernel_registers_limit_the_emulated_occupancy(tmp_path):
    """Registers the driver is told (its `registers` command, as bench/kernel_static.py sends ptxas's)
    limit cudaOccupancyMaxActiveBlocksPerMultiprocessor, so plan_gemv sizes its grid as on the GPU:
    a 4096 x 4096 pvq-3.25 layer at batch 1, 128 tiles of 16-warp blocks on 132 SMs. Unknown
    registers leave 4 blocks an SM (2048 threads); 64 registers a thread fill the 64K-register file
    with 2 blocks, 128 with 1. The work split follows: splits = min(resident / 128, 256 groups / 64)."""
    require_toolchain()
    rows, cols, D, bits = 4096, 4096, 16, 52
    layer = dict(codes=f"zeros:{4 * (rows // 32) * (cols // D) * bits}", row_scale=f"zeros:{2 * rows}",
                 levels="zeros:16", rows=rows, groups=cols // D, D=D, K=30, bits=bits, index_bits=50,
                 count=2**50 - 1)
    m = emulation.Manifest(tmp_path)
    m.command("dry_run", on=1)
    kernel = "gemv_kernel<16,1,float,true>"
    for i, registers in enumerate([None, 64, 128, 0]):
        if registers is not None:
            m.command("registers", kernel=kernel, n=registers)
        m.command("gemv", id=f"g{i}", kind="float32", M=1, x=f"zeros:{4 * cols}", bias="none", out="none", **layer)
    run = emulation.run(emulation.build("plain"), m)
    assert run.returncode == 0, run.describe()
    got = [(run.results[f"g{i}"]["splits"], run.results[f"g{i}"]["blocks"]) for i in range(4)]
    # resident 528, 264, 132, then 528 again (0 forgets the count): items = 128 x splits in one round
    assert got == [("4", "512"), ("2", "256"), ("1", "128"), ("4", "512")]


@pytest.mark.parametrize("rows, sms, registers", [(11008, 132, 64), (4096, 108, 64), (4096, 132, 128),
                                                   (1000, 7, 64), (64, 132, 64)])
def test_gemv_split_minimises_rounds_per_split(rows, sms, registers, tmp_path):
    """plan_gemv's split S minimises a block's time, rounds / S with rounds = ceil(tiles S / resident),
    the smallest S on a tie, each warp keeping >= 4 chunks (S <= groups / 64), and its grid runs every
    block rounds or rounds - 1 items. 11008 rows (344 tiles) on 264 resident blocks: S = 3, 4 rounds
    (1.33 tiles' worth a block) where S = 1 took 2."""
    require_toolchain()
    cols, D, bits = 4096, 16, 52
    layer = dict(codes=f"zeros:{4 * -(-rows // 32) * (cols // D) * bits}", row_scale=f"zeros:{2 * rows}",
                 levels="zeros:16", rows=rows, groups=cols // D, D=D, K=30, bits=bits, index_bits=50,
                 count=2**50 - 1)
    m = emulation.Manifest(tmp_path)
    m.command("sms", n=sms)
    m.command("dry_run", on=1)
    m.command("registers", kernel="gemv_kernel<16,1,float,true>", n=registers)
    m.command("gemv", id="g", kind="float32", M=1, x=f"zeros:{4 * cols}", bias="none", out="none", **layer)
    run = emulation.run(emulation.build("plain"), m)
    assert run.returncode == 0, run.describe()
    resident = sms * (65536 // (registers * 512))
    tiles = -(-rows // 32)
    costs = {s: -(-tiles * s // resident) / s for s in range(1, (cols // D) // 64 + 1)}
    want = min(costs, key=lambda s: (costs[s], s))
    splits, blocks = int(run.results["g"]["splits"]), int(run.results["g"]["blocks"])
    assert splits == want, (splits, costs)
    items, rounds = tiles * splits, -(-tiles * splits // resident)
    assert blocks <= resident and -(-items // blocks) == rounds and blocks * rounds - items < rounds
    if rows == 11008:
        assert (splits, rounds) == (3, 4)


VIOLATIONS = {
    "deadlock": r"deadlock in block \(0,0,0\): no thread can continue\.(.|\n)*"
                r"240 thread\(s\): __syncthreads at \S*selftest\.cu:\d+(.|\n)*"
                r"16 thread\(s\): __syncwarp at \S*selftest\.cu",
    "divergent_barrier": r"selftest\.cu:\d+ .*divergent __syncthreads: thread \d+ waits here while \d+ thread\(s\) "
                         r"wait at \S*selftest\.cu:\d+",
    "return_before_barrier": r"divergent __syncthreads: thread \d+ (returned from the kernel while|arrives after)",
    "mask_excludes_caller": r"__shfl_sync: lane 0 calls it with mask 0xfffffffe, which does not name the lane",
    # Lanes 0-7 complete their own 0xff shuffle and return; the 0xffffffff one then lacks them.
    "mask_mismatch": r"__shfl_sync: lane [0-7] is in the mask 0xffffffff but (has )?returned from the kernel",
    "read_outside_mask": r"__shfl_sync: lane \d+ reads lane 20, which is not in the mask 0x0000ffff",
    "wmma_divergent_pointer": r"wmma::load_matrix_sync: lanes pass different operands",
    "big_static_smem": r"51200 bytes of static shared memory; ptxas refuses more than 48 KB",
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
def test_violation_stops_with_its_place(name, tmp_path):
    require_toolchain()
    m = emulation.Manifest(tmp_path)
    m.command("selftest", id=name, name=name)
    run = emulation.run(emulation.build("plain"), m)
    assert run.returncode == emulation.HARNESS_ERROR, run.describe()
    assert re.search(VIOLATIONS[name], run.stderr), run.describe()
    assert name not in run.results  # stopped inside the kernel
