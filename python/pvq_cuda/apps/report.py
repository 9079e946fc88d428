"""Result rows of the quantize and compare jobs: a Markdown table, a JSON file and a plot."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Row:
    method: str          # method name as run (e.g. "pvq", "gptq-rot-int3", "fp32")
    label: str           # what the table prints
    family: str          # the plot's series: "RTN", "GPTQ", "GPTQ rotated", "PVQ data-free", ...
    bpw: float           # bits per weight of the quantized decoder linears, everything stored counted
    perplexity: float
    ratio: float         # perplexity / fp32 perplexity
    seconds: float | None  # quantization time (Hessians included); None for fp32
    note: str = ""
    ratio_se: float | None = None  # one standard error of ratio (evaluate.ratio_standard_error)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| method | bpw | perplexity | × fp32 | quantization s |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        secs = "" if r.seconds is None else f"{r.seconds:.1f}"
        label = r.label + (f" ({r.note})" if r.note else "")
        ratio = f"{r.ratio:.3f}" + ("" if r.ratio_se is None else f" ± {r.ratio_se:.3f}")
        lines.append(f"| {label} | {r.bpw:.3f} | {r.perplexity:.3f} | {ratio} | {secs} |")
    return "\n".join(lines)


def _atomic(path: str | os.PathLike, write) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path`` (parents created), then rename it over
    ``path``: a reader never sees half a file, even when a long job is stopped mid-write."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}{p.suffix}")
    try:
        write(tmp)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as JSON, atomically."""
    text = json.dumps(obj, indent=1, default=lambda o: asdict(o) if isinstance(o, Row) else str(o)) + "\n"
    _atomic(path, lambda tmp: tmp.write_text(text))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file, atomically."""
    _atomic(path, lambda tmp: tmp.write_text(text))


def plot(rows: list[Row], path: str | os.PathLike, title: str) -> None:
    """Perplexity (log scale) against bpw, one series per method family, fp32 as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list[Row]] = {}
    fp32 = None
    for r in rows:
        if r.method == "fp32":
            fp32 = r
            continue
        families.setdefault(r.family, []).append(r)
    for family, rs in families.items():
        rs = sorted(rs, key=lambda r: r.bpw)
        ax.plot([r.bpw for r in rs], [r.perplexity for r in rs], marker="o", label=family)
    if fp32 is not None:
        ax.axhline(fp32.perplexity, color="k", linestyle="--", linewidth=1, label=f"fp32 ({fp32.perplexity:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (decoder linears, everything stored)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        _atomic(path, lambda tmp: fig.savefig(tmp, dpi=120))
    finally:
        plt.close(fig)
