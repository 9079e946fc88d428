"""bench/gpu_validation.sh, rehearsed end to end on the CPU so that a typo cannot waste the minutes
of a lent GPU (PVQ_GPU_REHEARSAL=1: stub nvidia-smi and compute-sanitizer, pip --dry-run, every
bench on the CPU at tiny shapes); its summary's verdicts; and the `cuda` marker that picks its
tests."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import requires_cuda, runs_cuda

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_validation.sh"
STUBS = sorted((ROOT / "bench" / "rehearsal").iterdir())
STEPS = ["environment", "build", "gate", "bench-matmul", "bench-hadamard", "bench-hessian", "bench-codec",
         "quantize-8b-block", "quantize-smollm2", "tests", "sanitizer-memcheck", "sanitizer-racecheck"]
FILES = {"environment.txt", "build.log", "bench.md", "quantize.md", "results.json", "tests.log", "sanitizer.log",
         "summary.txt"}
NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device tool brings back
BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="needs bash")

sys.path.insert(0, str(ROOT / "bench"))
import gpu_summary  # noqa: E402


def _run(out: Path, tmp: Path, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PVQ_GPU_")}
    full.update({"OUT": str(out), "TMPDIR": str(tmp), "PVQ_PYTHON": sys.executable, "PVQ_COMMIT": "rehearsal", **env})
    return subprocess.run([BASH, str(SCRIPT)], env=full, capture_output=True, text=True, timeout=600, cwd=tmp)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out, tmp = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("tmp")
    proc = _run(out, tmp, PVQ_GPU_REHEARSAL="1")
    return out, proc


def _steps(summary: str) -> dict[str, str]:
    """step -> status, read back from the printed summary's steps table."""
    found = {}
    for line in summary.split("\nheadline")[0].split("\n(no benchmark results)")[0].splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in STEPS:
            found[parts[0]] = parts[1]
    return found


@needs_bash
def test_script_parses_and_is_shellcheck_clean():
    for path in [SCRIPT, *STUBS]:
        subprocess.run([BASH, "-n", str(path)], check=True)
        assert os.access(path, os.X_OK) or path == SCRIPT, f"{path} is not executable"
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(SCRIPT), *map(str, STUBS)], check=True)


@needs_bash
def test_rehearsal_passes_and_prints_the_summary_last(rehearsal):
    _, proc = rehearsal
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr == "", proc.stderr
    tail = proc.stdout.strip().splitlines()
    assert tail[-1] == "verdict: every step passed"
    summary = proc.stdout[proc.stdout.rindex("== pvq_cuda GPU validation REHEARSAL"):]
    assert "headline" in summary and "matmul output vs dense reference" in summary
    assert _steps(summary) == {s: ("REFUSED" if s == "sanitizer-racecheck" else "ok") for s in STEPS}


@needs_bash
def test_rehearsal_files_come_back(rehearsal):
    out, _ = rehearsal
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8
    (folder,) = [p for p in out.iterdir()]
    assert folder.is_dir() and NAME.match(folder.name) and folder.name.startswith("Rehearsal_CPU-")
    for p in files:
        rel = p.relative_to(out).parts
        assert len(rel) == 2 and all(NAME.match(part) for part in rel), rel  # $OUT/<device>-<date>/<file>
    assert {p.name for p in files} == FILES


@needs_bash
def test_rehearsal_every_step_logged(rehearsal):
    out, _ = rehearsal
    (folder,) = list(out.iterdir())
    logs = {p.name: p.read_text() for p in folder.iterdir()}
    where = {"environment": "environment.txt", "build": "build.log", "gate": "build.log", "tests": "tests.log",
             "quantize-8b-block": "quantize.md", "quantize-smollm2": "quantize.md", "sanitizer-memcheck": "sanitizer.log", "sanitizer-racecheck": "sanitizer.log"}
    for step in STEPS:
        assert f"## {step} (limit " in logs[where.get(step, "bench.md")], step
    assert "Would install pvq_cuda" in logs["build.log"] and "gate passed" in logs["build.log"]
    assert "nvidia-smi (rehearsal stub)" in logs["environment.txt"]
    for title in ("# pvq_matmul", "# bench_hadamard", "# hessian_accumulate_", "# bench_codec"):
        assert title in logs["bench.md"], title
    assert logs["quantize.md"].count("## tiny: hidden 64") == 2
    assert re.search(r"\d+ skipped, \d+ deselected", logs["tests.log"])  # -m cuda picked the CUDA tests
    assert "ERROR SUMMARY: 0 errors" in logs["sanitizer.log"] and "Device not supported" in logs["sanitizer.log"]
    benches = [json.loads(line)["bench"] for line in logs["results.json"].splitlines()]
    assert sorted(benches) == ["codec", "hadamard", "hessian", "matmul", "quantize", "quantize"]
    assert logs["summary.txt"].strip().endswith("verdict: every step passed")


@needs_bash
def test_broken_build_stops_at_once(tmp_path):
    """A build that fails ends the call with the summary, before any benchmark; with the Python
    itself broken the summary falls back to the raw steps table."""
    out = tmp_path / "out"
    out.mkdir()
    proc = _run(out, tmp_path, PVQ_GPU_REHEARSAL="1", PVQ_PYTHON="false")
    assert proc.returncode == 1
    assert "build or gate failed: stopping here" in proc.stdout
    assert "bench-matmul" not in proc.stdout
    summary = next(out.rglob("summary.txt")).read_text()
    assert "gpu_summary.py failed" in summary and re.search(r"^build\tFAIL\(rc=1\)", summary, re.M)


@needs_bash
def test_refusing_sanitizer_is_passed_over(tmp_path):
    """On gVisor compute-sanitizer refuses the device: memcheck is REFUSED (not a failure) and
    racecheck is not tried again. Also the rerun form: only the steps named in PVQ_GPU_STEPS run."""
    out = tmp_path / "out"
    out.mkdir()
    proc = _run(out, tmp_path, PVQ_GPU_REHEARSAL="1", PVQ_REHEARSAL_SANITIZER="refuse",
                PVQ_GPU_STEPS="sanitizer-memcheck sanitizer-racecheck")
    assert proc.returncode == 0, proc.stdout[-3000:]
    summary = proc.stdout[proc.stdout.rindex("== pvq_cuda GPU validation"):]
    assert _steps(summary) == {"environment": "ok", "build": "ok", "gate": "ok", "sanitizer-memcheck": "REFUSED",
                               "sanitizer-racecheck": "REFUSED"}
    assert "as memcheck was" in summary
    assert next(out.rglob("sanitizer.log")).read_text().count("Device not supported") == 1


def _matmul(speedup1: float, ok: bool = True) -> dict:
    row = dict(shape="4096x14336", pvq_us=10.0, dense_us=10.0 * speedup1, pvq_gbps=3000.0, dense_gbps=3500.0,
               check_error=1e-3, check_ok=ok)
    return {"bench": "matmul", "copy_gbps": 4000.0, "peak_gbps": 4800, "rows": [
        dict(row, batch=1, speedup=speedup1), dict(row, batch=16, speedup=2.4), dict(row, batch=128, speedup=0.95)]}


def test_summary_verdicts_against_targets():
    results = {"matmul": [_matmul(3.6)], "hadamard": [{"rows": [{"n": 4096, "dtype": "bfloat16", "ratio": 1.1},
                                                                 {"n": 14336, "dtype": "float16", "ratio": 1.3}]}],
               "hessian": [{"rows": [{"n": 4096, "tokens": 16384, "dtype": "bfloat16", "speedup": 4.5, "pvq_ms": 1.0,
                                      "torch_ms": 4.5, "pvq_rel_error": 1e-7}]}]}
    rows = {r[0]: r[3] for r in gpu_summary.headlines(results, rehearsal=False)}
    assert rows["matmul 4096x14336 batch 1: speedup over cuBLAS fp16"] == "met"
    assert rows["matmul 4096x14336 batch 16: speedup over cuBLAS fp16"] == "MISSED"  # 2.4 < 2.5
    assert rows["matmul 4096x14336 batch 128: speedup over cuBLAS fp16"] == "met"
    assert rows["decode bandwidth 4096x14336 batch 1"] == "met"  # 3000 of a 4000 GB/s copy: 75 %
    assert rows["hadamard n=4096: time / clone"] == "met" and rows["hadamard n=14336: time / clone"] == "MISSED"
    assert rows["hessian n=4096, 16384 bfloat16 tokens: speedup over addmm_"] == "met"
    assert rows["matmul output vs CPU path (max rel. err)"] == "ok"
    failed = {r[0]: r[3] for r in gpu_summary.headlines({"matmul": [_matmul(3.6, ok=False)]}, rehearsal=False)}
    assert failed["matmul output vs CPU path (max rel. err)"] == "FAILED"
    assert {r[3] for r in gpu_summary.headlines({"matmul": [_matmul(1.0)]}, rehearsal=True)} >= {"n/a (rehearsal)"}


@pytest.mark.parametrize("name,status,fails", [
    ("tests", "ok", False), ("tests", "FAIL(rc=1)", True), ("tests", "TIMEOUT", True), ("tests", "SKIP", True),
    ("sanitizer-memcheck", "REFUSED", False), ("sanitizer-memcheck", "not-found", False),
    ("sanitizer-memcheck", "FAIL(3 errors)", True), ("sanitizer-racecheck", "TIMEOUT", False),
    ("sanitizer-racecheck", "SKIP", False), ("sanitizer-racecheck", "FAIL(rc=1)", True)])
def test_summary_step_verdicts(name, status, fails):
    assert gpu_summary.step_fails({"name": name, "status": status, "note": ""}) is fails


def test_marker_rule():
    def item(device=None, skipif_reasons=()):
        callspec = SimpleNamespace(params={"device": device}) if device else None
        marks = [SimpleNamespace(kwargs={"reason": r}) for r in skipif_reasons]
        return SimpleNamespace(callspec=callspec, iter_markers=lambda name: iter(marks if name == "skipif" else []))

    assert runs_cuda(item(device="cuda"))
    assert not runs_cuda(item(device="cpu"))
    assert runs_cuda(item(skipif_reasons=[requires_cuda.kwargs["reason"]]))
    assert not runs_cuda(item(skipif_reasons=["POSIX permissions"]))
    assert not runs_cuda(item())


def _about_cuda(name: str) -> bool:
    """A test named for CUDA (not for the package, pvq_cuda)."""
    return "cuda" in name.replace("pvq_cuda", "")


def _cuda_named_tests_unmarkable(folder: Path) -> list[str]:
    """Tests with "cuda" in their name that the marker rule cannot see: neither requires_cuda (on
    the function or the module), nor taking the device fixture (whose [cuda] case it marks)."""
    bad = []
    for path in sorted(folder.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_marked = any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
                            and "requires_cuda" in ast.unparse(n.value) for n in tree.body)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test") and _about_cuda(node.name):
                marked = any("requires_cuda" in ast.unparse(d) for d in node.decorator_list)
                takes_device = any(a.arg == "device" for a in node.args.args)
                if not (module_marked or marked or takes_device):
                    bad.append(f"{path.name}::{node.name}")
    return bad


def test_marker_covers_every_gpu_test(request):
    """`pytest -m cuda` (gpu_validation.sh's test step) must not leave out a test that is about
    CUDA: every test with "cuda" in its name is requires_cuda or takes the device fixture, and
    every such test collected in this session carries the marker."""
    assert _cuda_named_tests_unmarkable(ROOT / "tests") == []
    collected = [item for item in request.session.items if _about_cuda(item.originalname)]
    assert all(item.get_closest_marker("cuda") for item in collected)
    assert all(item.get_closest_marker("cuda") for item in request.session.items if item.path.name == "test_cuda.py")


def test_unmarkable_gpu_test_is_found(tmp_path):
    (tmp_path / "test_planted.py").write_text(
        "from conftest import requires_cuda\n\n@requires_cuda\ndef test_cuda_marked():\n    pass\n\n"
        "def test_cuda_with_device(device):\n    pass\n\ndef test_cuda_forgotten():\n    pass\n\n"
        "def test_import_pvq_cuda():\n    pass\n")
    assert _cuda_named_tests_unmarkable(tmp_path) == ["test_planted.py::test_cuda_forgotten"]
