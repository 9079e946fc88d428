"""What every bench script shares: the commit being measured, and printing/saving the report."""

from __future__ import annotations

import json
import os
import subprocess


def git_commit() -> str:
    """$PVQ_COMMIT if set (a copy of the tree without .git, e.g. on the GPU machine), else the
    short hash of HEAD, else 'unknown'."""
    if os.environ.get("PVQ_COMMIT"):
        return os.environ["PVQ_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        out = ""
    return out or "unknown"


def emit(lines: list[str], out: str | None) -> None:
    """Print the report and, with ``out``, write it there as markdown."""
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


def append_json(path: str | None, record: dict) -> None:
    """Append ``record`` as one JSON line to ``path`` (nothing without a path): every bench of a
    gpu_validation.sh run adds its numbers to one results file that gpu_summary.py reads."""
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
