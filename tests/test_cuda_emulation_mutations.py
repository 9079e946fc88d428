"""The emulation harness catches real kernel bugs: each test plants one bug in a copy of a kernel
source (the repository is never touched), rebuilds only the objects that read it, runs cases that
reach it, and asserts that the build meant to catch it does, and how: a data race from TSan, an
out-of-bounds access from ASan, a violated CUDA rule from the harness, a wrong result or a launch
error from the plain build. The same cases pass on the unmutated build (the control).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from pvq_cuda.format.activation import ActivationConfig
from test_cuda_emulation import (SEED, Plan, dequantize_case, decode_case, encode_activations_case, gemv_case,
                                 grad_gemv_case, grad_input_case, hadamard_case, hessian_case, random_layer,
                                 require_toolchain, wa_matmul_case)

import emulation  # noqa: E402  (tests/cuda_emulation, on sys.path once test_cuda_emulation is imported)


@dataclass(frozen=True)
class Mutation:
    path: str        # repository path of the file that gets the bug
    original: str    # text that must occur exactly once there
    planted: str     # what replaces it
    variant: str     # the build that must catch it
    cases: Callable[[Plan], None]
    caught: str      # "race", "overflow", "harness:<message regex>", "wrong result:<check message regex>",
                     # "launch error"


def _hadamard(plan: Plan) -> None:
    hadamard_case(plan, 1536, torch.float32, True, 7, 2)
    hadamard_case(plan, 4096, torch.float16, False, 3, 1)


def _hadamard_largest(plan: Plan) -> None:
    hadamard_case(plan, 32768, torch.bfloat16, True, 2, 2)


def _encode_activations(plan: Plan) -> None:
    encode_activations_case(plan, 576, ActivationConfig.preset("pvq-a4.25"), torch.float16, True, 15, 2)


def _wa_matmul(plan: Plan) -> None:
    # n = 192 (12 · 16), pvq-a8 (D=2: 96 groups a token), the last token's middle group with a gain
    # code past the 128 levels.
    wa_matmul_case(plan, random_layer(plan.gen, 40, 8 * 24, 8, 16), ActivationConfig.preset("pvq-a8"), 3, True, 2,
                   bad="gain")


def _hessian(plan: Plan) -> None:
    hessian_case(plan, 70, 100, torch.float16, 2)


def _dequantize(plan: Plan) -> None:
    dequantize_case(plan, random_layer(plan.gen, 70, 8 * 12, 8, 16), 0, 70, torch.float32, 2)


def _decode(plan: Plan) -> None:
    decode_case(plan, 8, 16, 2, with_bad=True)  # one bad index, on an odd lane


def _gemv(plan: Plan) -> None:
    gemv_case(plan, random_layer(plan.gen, 64, 8 * 40, 8, 16), 4, torch.float32, None, 2)


def _grad_input(plan: Plan) -> None:
    # Rotated (96 = 12 · 8), 3 tiles of 32 rows, the last partial.
    grad_input_case(plan, random_layer(plan.gen, 70, 8 * 12, 8, 16), 3, torch.float32, True, 32, 2)


def _grad_gemv(plan: Plan) -> None:
    grad_gemv_case(plan, random_layer(plan.gen, 70, 8 * 12, 8, 16), 4, torch.float32, True, 2)


MUTATIONS = {
    # The barrier between the load pass's shared-memory writes and the first window pass's reads.
    "syncthreads removed": Mutation(
        "csrc/hadamard/hadamard.cu",
        "    if (direct) continue;  // block-uniform, and shared memory was never touched\n    __syncthreads();\n",
        "    if (direct) continue;  // block-uniform, and shared memory was never touched\n",
        "tsan", _hadamard, "race"),
    # The barrier before the next chunk overwrites the staging the warps' WMMA loads read: TSan must
    # see the race although every warp meets its lanes in collectives in between.
    "syncthreads removed under WMMA": Mutation(
        "csrc/hessian/hessian.cu",
        "    __syncthreads();  // staging is overwritten by the next chunk\n",
        "",
        "tsan", _hessian, "race"),
    # The barrier between the encoder's group phase (energies written) and the token sums that read
    # them: a race between warps of the block.
    "encoder barrier removed": Mutation(
        "csrc/activation/encode.cu",
        "                   energy, row_flag);\n    __syncthreads();\n",
        "                   energy, row_flag);\n",
        "tsan", _encode_activations, "race"),
    # The same barrier reached by half of the block only.
    "divergent syncthreads": Mutation(
        "csrc/hadamard/tile_transform.cuh",
        "    __syncthreads();  // the next pass, the H_m pass or the next tile's load reuse these words\n",
        "    if (threadIdx.x < 128) __syncthreads();\n",
        "plain", _hadamard, r"harness:divergent __syncthreads"),
    # Off by one in a bounds check: the row past the range's end is written.
    "bounds check off by one": Mutation(
        "csrc/packed/dequantize.cu",
        "*hi = row_end - row0 < pvq::kTileRows ? int(row_end - row0) : pvq::kTileRows;",
        "*hi = row_end - row0 < pvq::kTileRows ? int(row_end + 1 - row0) : pvq::kTileRows;",
        "asan", _dequantize, "overflow"),
    # A shuffle mask that leaves out a lane calling it.
    "shuffle mask": Mutation(
        "csrc/codec/status.cuh",
        "__shfl_xor_sync(0xffffffffu, bits, offset)",
        "__shfl_xor_sync(0x7fffffffu, bits, offset)",
        # Which lane meets the bad mask first depends on the threads' scheduling: lane 31 calling outside
        # its own mask, or a lane reading lane 31.
        "plain", _decode, r"harness:__shfl_xor_sync: lane (31 calls it with mask 0x7fffffff|\d+ reads lane 31, "
                          r"which is not in the mask 0x7fffffff)"),
    # A reduction that skips the lane^1 exchange: odd lanes' bits never reach lane 0.
    "shuffle lane": Mutation(
        "csrc/codec/status.cuh",
        "for (int offset = 16; offset > 0; offset >>= 1)",
        "for (int offset = 16; offset > 1; offset >>= 1)",
        "plain", _decode, "wrong result:status 0, bad data: True"),
    # The input gradient's rotation transposed wrongly: the signs go into the Hadamard kernel (before
    # H, as the forward rotates) instead of after it.
    "gradient signs before the transform": Mutation(
        "csrc/packed/tiled_matmul.cpp",
        "launch_hadamard(b.z, b.rotated, FloatKind::kFloat32, nullptr, M, cols, stream)",
        "launch_hadamard(b.z, b.rotated, FloatKind::kFloat32, b.signs, M, cols, stream)",
        "plain", _grad_input, "wrong result:relative error .* against the CPU op"),
    # The fused gradient's lane reduction skips the lane^1 exchange: odd lanes' rows are lost.
    "gradient reduction misses a lane": Mutation(
        "csrc/packed/grad_input.cu",
        "for (int offset = 16; offset > 0; offset >>= 1)",
        "for (int offset = 16; offset > 1; offset >>= 1)",
        "plain", _grad_gemv, "wrong result:relative error .* against the CPU op"),
    # The signed cast's grid-stride loop one element too far: reads z and writes out past their ends.
    "signed cast bound off by one": Mutation(
        "csrc/packed/grad_input.cu",
        "e < total; e += int64_t(gridDim.x) * blockDim.x) {\n    const float v = z[e];",
        "e <= total; e += int64_t(gridDim.x) * blockDim.x) {\n    const float v = z[e];",
        "asan", _grad_input, "overflow"),
    # Dynamic shared memory one warp's cross-warp sums too small (the activation window after them
    # then runs past the block's allocation).
    "shared memory too small": Mutation(
        "csrc/packed/gemv.cu",
        "return (size_t(kWarps) * maxm * 32 + size_t(kWarps) * window_rounds(maxm) * D * maxm) * sizeof(float);",
        "return (size_t(kWarps - 1) * maxm * 32 + size_t(kWarps) * window_rounds(maxm) * D * maxm) * sizeof(float);",
        "asan", _gemv, "overflow"),
    # The activation decoder trusts the gain code: a code past the levels reads past act_levels.
    "activation gain code unchecked": Mutation(
        "csrc/activation/decode.cu",
        "const bool ok = k == K && c < level_count;",
        "const bool ok = k == K;",
        "asan", _wa_matmul, "overflow"),
    # Every token decoded with the first token's scale.
    "activation scale of the wrong token": Mutation(
        "csrc/activation/decode.cu",
        "pvq::half_bits_to_float(scale[e / groups_per_token])",
        "pvq::half_bits_to_float(scale[0])",
        "plain", _wa_matmul, "wrong result:x̂ differs from the CPU factors'"),
    # More than 48 KB of dynamic shared memory without cudaFuncSetAttribute's opt-in.
    "shared memory opt-in missing": Mutation(
        "csrc/hadamard/hadamard.cu",
        "  if (bytes > kDefaultSmem) {",
        "  if (false && bytes > kDefaultSmem) {",
        "plain", _hadamard_largest, "launch error"),
}


@pytest.fixture(scope="module")
def builds():
    """Every mutated executable and its unmutated control, built together (their compiles overlap)."""
    require_toolchain()
    requests = []
    for m in MUTATIONS.values():
        source = (emulation.REPO / m.path).read_text()
        assert source.count(m.original) == 1, f"{m.path} changed: update the mutation to plant its bug again"
        requests += [(m.variant, {}), (m.variant, {m.path: source.replace(m.original, m.planted)})]
    made = emulation.build_mutants(requests)
    return {name: (made[2 * i], made[2 * i + 1]) for i, name in enumerate(MUTATIONS)}


def _run(build, make_cases, workdir: Path):
    workdir.mkdir(parents=True)
    plan = Plan(emulation.Manifest(workdir), build.variant, torch.Generator().manual_seed(SEED))
    make_cases(plan)
    return plan, emulation.run(build, plan.manifest)


def _failures(plan: Plan, run) -> list[str]:
    """What the cases' checks report (a launcher error counts)."""
    out = []
    for case in plan.cases:
        res = run.results.get(case.id)
        if res is None:
            out.append(f"{case.id}: no result")
        elif res["error"] != "cudaSuccess":
            out.append(f"{case.id}: launcher returned {res['error']}")
        else:
            try:
                case.check(run, res)
            except AssertionError as e:
                out.append(f"{case.id}: {e}")
    return out


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_planted_bug_is_caught(name, builds, tmp_path):
    m = MUTATIONS[name]
    file_name = Path(m.path).name
    control_build, mutated_build = builds[name]

    control_plan, control = _run(control_build, m.cases, tmp_path / "control")
    assert control.returncode == 0 and not _failures(control_plan, control), (
        f"the unmutated {m.variant} build fails the cases of {name!r}: {_failures(control_plan, control)[:3]} "
        f"{control.describe()}")

    plan, run = _run(mutated_build, m.cases, tmp_path / "mutated")
    report = run.stderr
    if m.caught == "race":
        assert run.returncode == emulation.SANITIZER_EXIT["tsan"], run.describe()
        assert "WARNING: ThreadSanitizer: data race" in report and file_name in report, run.describe()
    elif m.caught == "overflow":
        assert run.returncode == emulation.SANITIZER_EXIT["asan"], run.describe()
        assert re.search(r"AddressSanitizer: heap-buffer-overflow", report) and file_name in report, run.describe()
    elif m.caught.startswith("harness:"):
        assert run.returncode == emulation.HARNESS_ERROR, run.describe()
        assert re.search(m.caught.split(":", 1)[1], report), run.describe()
    elif m.caught.startswith("wrong result:"):
        assert run.returncode == 0, run.describe()
        symptom = m.caught.split(":", 1)[1]
        assert any(re.search(symptom, f) for f in _failures(plan, run)), _failures(plan, run)
    elif m.caught == "launch error":
        assert run.returncode == 0, run.describe()
        assert any("launcher returned cudaErrorInvalidValue" in f for f in _failures(plan, run)), _failures(plan, run)
    else:
        raise AssertionError(f"unknown expectation {m.caught}")
