"""What every bench script shares: the commit being measured, and printing/saving the report."""

from __future__ import annotations

import subprocess


def git_commit() -> str:
    """Short hash of HEAD, or 'unknown' outside a git checkout."""
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
