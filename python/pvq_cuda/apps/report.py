"""Result rows of the quantize and compare jobs: a Markdown table, a JSON file and a plot."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

from ..format import atomic


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
    # per evaluation domain: {"perplexity", "ratio", "ratio_se"}; then perplexity and ratio above are
    # the geometric means over the domains and ratio_se the standard error of that mean
    domains: dict[str, dict] = field(default_factory=dict)
    eval_seconds: float | None = None  # the evaluation's time, every domain together


def domain_summary(evals: dict[str, dict], reference: dict[str, dict] | None) -> tuple[float, float, float | None,
                                                                                      dict[str, dict]]:
    """(geometric-mean perplexity, geometric-mean ratio, its standard error, per-domain results) of
    a model's :func:`~pvq_cuda.apps.evaluate.perplexity` results per domain against ``reference``'s
    (fp32's; None: this is the reference). The domains are independent texts, so the log-ratio
    standard errors add in quadrature: se(log R) = sqrt(sum se_d^2 / r_d^2) / n."""
    from .evaluate import ratio_standard_error

    per = {}
    for name, ev in evals.items():
        ref = reference[name] if reference is not None else ev
        se = ratio_standard_error(ev["window_nll"], ref["window_nll"]) if reference is not None else None
        per[name] = {"perplexity": ev["perplexity"], "ratio": ev["perplexity"] / ref["perplexity"], "ratio_se": se}
    n = len(per)
    ppl = math.exp(math.fsum(math.log(d["perplexity"]) for d in per.values()) / n)
    ratio = math.exp(math.fsum(math.log(d["ratio"]) for d in per.values()) / n)
    ses = [d["ratio_se"] for d in per.values()]
    se = None if any(x is None for x in ses) else ratio * math.sqrt(math.fsum((x / d["ratio"]) ** 2 for x, d in
                                                                             zip(ses, per.values()))) / n
    return ppl, ratio, se, per


def with_error(value: float, se: float | None) -> str:
    """A table cell: ``value ± se`` to three decimals, or the value alone without an error."""
    return f"{value:.3f}" + ("" if se is None else f" ± {se:.3f}")


def markdown_table(rows: list[Row]) -> str:
    """One line per row. With several evaluation domains: each domain's ratio to fp32 (fp32's row:
    its perplexity), then the geometric means over the domains."""
    domains = list(rows[0].domains) if rows and rows[0].domains else []
    if len(domains) < 2:
        lines = ["| method | bpw | perplexity | × fp32 | quantization s |", "| --- | ---: | ---: | ---: | ---: |"]
    else:
        lines = ["| method | bpw | " + " | ".join(domains) + " | perplexity (geo. mean) | × fp32 (geo. mean) | "
                 "quantization s |", "| --- | ---: | " + "---: | " * len(domains) + "---: | ---: | ---: |"]
    for r in rows:
        secs = "" if r.seconds is None else f"{r.seconds:.1f}"
        label = r.label + (f" ({r.note})" if r.note else "")
        cells = []
        if len(domains) >= 2:
            cells = [f"{r.domains[d]['perplexity']:.2f}" if r.method == "fp32" else
                     with_error(r.domains[d]["ratio"], r.domains[d]["ratio_se"]) for d in domains]
        lines.append("| " + " | ".join([label, f"{r.bpw:.3f}", *cells, f"{r.perplexity:.3f}",
                                        with_error(r.ratio, r.ratio_se), secs]) + " |")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` (Rows included) as JSON, atomically."""
    atomic.write_json(path, obj, default=lambda o: asdict(o) if isinstance(o, Row) else str(o))


write_text = atomic.write_text


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
    ax.set_xlabel("bits per weight (decoder linears, everything stored)")
    ax.set_ylabel("held-out perplexity" + (" (geometric mean over the domains)" if fp32 and fp32.domains else ""))
    save_perplexity_figure(fig, ax, path, title, legend_size=8)


def save_perplexity_figure(fig, ax, path: str | os.PathLike, title: str, legend_size: int) -> None:
    """Finish a perplexity plot (log scale, title, grid, legend) and write it as PNG, atomically;
    the figure is closed either way."""
    import matplotlib.pyplot as plt

    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    try:
        atomic.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), make_parents=True)
    finally:
        plt.close(fig)
