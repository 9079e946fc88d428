"""Where the time of one calibrated quantize_model run goes, on the default model.

Times the pipeline's stages by wrapping them (one run, fp targets on: every stage there is, the opt-in ones too):
the fp model's pass over each block, the Hessian accumulation, the fp-target shift products, the
forwards that make the o/down inputs and the block outputs, and the per-layer quantization.
Stages nest (quantization includes the fp-target weight), so the rows do not add up to the total:

    python bench/bench_pipeline.py --nsamples 64 --method pvq --config pvq-3.25 [--blocks 30] [--out f.md]

``--blocks N`` quantizes only the first N decoder blocks (a quick look; the rest scales linearly).
"""

from __future__ import annotations

import argparse
import collections
import copy
import datetime
import time

import torch

import pvq_cuda.pipeline as pipeline
import pvq_cuda.pipeline.capture as capture_module
import pvq_cuda.pipeline.llama as llama_module
import pvq_cuda.pipeline.run as run_module
import pvq_cuda.pipeline.stream as stream_module
import pvq_cuda.quantization.hessian as hessian_module
from bench_common import emit, git_commit
from pvq_cuda.apps.corpus import make_windows, read_text, tokenize
from pvq_cuda.apps.loading import load_model

STAGES = (  # (owner, attribute, label)
    (stream_module, "fp_block_pass", "fp model's pass over the block (shareable across runs)"),
    (hessian_module, "hessian_accumulate_", "Hessian accumulation"),
    (capture_module.ShiftCollector, "add", "fp-target shift products"),
    (llama_module.LlamaFlow, "o_input", "forward to o_proj's input"),
    (llama_module.LlamaFlow, "residual", "o_proj + residual"),
    (llama_module.LlamaFlow, "down_input", "MLP forward to down_proj's input"),
    (llama_module.LlamaFlow, "output", "down_proj + residual (block output)"),
    (run_module.Run, "quantize_layer", "per-layer quantization"),
    (run_module, "fp_target_weight", "  of which the fp-target weight"),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--method", default="pvq")
    p.add_argument("--config", default="pvq-3.25")
    p.add_argument("--blocks", type=int, default=0, help="quantize only the first N blocks (0: all)")
    p.add_argument("--out")
    args = p.parse_args()

    spent: dict[str, float] = collections.defaultdict(float)
    for owner, name, label in STAGES:
        inner = getattr(owner, name)

        def timed(*a, _inner=inner, _label=label, **kw):
            t = time.perf_counter()
            try:
                return _inner(*a, **kw)
            finally:
                spent[_label] += time.perf_counter() - t

        setattr(owner, name, timed)

    lm = load_model()
    text, source = read_text(None)
    windows = make_windows(tokenize(lm.tokenizer, text), nsamples=args.nsamples, seqlen=args.seqlen)
    model = copy.deepcopy(lm.model)
    if args.blocks:
        model.model.layers = model.model.layers[:args.blocks]
    t0 = time.perf_counter()
    log = pipeline.quantize_model(model, windows.calibration, args.config, method=args.method, fp_targets=True,
                                      device="cpu", progress=False)
    total = time.perf_counter() - t0

    blocks = len(model.model.layers)
    lines = [f"# One calibrated run: {args.method} {args.config}, {args.nsamples} x {args.seqlen} tokens, "
             f"{blocks} blocks",
             "", f"- {lm.name}; calibration from {source}",
             f"- commit {git_commit()}, {datetime.date.today()}, CPU, {torch.get_num_threads()} threads",
             f"- total {total:.1f} s (the log's seconds: {log['seconds']:.1f})", "",
             "| stage | seconds | share |", "| --- | ---: | ---: |"]
    for _, _, label in STAGES:
        lines.append(f"| {label} | {spent[label]:.1f} | {spent[label] / total:.0%} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
