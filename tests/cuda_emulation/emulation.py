"""Build and run the CUDA emulation executable (README.md next to this file explains the harness).

Why a separate executable instead of a Python extension: the kernels then run in a torch-free
process, so the sanitizer builds never have to load ASan or TSan runtimes into Python (they must be
the first library loaded, and torch's own threads would drown TSan's reports), a crash or a
deadlock report ends that process and not pytest, and each build is cached by a hash of its
sources and flags. Tests write each case's inputs as raw files, run one process for many cases,
and compare its raw outputs with the project's CPU ops.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
HARNESS = Path(__file__).resolve().parent
CSRC = REPO / "csrc"
CACHE = Path(os.environ.get("PVQ_EMULATION_CACHE", REPO / "build" / "cuda-emulation"))

# What runs on the emulated device: every .cu file, and the torch-free host code they call.
KERNEL_SOURCES = [
    "codec/decode.cu", "codec/encode.cu", "codec/search.cu", "common/device_tables.cu", "packed/dequantize.cu",
    "packed/gemv.cu", "hadamard/hadamard.cu", "hessian/hessian.cu",
]
HOST_SOURCES = ["codec/split_tables.cpp", "packed/tiled_matmul.cpp"]
HARNESS_SOURCES = ["block_runner.cpp", "kernel_symbols.cpp", "occupancy.cpp", "runtime.cpp", "driver.cpp"]

COMMON_FLAGS = ["-std=c++20", "-g1", "-fno-strict-aliasing", "-Wall", "-Wextra", "-Wno-unknown-pragmas",
                "-Wno-unused-parameter", "-Werror", "-pthread"]
# The three builds. -O1 keeps the sanitizer builds fast enough; the plain build uses it too so that
# all three compile the same code.
VARIANTS = {
    "plain": ["-O1"],
    "asan": ["-O1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined,alignment",
             "-fno-sanitize-recover=all"],
    "tsan": ["-O1", "-fsanitize=thread"],
}
# Sanitizers stop at the first report, with an exit status that names them.
SANITIZER_ENV = {
    "ASAN_OPTIONS": "halt_on_error=1:exitcode=66:detect_leaks=1:abort_on_error=0",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=67",
    "TSAN_OPTIONS": "halt_on_error=1:exitcode=68:report_signal_unsafe=0",
}
HARNESS_ERROR = 70  # cuda_emulation.h's fail(): a violation of the CUDA programming model


def toolchain() -> tuple[str, Path] | str:
    """(g++, CUDA include directory), or why the emulation cannot be built here."""
    gxx = os.environ.get("CXX") or shutil.which("g++")
    if not gxx:
        return "no g++ on PATH (or $CXX)"
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        candidates.append(real.parent.parent / "include")
        # A wrapper script (as on the dev machines) names the real nvcc inside it.
        try:
            text = real.read_text(errors="ignore")[:4096]
        except OSError:
            text = ""
        for word in text.split():
            if word.endswith("/bin/nvcc"):
                candidates.append(Path(word).parent.parent / "include")
    candidates += [Path("/usr/local/cuda/include"), *sorted(Path("/usr/local").glob("cuda-*/include"), reverse=True)]
    for inc in candidates:
        if all((inc / h).is_file() for h in ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h", "cuda_occupancy.h")):
            return gxx, inc
    return "no CUDA headers found (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h, cuda_occupancy.h); set CUDA_HOME"


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:20]


def _headers_digest(overrides: dict[str, str]) -> str:
    """Every header a source may include (csrc and the harness), with the mutated ones' text."""
    parts = []
    for root in (CSRC, HARNESS):
        for path in sorted(root.rglob("*")):
            if path.suffix in (".h", ".cuh"):
                rel = str(path.relative_to(REPO))
                parts += [rel, overrides.get(rel, path.read_text())]
    return _digest(*parts)


@dataclass
class Build:
    variant: str
    executable: Path
    compile_seconds: float = 0.0  # spent compiling in this call (0 when everything was cached)


def build(variant: str, overrides: dict[str, str] | None = None, jobs: int | None = None) -> Build:
    """Compiles (or finds in the cache) the emulation executable of one variant.

    overrides maps repository paths (e.g. "csrc/packed/gemv.cu") to replacement text: the mutation
    tests' planted bugs. Only the objects whose inputs change are rebuilt.
    """
    import time

    tc = toolchain()
    if isinstance(tc, str):
        raise RuntimeError(tc)
    gxx, cuda_include = tc
    overrides = overrides or {}
    flags = COMMON_FLAGS + VARIANTS[variant]
    headers = _headers_digest(overrides)
    outdir = CACHE / variant
    outdir.mkdir(parents=True, exist_ok=True)
    # Mutated files live in a private tree that shadows csrc/ on the include path.
    shadow = Path(tempfile.mkdtemp(prefix="pvq-emulation-src-")) if overrides else None
    if shadow:
        for rel, text in overrides.items():
            target = shadow / Path(rel).relative_to("csrc")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    includes = ([f"-I{shadow}"] if shadow else []) + [f"-I{HARNESS / 'include'}", f"-I{HARNESS}", f"-I{CSRC}",
                                                      f"-isystem{cuda_include}"]
    force = ["-include", str(HARNESS / "cuda_emulation.h")]

    jobs_list = []
    for rel in KERNEL_SOURCES + HOST_SOURCES + HARNESS_SOURCES:
        repo_rel = f"csrc/{rel}" if rel in KERNEL_SOURCES + HOST_SOURCES else str((HARNESS / rel).relative_to(REPO))
        path = REPO / repo_rel
        text = overrides.get(repo_rel, path.read_text())
        src = (shadow / Path(repo_rel).relative_to("csrc")) if shadow and repo_rel in overrides else path
        key = _digest(gxx, " ".join(flags), headers, repo_rel, text)
        obj = outdir / f"{Path(rel).name}-{key}.o"
        lang = ["-x", "c++"] if rel.endswith(".cu") else []
        cmd = [gxx, *flags, *force, *includes, *lang, "-c", str(src), "-o", str(obj) + ".tmp"]
        jobs_list.append((obj, cmd))

    start = time.monotonic()
    todo = [(obj, cmd) for obj, cmd in jobs_list if not obj.exists()]

    def compile_one(item):
        obj, cmd = item
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"emulation build ({variant}) failed:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")
        os.replace(str(obj) + ".tmp", obj)

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as pool:
        for f in [pool.submit(compile_one, item) for item in todo]:
            f.result()
    objects = [obj for obj, _ in jobs_list]
    exe = outdir / f"emulator-{_digest(*map(str, objects))}"
    if not exe.exists():
        cmd = [gxx, *flags, *map(str, objects), "-o", str(exe) + ".tmp"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"emulation link ({variant}) failed:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")
        os.replace(str(exe) + ".tmp", exe)
    if shadow:
        shutil.rmtree(shadow, ignore_errors=True)
    return Build(variant, exe, time.monotonic() - start if todo else 0.0)


# ----- Cases --------------------------------------------------------------------------------------------

_KIND = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def kind(dtype: torch.dtype) -> str:
    return _KIND[dtype]


@dataclass
class Run:
    """The outcome of one emulator process."""

    returncode: int
    stderr: str
    results: dict[str, dict[str, str]]
    launches: dict[str, list[dict]]  # case id -> its launches (kernel, grid, block, smem, ...)
    workdir: Path

    def output(self, name: str, dtype: torch.dtype, shape) -> torch.Tensor:
        """An output file the driver wrote, as a tensor."""
        raw = np.fromfile(self.workdir / name, dtype=np.uint8)
        return torch.from_numpy(raw.copy()).view(dtype).reshape(shape)

    def describe(self) -> str:
        tail = "\n".join(self.stderr.strip().splitlines()[-40:])
        return f"emulator exit status {self.returncode}; stderr (tail):\n{tail}"


@dataclass
class Manifest:
    """Commands for one emulator process, and their input files."""

    workdir: Path
    lines: list[str] = field(default_factory=list)
    _files: int = 0

    def tensor(self, t: torch.Tensor) -> str:
        """Writes t (contiguous, raw bytes) and returns its path for a command argument."""
        self._files += 1
        path = self.workdir / f"in{self._files}.bin"
        t.detach().contiguous().cpu().view(torch.uint8).numpy().tofile(path)
        return str(path)

    def out(self, case_id: str, name: str) -> str:
        return str(self.workdir / f"{case_id}.{name}")

    def command(self, name: str, **args) -> None:
        self.lines.append(" ".join([name] + [f"{k}={v}" for k, v in args.items()]))


def run(build_: Build, manifest: Manifest, timeout: float = 900) -> Run:
    (manifest.workdir / "manifest.txt").write_text("\n".join(manifest.lines) + "\n")
    results_path, log_path = manifest.workdir / "results.txt", manifest.workdir / "launches.tsv"
    env = dict(os.environ, **SANITIZER_ENV)
    proc = subprocess.run([str(build_.executable), str(manifest.workdir / "manifest.txt"), str(results_path),
                           str(log_path)], capture_output=True, text=True, env=env, timeout=timeout)
    results = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            case_id, *pairs = line.split()
            results[case_id] = dict(p.split("=", 1) for p in pairs)
    launches: dict[str, list[dict]] = {}
    current = None
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            cols = line.split("\t")
            if cols[0] == "case":
                current = cols[1]
                launches[current] = []
            elif cols[0] == "launch" and current is not None:
                launches[current].append({
                    "kernel": cols[1], "grid": tuple(map(int, cols[2].split(","))),
                    "block": tuple(map(int, cols[3].split(","))), "dynamic_smem": int(cols[4]),
                    "static_smem": int(cols[5]), "sms": int(cols[6]), "error": cols[7]})
    return Run(proc.returncode, proc.stderr, results, launches, manifest.workdir)
