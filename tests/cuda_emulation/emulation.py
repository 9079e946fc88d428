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
import time
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
    "packed/gemv.cu", "packed/grad_input.cu", "hadamard/hadamard.cu", "hessian/hessian.cu", "activation/encode.cu",
    "activation/decode.cu",
]
HOST_SOURCES = ["codec/split_tables.cpp", "packed/tiled_matmul.cpp"]
HARNESS_SOURCES = ["block_runner.cpp", "kernel_symbols.cpp", "occupancy.cpp", "runtime.cpp", "selftest.cu",
                   "driver.cpp"]

# -ffp-contract=off: every float operation rounds on its own, as the __fmul_rn-style intrinsics the
# emulator defines with plain operators (cuda_emulation.h) must.
COMMON_FLAGS = ["-std=c++20", "-g1", "-fno-strict-aliasing", "-ffp-contract=off", "-Wall", "-Wextra",
                "-Wno-unknown-pragmas", "-Wno-unused-parameter", "-Werror", "-pthread"]
# The three builds. -O1 keeps the sanitizer builds fast enough; the plain build uses it too so that
# all three compile the same code.
VARIANTS = {
    "plain": ["-O1"],
    "asan": ["-O1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined,alignment",
             "-fno-sanitize-recover=all"],
    "tsan": ["-O1", "-fsanitize=thread"],
}
# Sanitizers stop at the first report, with an exit status that names them.
SANITIZER_EXIT = {"asan": 66, "ubsan": 67, "tsan": 68}
SANITIZER_ENV = {
    "ASAN_OPTIONS": f"halt_on_error=1:exitcode={SANITIZER_EXIT['asan']}:detect_leaks=1:abort_on_error=0",
    "UBSAN_OPTIONS": f"halt_on_error=1:print_stacktrace=1:exitcode={SANITIZER_EXIT['ubsan']}",
    "TSAN_OPTIONS": f"halt_on_error=1:exitcode={SANITIZER_EXIT['tsan']}:report_signal_unsafe=0",
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


# The object cache. An object is named <source>-<digest of its text and flags>-<digest of the headers
# it read>.o, next to a .deps file listing those headers (from g++ -MMD) with the digest of each. A
# cached object is reused when every header it read still has that text, so a planted bug in a
# header rebuilds only the objects that include it, and the unmutated objects stay cached.

def _text(repo_rel: str, overrides: dict[str, str]) -> str:
    if repo_rel in overrides:
        return overrides[repo_rel]
    path = REPO / repo_rel
    return path.read_text() if path.exists() else "(missing)"


def _cached_object(outdir: Path, stem: str, overrides: dict[str, str]) -> Path | None:
    for deps in outdir.glob(f"{stem}-*.deps"):
        obj = deps.with_suffix(".o")
        entries = [line.split(" ", 1) for line in deps.read_text().splitlines() if line]
        if obj.exists() and all(_digest(_text(rel, overrides)) == d for d, rel in entries):
            return obj
    return None


def _store_object(tmp_obj: Path, depfile: Path, outdir: Path, stem: str, shadow: Path | None,
                  overrides: dict[str, str]) -> Path:
    """Names a fresh object after the headers it read (g++ -MMD's list, mutated copies mapped back)."""
    words = depfile.read_text().replace("\\\n", " ").split()[2:]  # after "<object>: <source>"
    headers = set()
    for word in words:
        path = Path(word).resolve()
        if shadow is not None and path.is_relative_to(shadow.resolve()):
            headers.add(str(Path("csrc") / path.relative_to(shadow.resolve())))
        elif path.is_relative_to(REPO):
            headers.add(str(path.relative_to(REPO)))
    lines = [f"{_digest(_text(rel, overrides))} {rel}" for rel in sorted(headers)]
    name = f"{stem}-{_digest(*lines)}"
    obj = outdir / f"{name}.o"
    os.replace(tmp_obj, obj)
    (outdir / f"{name}.deps").write_text("\n".join(lines) + "\n")
    depfile.unlink()
    return obj


@dataclass
class Build:
    variant: str
    executable: Path
    seconds: float = 0.0  # spent building it (with the other executables of the same call)


@dataclass
class _Source:
    repo_rel: str
    stem: str
    command: list[str]  # writes <stem>.tmp.o and <stem>.tmp.d
    cached: Path | None


def _sources(variant: str, overrides: dict[str, str], shadow: Path | None) -> list[_Source]:
    tc = toolchain()
    if isinstance(tc, str):
        raise RuntimeError(tc)
    gxx, cuda_include = tc
    flags = COMMON_FLAGS + VARIANTS[variant]
    outdir = CACHE / variant
    outdir.mkdir(parents=True, exist_ok=True)
    includes = ([f"-I{shadow}"] if shadow else []) + [f"-I{HARNESS / 'include'}", f"-I{HARNESS}", f"-I{CSRC}",
                                                      f"-isystem{cuda_include}"]
    force = ["-include", str(HARNESS / "cuda_emulation.h")]
    out = []
    for repo_rel in [f"csrc/{r}" for r in KERNEL_SOURCES + HOST_SOURCES] + \
                    [str((HARNESS / r).relative_to(REPO)) for r in HARNESS_SOURCES]:
        src = shadow / Path(repo_rel).relative_to("csrc") if repo_rel in overrides else REPO / repo_rel
        stem = f"{Path(repo_rel).name}-{_digest(gxx, ' '.join(flags), repo_rel, _text(repo_rel, overrides))}"
        lang = ["-x", "c++"] if repo_rel.endswith(".cu") else []
        tmp = outdir / f"{stem}.{os.getpid()}.tmp"
        command = [gxx, *flags, *force, *includes, *lang, "-c", str(src), "-o", f"{tmp}.o", "-MMD", "-MF", f"{tmp}.d"]
        out.append(_Source(repo_rel, stem, command, _cached_object(outdir, stem, overrides)))
    return out


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")


def build_many(requests: list[tuple[str, dict[str, str]]]) -> list[Build]:
    """Compiles (or finds in the cache) one emulation executable per (variant, overrides) request, all
    compiles and links sharing one pool of os.cpu_count() jobs.

    overrides maps repository paths (e.g. "csrc/packed/gemv.cu") to replacement text: the mutation
    tests' planted bugs. Only the objects that read a replaced file are rebuilt.
    """
    start = time.monotonic()
    # Each request's mutated files live in a private tree that shadows csrc/ on the include path.
    shadows = [Path(tempfile.mkdtemp(prefix="pvq-emulation-src-")) if overrides else None
               for _, overrides in requests]
    for (_, overrides), shadow in zip(requests, shadows):
        for rel, text in overrides.items():
            target = shadow / Path(rel).relative_to("csrc")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    try:
        sources = [_sources(v, overrides, shadow) for (v, overrides), shadow in zip(requests, shadows)]
        objects = [[s.cached for s in srcs] for srcs in sources]

        # A task per object (so that the slow sources of all requests overlap), then a link per request.
        def compile_object(i: int, k: int) -> None:
            (variant, overrides), source = requests[i], sources[i][k]
            _run(source.command, f"emulation compile ({variant})")
            tmp = Path(source.command[source.command.index("-o") + 1])
            objects[i][k] = _store_object(tmp, Path(source.command[-1]), CACHE / variant, source.stem, shadows[i],
                                          overrides)

        def link(i: int) -> Path:
            variant = requests[i][0]
            exe = CACHE / variant / f"emulator-{_digest(*map(str, objects[i]))}"
            if not exe.exists():
                tmp = f"{exe}.{os.getpid()}.{i}.tmp"
                _run([sources[i][0].command[0], *COMMON_FLAGS, *VARIANTS[variant], *map(str, objects[i]), "-o", tmp],
                     f"emulation link ({variant})")
                os.replace(tmp, exe)
            return exe

        todo = [(i, k) for i, objs in enumerate(objects) for k, obj in enumerate(objs) if obj is None]
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            for f in [pool.submit(compile_object, i, k) for i, k in todo]:
                f.result()
            executables = list(pool.map(link, range(len(requests))))
        seconds = time.monotonic() - start
        return [Build(v, exe, seconds) for (v, _), exe in zip(requests, executables)]
    finally:
        for shadow in shadows:
            if shadow:
                shutil.rmtree(shadow, ignore_errors=True)


def build_all(variants, overrides: dict[str, str] | None = None) -> dict[str, Build]:
    """The executable of each variant (see build_many)."""
    return {b.variant: b for b in build_many([(v, overrides or {}) for v in variants])}


def build_mutants(requests: list[tuple[str, dict[str, str]]]) -> list[Build]:
    """build_many for requests that each replace a file: the unmutated builds of their variants
    first, so that the objects a replacement does not touch are compiled once, not once a request."""
    build_all(sorted({variant for variant, _ in requests}))
    return build_many(requests)


def build(variant: str, overrides: dict[str, str] | None = None) -> Build:
    return build_all([variant], overrides)[variant]


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
    seconds: float  # the process's wall time

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

    def command(self, command: str, /, **args) -> None:
        self.lines.append(" ".join([command] + [f"{k}={v}" for k, v in args.items()]))


def start(build_: Build, manifest: Manifest, cpu: int | None = None) -> tuple[subprocess.Popen, Manifest, float]:
    """Starts the emulator on a manifest (see finish), on one CPU if given: its hundreds of threads
    hand work to each other all the time, and on one core a hand-off is a run-queue insert instead
    of a cross-core wake-up (a third less CPU time, measured)."""
    (manifest.workdir / "manifest.txt").write_text("\n".join(manifest.lines) + "\n")
    env = dict(os.environ, **SANITIZER_ENV)
    stderr = open(manifest.workdir / "stderr.txt", "w")
    proc = subprocess.Popen([str(build_.executable), str(manifest.workdir / "manifest.txt"),
                             str(manifest.workdir / "results.txt"), str(manifest.workdir / "launches.tsv")],
                            stdout=subprocess.DEVNULL, stderr=stderr, env=env,
                            preexec_fn=None if cpu is None else lambda: os.sched_setaffinity(0, {cpu}))
    stderr.close()
    return proc, manifest, time.monotonic()


def finish(started: tuple[subprocess.Popen, Manifest, float], timeout: float = 600) -> Run:
    """Waits for the emulator and reads what it wrote."""
    proc, manifest, began = started
    try:
        returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        returncode = proc.wait()
    results_path, log_path = manifest.workdir / "results.txt", manifest.workdir / "launches.tsv"
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
    seconds = time.monotonic() - began
    stderr = (manifest.workdir / "stderr.txt").read_text(errors="replace")
    return Run(returncode, stderr, results, launches, manifest.workdir, seconds)


def run(build_: Build, manifest: Manifest, timeout: float = 600) -> Run:
    return finish(start(build_, manifest), timeout)
