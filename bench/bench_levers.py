"""The quality levers of Hessian-aware PVQ on the default model, one quantize-and-evaluate run each,
judged on the texts calibration did not see.

Each run copies the fp32 model, quantizes it with ``quantize_model`` under one setting, and measures
held-out perplexity on every evaluation text (default: the five text domains; calibration: the
Jargon File, 32 x 512 tokens, seed 0, as ``pvq-cuda quantize``). A setting is ``D,K,gain_bits``
followed by any of ``ao`` (act-order), ``ms`` (metric search), ``fp`` (fp targets),
``refine=<passes>``, ``tune=<epochs>`` (tuning within blocks), ``seed=<rotation seed>``,
``damp=<lambda>``, ``n=<calibration windows>``, ``calib=<text>+<text>...`` (calibration texts, a mix
drawn as ``pvq-cuda quantize --calib`` draws it; default ``--calib``):

    python bench/bench_levers.py 16,30,2,fp 16,30,2 16,30,2,fp,n=64 8,16,2,fp --out levers.md
    python bench/bench_levers.py 16,30,2 16,30,2,calib=jargon+python-docs --out levers-mix.md

The first setting is the reference. Every other row is compared with it *paired*: on the same
held-out windows of each text, the per-window differences of log-perplexity give the ratio's
standard error (:func:`pvq_cuda.apps.evaluate.ratio_standard_error`), so a lever's effect is told
apart from the spread of the text. Every setting is evaluated on the same held-out windows
(each text's tail, which no calibration draws from). "out of domain" is the geometric mean over
the evaluation texts that no setting calibrated on; its standard error adds the texts' in quadrature. Each row also
reports the mean per-layer loss (the H-weighted relative error of a layer on its calibration
inputs).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import time

import torch

from bench_common import emit, git_commit
from pvq_cuda.format.config import PVQConfig
from pvq_cuda.apps.corpus import geometric_mean
from pvq_cuda.apps.domains import CALIBRATION_DOMAIN, EVALUATION_DOMAINS
from pvq_cuda.apps.evaluate import perplexity, ratio_standard_error
from pvq_cuda.apps.jobs import prepare
from pvq_cuda.pipeline import quantize_model

FLAGS = {"ao": "act_order", "ms": "metric_search", "fp": "fp_targets"}


def parse_setting(text: str) -> tuple[PVQConfig, dict]:
    parts = text.split(",")
    if len(parts) < 3:
        raise SystemExit(f"setting {text!r}: expected D,K,gain_bits[,flags]")
    D, K, bits = (int(p) for p in parts[:3])
    seed, kwargs = 0, {}
    for flag in parts[3:]:
        if flag in FLAGS:
            kwargs[FLAGS[flag]] = True
        elif flag.startswith("seed="):
            seed = int(flag[5:])
        elif flag.startswith("damp="):
            kwargs["damp"] = float(flag[5:])
        elif flag.startswith("refine="):
            kwargs["refine_passes"] = int(flag[7:])
        elif flag.startswith("tune="):
            kwargs["tune_epochs"] = int(flag[5:])
        elif flag.startswith("n="):
            kwargs["nsamples"] = int(flag[2:])
        elif flag.startswith("calib="):
            kwargs["calib"] = flag[6:].replace("+", ",")
        else:
            raise SystemExit(f"setting {text!r}: unknown flag {flag!r}")
    return PVQConfig(D=D, K=K, scale_bits=bits, seed=seed), kwargs


def perplexity_ratio(nll: list[float], ref_nll: list[float]) -> float:
    """Perplexity over the windows of ``nll`` divided by that of ``ref_nll`` (the same windows)."""
    return math.exp(sum(nll) / len(nll) - sum(ref_nll) / len(ref_nll))


def paired_geo_mean(nll: dict, ref_nll: dict, texts: list[str]) -> tuple[float, float | None]:
    """Geometric mean over ``texts`` of the perplexity ratio against the reference on the same windows,
    and its standard error (the texts' relative errors in quadrature, divided by their number)."""
    ratios, rel = [], []
    for t in texts:
        ratios.append(perplexity_ratio(nll[t], ref_nll[t]))
        se = ratio_standard_error(nll[t], ref_nll[t])
        rel.append(None if se is None else se / ratios[-1])
    g = geometric_mean(ratios)
    return g, (None if None in rel else g * math.sqrt(sum(r * r for r in rel)) / len(rel))


def _fmt(ratio: float, se: float | None) -> str:
    return f"{ratio:.4f}" + ("" if se is None else f" ± {se:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+",
                        help="D,K,gain_bits[,ao][,ms][,fp][,refine=N][,tune=E][,seed=S][,damp=L][,n=WINDOWS]"
                             "[,calib=TEXT+TEXT]; the first is the reference")
    parser.add_argument("--calib", default=CALIBRATION_DOMAIN, help="calibration texts (as pvq-cuda quantize)")
    parser.add_argument("--eval", default=",".join(EVALUATION_DOMAINS), help="evaluation texts")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows (a setting's n= overrides)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8, help="held-out windows per text")
    parser.add_argument("--out")
    args = parser.parse_args()
    runs = [(s, *parse_setting(s)) for s in args.settings]

    def job_for(nsamples: int, calib: str):
        return prepare(argparse.Namespace(model=None, calib=calib, eval=args.eval, nsamples=nsamples,
                                          seqlen=args.seqlen, eval_windows=args.eval_windows, eval_seqlen=None,
                                          seed=0, device="cpu"))

    jobs = {(args.nsamples, args.calib): job_for(args.nsamples, args.calib)}
    job = jobs[(args.nsamples, args.calib)]
    texts = list(job.evaluation)
    calibrated = set(args.calib.split(",")).union(*(k.get("calib", args.calib).split(",") for _, _, k in runs))
    outside = [t for t in texts if t not in calibrated]
    fp32 = {t: perplexity(job.lm.model, w) for t, w in job.evaluation.items()}
    fp32_nll = {t: e["window_nll"] for t, e in fp32.items()}
    lines = [f"# PVQ levers out of domain on {job.lm.name}, CPU ({torch.get_num_threads()} threads), "
             f"{datetime.date.today()}, commit {git_commit()}", "",
             f"Calibration: {args.calib}, {args.nsamples} x {args.seqlen} tokens unless a setting says n= or calib=, "
             "seed 0. "
             f"Evaluation: {args.eval_windows} x {args.seqlen} held-out tokens of each of {', '.join(texts)}; "
             f"out of domain = {', '.join(outside)}. fp32 perplexity: "
             + ", ".join(f"{t} {e['perplexity']:.2f}" for t, e in fp32.items()) + ".", "",
             "Per text: × fp32 (± one standard error, paired over windows). The last columns compare each setting "
             f"with the first ({runs[0][0]}) on the same windows: below 1 is better.", "",
             "| setting | bpw | " + " | ".join(texts) + " | × fp32, out of domain | vs reference, out of domain "
             "| vs reference, calibration text | mean layer loss | seconds |",
             "|---|---|" + "---|" * len(texts) + "---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    ref_nll = None
    for text, config, kwargs in runs:
        key = (kwargs.pop("nsamples", args.nsamples), kwargs.pop("calib", args.calib))
        if key not in jobs:
            jobs[key] = job_for(*key)
        model = copy.deepcopy(job.lm.model)
        t0 = time.perf_counter()
        log = quantize_model(model, jobs[key].calibration, config, progress=False, **kwargs)
        seconds = time.perf_counter() - t0
        nll = {t: perplexity(model, w)["window_nll"] for t, w in job.evaluation.items()}
        cells = [_fmt(perplexity_ratio(nll[t], fp32_nll[t]), ratio_standard_error(nll[t], fp32_nll[t]))
                 for t in texts]
        out_fp32 = paired_geo_mean(nll, fp32_nll, outside)
        ref_nll = ref_nll or nll
        vs_out = paired_geo_mean(nll, ref_nll, outside)
        inside = [t for t in texts if t in calibrated]
        vs_in = paired_geo_mean(nll, ref_nll, inside) if inside else (float("nan"), None)
        loss = sum(e["loss"] for e in log["layers"]) / len(log["layers"])
        lines.append(f"| {text} | {log['bpw']:.4f} | " + " | ".join(cells)
                     + f" | {_fmt(*out_fp32)} | {_fmt(*vs_out)} | {_fmt(*vs_in)} | {loss:.5f} | {seconds:.0f} |")
        print(lines[-1], flush=True)
        del model
    emit(lines, args.out)


if __name__ == "__main__":
    main()
