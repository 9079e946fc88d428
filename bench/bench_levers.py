"""The quality levers of Hessian-aware PVQ on the default model, one quantize-and-evaluate run each.

Each run copies the fp32 model, quantizes it with ``quantize_model`` under one setting and
measures held-out perplexity on the same windows as ``pvq-cuda compare`` (defaults: 32 x 512
calibration tokens, 16 x 512 held-out tokens, seed 0). A setting is ``D,K,gain_bits`` followed by
any of ``ao`` (act-order), ``ms`` (metric search), ``fp`` (fp targets), ``refine=<passes>``,
``seed=<rotation seed>``, ``damp=<lambda>``; ``--eval-windows 0`` scores every held-out window:

    python bench/bench_levers.py 16,30,2 16,30,2,fp 16,30,2,fp,seed=1 8,16,2,ao,ms --out levers.md

Every row also reports the mean per-layer loss (the H-weighted relative error of the layer on
its calibration inputs): it moves far more smoothly than one perplexity draw, which differs by
about ±1.5 % between rotation seeds at the same setting. The ratio's ± is one standard error over
the held-out windows (:func:`pvq_cuda.apps.evaluate.ratio_standard_error`).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import time

import torch

from bench_common import emit, git_commit
from pvq_cuda.format.config import PVQConfig
from pvq_cuda.apps.corpus import make_windows, read_text, tokenize
from pvq_cuda.apps.evaluate import perplexity, ratio_standard_error
from pvq_cuda.apps.loading import load_model
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
        else:
            raise SystemExit(f"setting {text!r}: unknown flag {flag!r}")
    return PVQConfig(D=D, K=K, scale_bits=bits, seed=seed), kwargs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+", help="D,K,gain_bits[,ao][,ms][,fp][,refine=N][,seed=S][,damp=L]")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16, help="held-out windows (0: all of them)")
    parser.add_argument("--out")
    args = parser.parse_args()
    runs = [(s, *parse_setting(s)) for s in args.settings]

    lm = load_model(None, quiet=True)
    ids = tokenize(lm.tokenizer, read_text(None)[0])
    win = make_windows(ids, nsamples=args.nsamples, seqlen=args.seqlen, eval_windows=args.eval_windows or None)
    fp32_eval = perplexity(lm.model, win.evaluation)
    fp32 = fp32_eval["perplexity"]
    lines = [f"# PVQ levers on {lm.name}, CPU ({torch.get_num_threads()} threads), {datetime.date.today()}, "
             f"commit {git_commit()}", "",
             f"{args.nsamples} x {args.seqlen} calibration tokens, {win.evaluation.shape[0]} x {args.seqlen} held-out; "
             f"fp32 perplexity {fp32:.3f}", "",
             "| setting | bpw | perplexity | × fp32 | mean layer loss | seconds |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for text, config, kwargs in runs:
        model = copy.deepcopy(lm.model)
        t0 = time.perf_counter()
        log = quantize_model(model, win.calibration, config, progress=False, **kwargs)
        seconds = time.perf_counter() - t0
        ev = perplexity(model, win.evaluation)
        ppl, se = ev["perplexity"], ratio_standard_error(ev["window_nll"], fp32_eval["window_nll"])
        loss = sum(e["loss"] for e in log["layers"]) / len(log["layers"])
        ratio = f"{ppl / fp32:.4f}" + ("" if se is None else f" ± {se:.4f}")
        lines.append(f"| {text} | {log['bpw']:.4f} | {ppl:.3f} | {ratio} | {loss:.5f} | {seconds:.0f} |")
        print(lines[-1], flush=True)
        del model
    emit(lines, args.out)


if __name__ == "__main__":
    main()
