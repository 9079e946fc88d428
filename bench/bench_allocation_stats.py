"""How many calibration windows the ``bpw=`` allocation's statistics need, on the default model.

``quantize_model(bpw=R)`` takes each layer's Hessian statistic from the first calibration windows
(``pipeline/allocate.py``: ``HESSIAN_TOKENS``, ``TOKENS_PER_INPUT``) and its output sensitivity F
from fewer (``SENSITIVITY_TOKENS``). This script computes them that way and from every window (F
from ``--reference-sensitivity-tokens``), times both, and compares the allocations they give at
each rate by their predicted loss under the every-window statistics (the best that statistics can
do, by that measure): 0 % would mean the first windows lose nothing.

    python bench/bench_allocation_stats.py [--rates 2.25,3.25] [--out allocation-stats.md]

Calibration as ``pvq-cuda quantize``: the Jargon File, 32 x 512 tokens, seed 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import time

import torch

from bench_common import emit, git_commit
from pvq_cuda.apps.domains import CALIBRATION_DOMAIN
from pvq_cuda.apps.jobs import prepare as prepare_job
from pvq_cuda.format.config import PVQConfig
from pvq_cuda.layers.decoder import linears
from pvq_cuda.pipeline import allocate as alloc
from pvq_cuda.pipeline import api
from pvq_cuda.quantization.allocation import allocate, candidates, distortion


def statistics(run, names: set[str]) -> tuple[dict, float, float]:
    """(LayerStats with F, seconds of the Hessian pass, seconds of the sensitivity pass)."""
    t0 = time.perf_counter()
    stats = alloc.fp_layer_stats(run, names)
    t1 = time.perf_counter()
    sens = alloc.output_sensitivity(run.model, names, run.chunks, run.config.seed)
    t2 = time.perf_counter()
    return {n: dataclasses.replace(s, sensitivity=sens[n]) for n, s in stats.items()}, t1 - t0, t2 - t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="2.25,3.25", help="comma-separated bits per weight")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32, as quantize)")
    parser.add_argument("--reference-sensitivity-tokens", type=int, default=4096,
                        help="tokens the reference F is averaged over (default 4096)")
    parser.add_argument("--out")
    args = parser.parse_args()
    job = prepare_job(argparse.Namespace(model=None, calib=CALIBRATION_DOMAIN, eval=CALIBRATION_DOMAIN,
                                         nsamples=args.nsamples, seqlen=512, eval_windows=1, eval_seqlen=None,
                                         seed=0, device="cpu"))
    defaults = {n: p.default for n, p in inspect.signature(api.quantize_model).parameters.items()
                if n not in ("model", "calibration", "config")}
    run = api.prepare(job.lm.model, job.calibration, None, **dict(defaults, progress=False))
    names = {f"model.layers.{i}.{rel}" for i, block in enumerate(run.layers) for rel in linears(block)}

    first, first_h, first_f = statistics(run, names)
    hessian_tokens = sum(c.numel() for c in alloc.leading_windows(run.chunks, alloc.hessian_tokens(run, names)))
    saved = alloc.HESSIAN_TOKENS, alloc.SENSITIVITY_TOKENS
    alloc.HESSIAN_TOKENS, alloc.SENSITIVITY_TOKENS = 10**12, args.reference_sensitivity_tokens
    try:
        every, every_h, every_f = statistics(run, names)
    finally:
        alloc.HESSIAN_TOKENS, alloc.SENSITIVITY_TOKENS = saved
    total = sum(c.numel() for c in run.chunks)

    lines = [f"# The allocation's statistics from the first calibration windows, {job.lm.name}, CPU "
             f"({torch.get_num_threads()} threads), {datetime.date.today()}, commit {git_commit()}", "",
             f"Calibration: {CALIBRATION_DOMAIN}, {args.nsamples} x 512 tokens, seed 0. "
             "Reproduce: `python bench/bench_allocation_stats.py`.", "",
             "| statistics | Hessian tokens | F tokens | Hessian pass s | sensitivity pass s |",
             "| --- | ---: | ---: | ---: | ---: |",
             f"| first windows (quantize_model's) | {hessian_tokens} | {alloc.SENSITIVITY_TOKENS} | "
             f"{first_h:.1f} | {first_f:.1f} |",
             f"| every window (reference) | {total} | {args.reference_sensitivity_tokens} | {every_h:.1f} | "
             f"{every_f:.1f} |", "",
             "| bpw | layers whose config differs | predicted loss above the reference's allocation, under the "
             "reference statistics |", "| ---: | ---: | ---: |"]
    for rate in (float(r) for r in args.rates.split(",")):
        configs = [PVQConfig(D=c.D, K=c.K, scale_bits=c.scale_bits, rotate=True, seed=run.config.seed)
                   for c in candidates(code_bpw_range=(max(1.0, rate - 2.0), rate + 2.0))]
        ref, got = allocate(every, rate, configs), allocate(first, rate, configs)

        def loss(a) -> float:
            return sum(distortion(a.configs[n]) * every[n].scale * every[n].sensitivity for n in names)

        differ = sum(got.configs[n] != ref.configs[n] for n in names)
        lines.append(f"| {rate:g} | {differ} of {len(names)} | {100 * (loss(got) / loss(ref) - 1):+.2f} % |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
