"""`pvq-cuda compare --act`: weights and activations (W+A), perplexity against bits per activation.

One Hessian-aware PVQ quantization per weight rate (the runs share the fp model's pass), then on
each quantized model, in turn: the activations unquantized (A16), PVQ-coded with each activation
preset (the layers' integer W+A kernel, ``wa_matmul``), and the integer baselines (per-token and
per-group INT8/INT4 with the same rotation, simulated). Every row is the held-out perplexity on the
same windows as the fp32 row, with ± one standard error of the ratio, and the KL divergence from the
same weights' A16 model: at 6 and 8 bits per activation every coder is within a standard error of
A16 in perplexity, while KL, paired over the same windows, still ranks them. Each PVQ row is set
against the INT row of the same rate (within 0.05 bits per activation) by the paired difference of
their KLs. Writes ``wa_<model>.{md,json,png}``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..format.activation import ACT_PRESETS, ActivationConfig
from ..format.config import PRESETS
from ..layers.linear import PVQLinear
from ..layers.quantized_model import set_activation_coding
from ..quantization.act_baselines import parse_activation_baseline, simulated_activations
from .evaluate import mean_standard_error, perplexity
from .jobs import _fp32_row, _header as job_header, _say, _slug, prepare, run_methods
from .report import domain_summary, save_perplexity_figure, with_error, write_json, write_text

WA_WEIGHTS = ("pvq-4.25", "pvq-3.25")
WA_ACTIVATIONS = ("pvq-a8.5", "pvq-a8", "pvq-a6.25", "pvq-a4.25")
# One INT row at each PVQ preset's rate (8.02, 8.5, 6.25, 4.25 bits per activation on SmolLM2's widths:
# 576 and 1536 are multiples of 64), and the two common 4-bit layouts below and above it.
WA_BASELINES = ("int8-token", "int8-g32", "int6-g64", "int4-g64", "int4-g8", "int4-token")
EQUAL_RATE = 0.05  # bits per activation: a PVQ row and an INT row this close are compared as equals
KL_UNIT = 1e-3     # the tables' KL unit: 10^-3 nats per token


@dataclass
class WARow:
    weights: str            # "fp32" or a weight preset
    activations: str        # "fp32", "A16" (unquantized), an activation preset or an INT baseline
    label: str
    family: str             # the plot's series
    bpw: float | None       # bits per weight of the quantized decoder linears (None: fp32)
    bpa: float | None       # bits per activation of their inputs, scales included (None: unquantized)
    perplexity: float
    ratio: float
    ratio_se: float | None
    eval_seconds: float | None  # the evaluation's time (None: measured with the weight run)
    domains: dict[str, dict] = field(default_factory=dict)
    # KL(A16 ‖ this row) in nats per token, the mean over every evaluation window (all domains) and
    # its standard error; window_kl holds each window's, domain after domain (None: fp32 and A16 rows)
    kl: float | None = None
    kl_se: float | None = None
    window_kl: list[float] | None = None


def activation_bits(model, act) -> float:
    """Bits per activation over the model's PVQ layers' inputs, each layer weighted by its input
    size n (the values it codes per token): ActivationConfig or INT baseline. A PVQ layer that has
    coded tokens since its config was set counts what they cost (a second stage on the flagged
    massive tokens included, PVQLinear.activation_bits); otherwise the one-stage rate."""
    rates = []
    for m in model.modules():
        if isinstance(m, PVQLinear):
            measured = m.activation_bits() if isinstance(act, ActivationConfig) and m.act_config == act else None
            rates.append((m.in_features, act.bits_per_activation(m.in_features) if measured is None else measured))
    return math.fsum(n * r for n, r in rates) / sum(n for n, _ in rates)


def _evaluate(job, model, integer: bool, reference: dict) -> tuple[dict, float]:
    t0 = time.perf_counter()
    # decoded_cache=False: PVQ layers with coded activations run the integer W+A kernel itself.
    evals = {name: perplexity(model, w, device=job.device, decoded_cache=False if integer else None,
                              reference_logprobs=reference[name]) for name, w in job.evaluation.items()}
    return evals, time.perf_counter() - t0


def _row(job, model, fp32_eval, reference: dict, weights: str, activations: str, label: str, family: str, bpw, act,
         integer: bool = False) -> WARow:
    """Evaluate the model as it is set up; ``act``: the activation coder whose bits per activation
    the row reports (measured over this evaluation: activation_bits), or None for A16."""
    evals, secs = _evaluate(job, model, integer, reference)
    bpa = None if act is None else activation_bits(model, act)
    ppl, ratio, se, per = domain_summary(evals, fp32_eval)
    window_kl = [x for ev in evals.values() for x in ev["window_kl"]]
    kl, kl_se = mean_standard_error(window_kl)
    row = WARow(weights, activations, label, family, bpw, bpa, ppl, ratio, se, secs, per, kl, kl_se, window_kl)
    _say(f"pvq-cuda: {label}: bpa {'-' if bpa is None else f'{bpa:.3f}'}, perplexity {ppl:.3f} "
         f"({ratio:.3f}x fp32{'' if se is None else f' +- {se:.3f}'}), KL from A16 {kl / KL_UNIT:.3f}e-3, "
         f"eval {secs:.0f} s")
    return row


def _kl(value: float | None, se: float | None) -> str:
    return "" if value is None else with_error(value / KL_UNIT, None if se is None else se / KL_UNIT)


def equal_rate_pairs(rows: list[WARow]) -> list[tuple[WARow, WARow, float, float | None]]:
    """(PVQ row, INT row, mean of their per-window KL differences, its standard error) for every
    PVQ activation row and each INT row of the same weights within EQUAL_RATE bits per activation."""
    pairs = []
    for p in rows:
        if p.family != "PVQ" or p.window_kl is None:
            continue
        for q in rows:
            if (q.family.startswith("INT") and q.weights == p.weights and q.window_kl is not None
                    and abs(q.bpa - p.bpa) <= EQUAL_RATE):
                pairs.append((p, q, *mean_standard_error([a - b for a, b in zip(p.window_kl, q.window_kl)])))
    return pairs


def pairs_table(rows: list[WARow]) -> str:
    lines = ["| weights | PVQ activations | bpa | INT activations | bpa | KL PVQ | KL INT | PVQ − INT, paired | "
             "PVQ / INT |", "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for p, q, d, se in equal_rate_pairs(rows):
        lines.append(f"| {p.weights} | {p.activations} | {p.bpa:.3f} | {q.activations} | {q.bpa:.3f} | "
                     f"{_kl(p.kl, p.kl_se)} | {_kl(q.kl, q.kl_se)} | {_kl(d, se)} | {p.kl / q.kl:.2f} |")
    return "\n".join(lines)


def markdown_table(rows: list[WARow]) -> str:
    domains = list(rows[0].domains) if rows and rows[0].domains else []
    many = len(domains) > 1
    head = "| weights | activations | bpw | bpa | " + ("".join(f"{d} | " for d in domains) if many else "") + \
           "perplexity | × fp32 | KL from A16 (10⁻³ nats/token) | eval s |"
    lines = [head, "| --- | --- | ---: | ---: | " + ("---: | " * len(domains) if many else "") +
             "---: | ---: | ---: | ---: |"]
    for r in rows:
        cells = []
        if many:
            cells = [f"{r.domains[d]['perplexity']:.2f}" if r.weights == "fp32" else
                     with_error(r.domains[d]['ratio'], r.domains[d]['ratio_se']) for d in domains]
        lines.append("| " + " | ".join([r.weights, r.label, "fp32" if r.bpw is None else f"{r.bpw:.3f}",
                                        "fp32" if r.bpa is None else f"{r.bpa:.3f}", *cells, f"{r.perplexity:.3f}",
                                        with_error(r.ratio, r.ratio_se), _kl(r.kl, r.kl_se),
                                        "" if r.eval_seconds is None else f"{r.eval_seconds:.0f}"]) + " |")
    return "\n".join(lines)


def plot(rows: list[WARow], path, title: str) -> None:
    """Perplexity against bits per activation: one series per (weights, activation family); the
    fp32 model and the weight-only (A16) rows as horizontal lines. Beside it the KL from A16
    against bits per activation, the same series, both axes' errors one standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, kl_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    series: dict[str, list[WARow]] = {}
    styles = {"PVQ": "o-", "INT per-token": "s--", "INT per-group": "^:"}
    colors = {}
    for r in rows:
        if r.bpa is None:
            continue
        series.setdefault(f"W {r.weights}: {r.family}", []).append(r)
    for name, rs in series.items():
        rs = sorted(rs, key=lambda r: r.bpa)
        w = rs[0].weights
        color = colors.setdefault(w, f"C{len(colors)}")
        ax.errorbar([r.bpa for r in rs], [r.perplexity for r in rs],
                    yerr=[r.perplexity * (r.ratio_se or 0) / r.ratio for r in rs], fmt=styles[rs[0].family],
                    color=color, capsize=3, label=name)
        if all(r.kl is not None for r in rs):
            kl_ax.errorbar([r.bpa for r in rs], [r.kl for r in rs], yerr=[r.kl_se or 0 for r in rs],
                           fmt=styles[rs[0].family], color=color, capsize=3, label=name)
    for r in rows:
        if r.bpa is None:
            color = "k" if r.weights == "fp32" else colors.get(r.weights, "gray")
            ax.axhline(r.perplexity, color=color, linestyle="-." if r.weights != "fp32" else "--", linewidth=1,
                       label=f"{r.label} ({r.perplexity:.2f})")
    ax.set_xlabel("bits per activation (inputs of the quantized linears, scales included)")
    ax.set_ylabel("held-out perplexity" + (" (geometric mean over the texts)" if rows and len(rows[0].domains) > 1
                                           else ""))
    kl_ax.set_yscale("log")
    kl_ax.set_xlabel("bits per activation")
    kl_ax.set_ylabel("KL(A16 model ‖ W+A model), nats per token")
    kl_ax.set_title("KL from the same weights with unquantized activations", fontsize=9)
    kl_ax.grid(True, which="both", alpha=0.3)
    kl_ax.legend(fontsize=7)
    save_perplexity_figure(fig, ax, path, title, legend_size=7)


def _header(job, weight_logs: dict, integer: bool) -> list[str]:
    lines = [h for h in job_header(job, weight_logs) if not h.startswith("bpw:")]
    lines += ["weights: PVQ Hessian-aware, one quantization per weight rate shared by all its activation rows; bpw: "
              "bits per weight of the quantized decoder linears, everything stored counted",
              "bpa: bits per activation of those linears' inputs, each weighted by its size: PVQ (index + gain bits) / "
              "D + 16 / n (fp16 per-token scale), measured: the second stage of the massive tokens included (its "
              "flag is the scale's sign bit), INT per-token b + 16 / n, INT per-group b + 16 / G; the lm_head and "
              "the attention (q·k, p·v) stay in full precision",
              "PVQ massive tokens: a token whose norm exceeds outlier_ratio x its layer's median calibration token "
              "norm gets a second PVQ stage, its residual coded with the same config (format.activation)",
              "PVQ activations: rotated with the layer's own Hadamard rotation, coded per token online "
              + ("and multiplied by the integer W+A kernel (wa_matmul: int8 pulse dot products times gain products)"
                 if integer else "and multiplied as dequantized fp32 operands (the same product up to float rounding; "
                 "the integer kernel is tested against it)"),
              "INT baselines: symmetric round-to-nearest, fp16 scales, in the same rotated basis as the PVQ codes "
              "(QuaRot-style), no clipping; simulated in floating point",
              "KL from A16: KL(p_A16 ‖ p_row) of the next-token distributions, the same weights with unquantized "
              "activations as the reference, in 10⁻³ nats per token; the mean over every evaluation window of every "
              "text ± one standard error over those windows. Equal rates: each PVQ row against the INT rows of the "
              f"same weights within {EQUAL_RATE} bits per activation, by the mean of their per-window KL differences "
              "± its paired standard error"]
    return lines


def cmd_compare_act(args) -> int:
    """The W+A table and plot (see the module doc)."""
    t0 = time.perf_counter()
    args.out_dir = Path(args.out) if args.out else Path("bench") / "results"
    weights = args.config.split(",") if args.config else list(WA_WEIGHTS)
    acts = args.act_configs.split(",") if args.act_configs else list(WA_ACTIVATIONS)
    baselines = [b for b in (args.act_baselines.split(",") if args.act_baselines else WA_BASELINES) if b != "none"]
    for w in weights:
        if w not in PRESETS:
            raise SystemExit(f"--config {w!r}: unknown weight preset; choose from {', '.join(PRESETS)}")
    for a in acts:
        if a not in ACT_PRESETS:
            raise SystemExit(f"--act-config {a!r}: unknown activation preset; choose from {', '.join(ACT_PRESETS)}")
    parsed = [parse_activation_baseline(b) for b in baselines]
    integer = not args.act_decoded
    job = prepare(args)
    stem = args.out_dir / f"wa_{_slug(args.model)}"
    fp32, fp32_eval = _fp32_row(job)
    rows = [WARow("fp32", "fp32", "fp32 (unquantized)", "fp32", None, None, fp32.perplexity, 1.0, None, None,
                  fp32.domains)]
    logs = {}

    def save() -> str:
        md = "\n".join([f"# pvq-cuda compare --act: {job.lm.name}", "",
                        *[f"- {h}" for h in _header(job, logs, integer)],
                        f"- job time: {time.perf_counter() - t0:.0f} s", "", markdown_table(rows), "",
                        "## PVQ against INT at equal bits per activation (KL from A16)", "", pairs_table(rows), ""])
        write_text(f"{stem}.md", md)
        write_json(f"{stem}.json", {"data": job.data_info, "results": [asdict(r) for r in rows],
                                    "weight_runs": logs, "seconds": time.perf_counter() - t0})
        return md

    a16_logprobs: dict[int, dict] = {}  # the A16 rows' evaluation keeps them: the KL reference, one pass
    for k, wrow, log, model in run_methods(job, [("pvq", w, None) for w in weights], fp32_eval,
                                           logprobs=a16_logprobs):
        w = weights[k]
        logs[w] = log
        rows.append(WARow(w, "A16", f"W{PRESETS[w].code_bpw:g} A16 (weights only)", "A16", log["bpw"], None,
                          wrow.perplexity, wrow.ratio, wrow.ratio_se, None, wrow.domains))
        reference = a16_logprobs.pop(k)
        for a in acts:
            cfg = ACT_PRESETS[a]
            set_activation_coding(model, cfg)
            rows.append(_row(job, model, fp32_eval, reference, w, a,
                             f"PVQ {a} (D={cfg.D}, K={cfg.K}, {cfg.gain_bits} gain bits)", "PVQ", log["bpw"],
                             cfg, integer=integer))
            set_activation_coding(model, None)
            save()
        for q in parsed:
            with simulated_activations(model, q):
                rows.append(_row(job, model, fp32_eval, reference, w, q.name, q.label,
                                 "INT per-token" if q.group is None else "INT per-group", log["bpw"], q))
            save()
        del model, reference
    md = save()
    plot(rows, f"{stem}.png", f"{job.lm.name.split(' (')[0]}: held-out perplexity vs bits per activation (W+A)")
    print(md)
    print(f"written: {stem}.md, {stem}.json, {stem}.png")
    return 0


__all__ = ["EQUAL_RATE", "WA_ACTIVATIONS", "WA_BASELINES", "WA_WEIGHTS", "WARow", "activation_bits", "cmd_compare_act",
           "equal_rate_pairs"]
