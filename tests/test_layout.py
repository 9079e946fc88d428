"""The package's layers (README "Layout") hold, checked by import-linter's contracts in pyproject.toml.

The contracts pass on the source tree, and fail on copies with a planted upward import and a
planted import circle, so the check is one that can fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (requirements.txt)")

LAYERS = "each subpackage of pvq_cuda imports only the layers below it"
CIRCLES = "no import circles among the modules of any package of pvq_cuda"


def lint(tree: Path) -> subprocess.CompletedProcess:
    """lint-imports on the package under ``tree/python`` with the project's contracts."""
    env = dict(os.environ, PYTHONPATH=str(tree / "python"))
    return subprocess.run([str(LINT), "--no-cache", "--config", str(ROOT / "pyproject.toml")], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)


def copy_with(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of the package's sources with ``line`` appended to ``module`` (a path under pvq_cuda/)."""
    shutil.copytree(ROOT / "python", tmp_path / "python", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    with open(tmp_path / "python" / "pvq_cuda" / module, "a") as f:
        f.write(f"\n{line}\n")
    return tmp_path


def test_contracts_hold():
    r = lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{LAYERS} KEPT" in r.stdout and f"{CIRCLES} KEPT" in r.stdout


@pytest.mark.parametrize("module,line,broken", [
    ("ops/checks.py", "from ..apps import report  # noqa: E402,F401", LAYERS),       # ops reaching up to apps
    ("format/weight.py", "from ..layers import linear  # noqa: E402,F401", LAYERS),  # format reaching up to layers
    ("format/config.py", "from . import checkpoint  # noqa: E402,F401", CIRCLES),   # config -> checkpoint -> config
])
def test_planted_violation_is_caught(tmp_path, module, line, broken):
    r = lint(copy_with(tmp_path, module, line))
    assert r.returncode != 0 and f"{broken} BROKEN" in r.stdout, r.stdout + r.stderr
