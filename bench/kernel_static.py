"""Static facts about every CUDA kernel, without a GPU: registers, spills and static shared memory from
ptxas (sm_80 and sm_90a, the build's architectures), and the occupancy they give at the launch
configurations the launchers choose for representative shapes.

The launch configurations are not a hand-kept table: the launchers themselves run under the CUDA
emulator (tests/cuda_emulation) in dry-run mode, which checks and logs each launch (kernel, grid,
block, dynamic shared memory) without executing it, on an emulated A100 (108 SMs) and H100 (132 SMs).
Occupancy comes from NVIDIA's calculator (cuda_occupancy.h) with ptxas's register counts, which the
emulator is given first (its `registers` command), so the launchers size their persistent grids as
on the real GPU; the report checks that every persistent grid's blocks fit at once.

Usage: python bench/kernel_static.py [--out bench/results/kernels-static-<date>.md]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "cuda_emulation"))
import emulation  # noqa: E402

ARCHS = {"sm_80": "a100", "sm_90a": "h100"}
# Grid-stride kernels whose grid is sized as "every block resident at once" (common/launch.h).
PERSISTENT = ("decode_kernel", "encode_kernel", "search_kernel", "dequantize_kernel", "gemv_kernel", "finalize_kernel",
              "encode_activations_kernel", "decode_activations_kernel")


@dataclass
class Resources:
    registers: int
    barriers: int
    static_smem: int
    stack: int
    spill_stores: int
    spill_loads: int


def nvcc() -> str:
    homes = [Path(os.environ[v]) / "bin" / "nvcc" for v in ("CUDA_HOME", "CUDA_PATH") if v in os.environ]
    for candidate in [os.environ.get("NVCC"), shutil.which("nvcc"), *map(str, homes)]:
        if candidate and Path(candidate).exists():
            return candidate
    sys.exit("kernel_static: no nvcc (set NVCC or CUDA_HOME)")


def short_name(demangled: str) -> str:
    """'void pvq_cuda::(anonymous namespace)::gemv_kernel<16, 1, __half>(...)' -> 'gemv_kernel<16, 1, __half>'."""
    m = re.search(r"(\w+_kernel)(<[^()]*>)?\(", demangled)
    return (m.group(1) + (m.group(2) or "")) if m else demangled


def ptxas_facts(source: str, arch: str) -> dict[str, Resources]:
    """ptxas -v of one .cu for one architecture, with the release build's flags (CMake Release)."""
    cmd = [nvcc(), "-std=c++20", "-O3", "-DNDEBUG", f"-I{REPO / 'csrc'}", "-cubin", f"-arch={arch}",
           "-Xptxas", "-v", str(REPO / "csrc" / source), "-o", os.devnull]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"kernel_static: {' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    facts, current, pending = {}, None, {}
    for line in proc.stderr.splitlines():
        if m := re.search(r"Function properties for (\S+)", line):
            current = m.group(1)
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            pending[current] = tuple(map(int, m.groups()))
        elif m := re.search(r"Used (\d+) registers, used (\d+) barriers(?:, (\d+) bytes smem)?", line):
            stack, stores, loads = pending.get(current, (0, 0, 0))
            facts[current] = Resources(int(m.group(1)), int(m.group(2)), int(m.group(3) or 0), stack, stores, loads)
    names = subprocess.run(["c++filt"], input="\n".join(facts), capture_output=True, text=True).stdout.splitlines()
    return {short_name(n): r for n, r in zip(names, facts.values())}


def set_registers(m, facts: dict[str, Resources]) -> None:
    """Tell the emulator ptxas's registers of every kernel instance (for its occupancy answers)."""
    for name, res in facts.items():
        m.command("registers", kernel=name.replace(" ", ""), n=res.registers)


def representative_launches(workdir: Path, facts: dict[str, dict[str, Resources]]) -> list[dict]:
    """The launches the launchers make for the shapes of a Llama-size layer, on both GPUs (dry run),
    with each architecture's registers (facts: arch -> kernel -> ptxas's resources)."""
    m = emulation.Manifest(workdir)
    D, K, scale_bits, rows, cols = 16, 30, 2, 4096, 4096  # pvq-3.25, a 4096 x 4096 layer
    index_bits = 50
    bits = index_bits + scale_bits
    words = (rows // 32) * (cols // D) * bits
    layer = dict(codes=f"zeros:{4 * words}", row_scale=f"zeros:{2 * rows}", levels=f"zeros:{4 << scale_bits}",
                 rows=rows, groups=cols // D, D=D, K=K, bits=bits, index_bits=index_bits, count=2**50 - 1)
    groups = 1 << 20
    for arch, gpu in ARCHS.items():
        m.command("gpu", name=gpu)
        set_registers(m, facts[arch])
        m.command("dry_run", on=1)
        shapes = [
            ("decode D=16 K=30, 1M groups", "decode", dict(D=16, K=30, V=2**50 - 1, groups=groups,
                                                            index=f"zeros:{8 * groups}", out="none", status="none")),
            ("decode D=8 K=16, 1M groups", "decode", dict(D=8, K=16, V=2**24, groups=groups,
                                                          index=f"zeros:{8 * groups}", out="none", status="none")),
            ("encode D=16 K=30, 1M groups", "encode", dict(D=16, K=30, groups=groups, pulses=f"zeros:{16 * groups}",
                                                           out="none", status="none")),
            ("search D=16 K=30 fp16, 1M groups", "search", dict(D=16, K=30, kind="float16", groups=groups,
                                                                x=f"zeros:{32 * groups}", out="none", status="none")),
            ("dequantize 4096x4096 pvq-3.25 fp16", "dequantize", dict(kind="float16", row_begin=0, row_end=rows,
                                                                      out="none", **layer)),
            ("GEMV 4096x4096 pvq-3.25 batch 1 fp16", "gemv", dict(kind="float16", M=1, x=f"zeros:{2 * cols}",
                                                                  bias="none", out="none", **layer)),
            ("GEMV 4096x4096 pvq-3.25 batch 16 fp16", "gemv", dict(kind="float16", M=16, x=f"zeros:{32 * cols}",
                                                                   bias="none", out="none", **layer)),
            ("input gradient fused 4096x4096 pvq-3.25 fp16, 8 rows (rotated)", "grad_gemv",
             dict(kind="float16", M=8, grad=f"zeros:{2 * 8 * rows}", signs=f"zeros:{4 * cols}", out="none",
                  **layer)),
            ("input gradient 4096x4096 pvq-3.25 fp16, 2048 rows (rotated)", "grad_input",
             dict(kind="float16", M=2048, tile_weights=2**25, grad=f"zeros:{2 * 2048 * rows}",
                  signs=f"zeros:{4 * cols}", out="none", gemm="none", **layer)),
            ("Hadamard n=4096 fp16, 4096 rows", "hadamard", dict(kind="float16", rows=4096, n=4096,
                                                                 x=f"zeros:{2 * 4096 * 4096}", signs="none",
                                                                 out="none")),
            ("Hadamard n=14336 fp16, 64 rows", "hadamard", dict(kind="float16", rows=64, n=14336,
                                                                x=f"zeros:{2 * 64 * 14336}", signs="none", out="none")),
            ("encode_activations n=4096 pvq-a4.25 fp16, 4096 tokens", "encode_activations",
             dict(kind="float16", tokens=4096, n=4096, D=8, K=29, level_count=16, x=f"zeros:{2 * 4096 * 4096}",
                  signs=f"zeros:{4 * 4096}", levels="zeros:64", pulses="none", index="none", gain="none",
                  scale="none", flags="none")),
            ("encode_activations n=8192 pvq-a8 bf16, 512 tokens", "encode_activations",
             dict(kind="bfloat16", tokens=512, n=8192, D=2, K=127, level_count=128, x=f"zeros:{2 * 512 * 8192}",
                  signs=f"zeros:{4 * 8192}", levels="zeros:512", pulses="none", index="none", gain="none",
                  scale="none", flags="none")),
            ("W+A 4096x4096 pvq-3.25 x pvq-a4.25, batch 1 (activation decode, then the fp32 GEMV)", "wa_matmul",
             dict(M=1, act_D=8, act_K=29, level_count=16, pulses=f"zeros:{cols}", gain=f"zeros:{cols // 8}",
                  scale="zeros:2", act_levels="zeros:64", tile_weights=2**25, bias="none", xhat="none", bad="none",
                  out="none", **layer)),
            ("Hessian n=4096 fp16, 2048 tokens", "hessian", dict(kind="float16", tokens=2048, n=4096,
                                                                 x=f"zeros:{2 * 2048 * 4096}",
                                                                 H=f"zeros:{4 * 4096 * 4096}", out="none")),
        ]
        for i, (label, command, args) in enumerate(shapes):
            m.command(command, id=f"{gpu}:{i}", **args)
    run = emulation.run(emulation.build("plain"), m)
    if run.returncode != 0:
        sys.exit(f"kernel_static: the dry run failed: {run.describe()}")
    labels = {f"{gpu}:{i}": label for gpu in ARCHS.values() for i, (label, _, _) in enumerate(shapes)}
    out = []
    for case_id, launches in run.launches.items():
        for launch in launches:
            out.append(dict(launch, gpu=case_id.split(":")[0], shape=labels[case_id],
                            name=short_name(launch["kernel"])))
    return out


def occupancies(queries: list[tuple], workdir: Path) -> list[dict]:
    """cuda_occupancy.h's answer for each (gpu, threads, registers, static, dynamic, max dynamic)."""
    m = emulation.Manifest(workdir)
    for i, (gpu, threads, registers, static, dynamic, max_dynamic) in enumerate(queries):
        m.command("occupancy", id=f"q{i}", gpu=gpu, threads=threads, registers=registers, static_smem=static,
                  dynamic_smem=dynamic, max_dynamic_smem=max_dynamic)
    run = emulation.run(emulation.build("plain"), m)
    if run.returncode != 0:
        sys.exit(f"kernel_static: occupancy queries failed: {run.describe()}")
    return [run.results[f"q{i}"] for i in range(len(queries))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=REPO / "bench" / "results" / f"kernels-static-{datetime.date.today():%Y-%m-%d}.md")
    args = parser.parse_args()
    tc = emulation.toolchain()
    if isinstance(tc, str):
        sys.exit(f"kernel_static: {tc}")

    jobs = [(src, arch) for src in emulation.KERNEL_SOURCES for arch in ARCHS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda job: ptxas_facts(*job), jobs))
    facts: dict[str, dict[str, Resources]] = {arch: {} for arch in ARCHS}
    sources: dict[str, str] = {}
    for (src, arch), table in zip(jobs, results):
        facts[arch].update(table)
        for name in table:
            sources[name] = src

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "launches").mkdir()
        launches = representative_launches(Path(tmp) / "launches", facts)
        arch_of = {gpu: arch for arch, gpu in ARCHS.items()}
        smem_default = 48 * 1024
        queries, rows = [], []
        for launch in launches:
            arch = arch_of[launch["gpu"]]
            res = facts[arch].get(launch["name"])
            if res is None:
                sys.exit(f"kernel_static: ptxas reported no {launch['name']} for {arch}")
            threads = launch["block"][0] * launch["block"][1] * launch["block"][2]
            # The launchers opt in above 48 KB (cudaFuncSetAttribute) for exactly what they launch.
            max_dynamic = max(launch["dynamic_smem"], smem_default - res.static_smem)
            queries.append((launch["gpu"], threads, res.registers, res.static_smem, launch["dynamic_smem"],
                            max_dynamic))
            rows.append((launch, arch, res, threads))
        (Path(tmp) / "occ").mkdir()
        occ = occupancies(queries, Path(tmp) / "occ")

    today = f"{datetime.date.today():%Y-%m-%d}"
    lines = [f"# Static kernel facts ({today})", "",
             f"Generated by `python bench/kernel_static.py` (no GPU): ptxas -v of every kernel instance "
             f"(nvcc `-O3`, as the Release build), and occupancy from cuda_occupancy.h at the launch configurations "
             f"the launchers chose under the CUDA emulator (tests/cuda_emulation), dry run, A100 = 108 SMs and 164 KB "
             f"shared memory per SM, H100 SXM = 132 SMs and 228 KB.", "",
             "## Launches at representative shapes", "",
             "Blocks/SM: resident blocks of that kernel instance at its registers, static + dynamic shared memory "
             "and block size, and what limits them (the emulated launcher sized its grid from the same registers). "
             "Persistent grids (grid-stride kernels sized to every resident block) *hold* when grid <= SMs x "
             "blocks/SM, so that all blocks run at once on the real GPU too.", "",
             "| GPU | shape | kernel | grid | threads | dyn. smem | static smem | regs | spills (st/ld B) | "
             "blocks/SM | limited by | persistent grid holds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    not_holding = []
    for i, (launch, arch, res, threads) in enumerate(rows):
        real = occ[i]
        sms = 108 if launch["gpu"] == "a100" else 132
        base = launch["name"].split("<")[0]
        holds = "-"
        if base in PERSISTENT:
            capacity = sms * int(real["blocks_per_sm"])
            holds = "yes" if launch["grid"][0] <= capacity else f"**no**: {launch['grid'][0]} > {capacity}"
            if holds != "yes":
                not_holding.append(f"{arch} {launch['name']} ({launch['shape']})")
        lines.append(f"| {arch} | {launch['shape']} | `{launch['name']}` | {launch['grid'][0]} | {threads} | "
                     f"{launch['dynamic_smem']} | {res.static_smem} | {res.registers} | "
                     f"{res.spill_stores}/{res.spill_loads} | {real['blocks_per_sm']} | "
                     f"{real['limited_by'].replace('_', ' ')} | {holds} |")
    lines += ["", "## Every kernel instance", "",
              "| kernel | source | sm_80 regs | sm_80 spills (st/ld B) | sm_80 stack B | sm_90a regs | "
              "sm_90a spills (st/ld B) | sm_90a stack B | static smem B | barriers |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(facts["sm_90a"], key=lambda n: (sources[n], n)):
        a, h = facts["sm_80"].get(name), facts["sm_90a"][name]
        a_cols = f"{a.registers} | {a.spill_stores}/{a.spill_loads} | {a.stack}" if a else "- | - | -"
        lines.append(f"| `{name}` | {sources[name]} | {a_cols} | {h.registers} | {h.spill_stores}/{h.spill_loads} | "
                     f"{h.stack} | {h.static_smem} | {h.barriers} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    spilling = sorted(n for arch in ARCHS for n, r in facts[arch].items() if r.spill_stores or r.spill_loads)
    print(f"kernel_static: {sum(len(f) for f in facts.values())} kernel instances, {len(rows)} launches -> {args.out}")
    print(f"kernel_static: spilling instances: {len(set(spilling))}; persistent grids that do not hold: "
          f"{not_holding or 'none'}")


if __name__ == "__main__":
    main()
