"""The `pvq-cuda` command (also `python -m pvq_cuda`).

    pvq-cuda quantize   quantize a model with PVQ (default: SmolLM2-135M-Instruct at pvq-3.25), save it, and
                        print held-out perplexity and time beside fp32 and the RTN INT4, GPTQ INT4/INT3 g128 baselines
    pvq-cuda eval       held-out perplexity of a model or a quantized directory (last line: `perplexity: <value>`);
                        with --tasks, lm-evaluation-harness tasks from local files (pvq_heldout ships)
    pvq-cuda compare    the full table and plot (fp32; RTN, GPTQ, rotated GPTQ INT4/3/2; PVQ 2.25/3.25/4.25
                        data-free and Hessian-aware) into bench/results/; with --act, weights and activations
                        (PVQ-coded activations against INT8/INT4 ones, per bits per activation)
    pvq-cuda generate   text from a model, streamed, with tokens/s (the chat template when the tokenizer has one)
    pvq-cuda setup      fetch the default corpus and convert the default model into the cache
    pvq-cuda demo       PVQ of a random Gaussian matrix beside INT3/INT4 round-to-nearest
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from ..format.activation import ACT_PRESETS
from ..format.config import PRESETS
from ..pipeline.finetune import LEARNING_RATE
from ..pipeline.tune import TUNE_LR


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_demo, run_demo

    if args.cols % 128 or args.rows < 1:
        raise SystemExit("pvq-cuda demo: --cols must be a multiple of 128 and --rows >= 1")
    print(format_demo(run_demo(args.rows, args.cols, args.seed), (args.rows, args.cols)))
    return 0


def _positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _non_negative(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {s}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


def _rate(s: str) -> float:
    from ..pipeline.allocate import BPW_RANGE

    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of bits per weight, got {s!r}") from None
    if not BPW_RANGE[0] <= v <= BPW_RANGE[1]:
        raise argparse.ArgumentTypeError(f"must be in [{BPW_RANGE[0]}, {BPW_RANGE[1]}], got {s}")
    return v


def _rates(s: str) -> list[float]:
    """'sweep' (2.0 to 4.5 in steps of 0.25) or comma-separated rates."""
    if s == "sweep":
        return [2.0 + 0.25 * i for i in range(11)]
    return [_rate(r) for r in s.split(",")]


def _data_options(p: argparse.ArgumentParser, calibration: bool = True) -> None:
    p.add_argument("--model", help="a local Hugging Face model directory, a .gguf file, or a directory written by "
                                   "pvq-cuda quantize (default: SmolLM2-135M-Instruct, Q4_1-dequantized, offline)")
    p.add_argument("--calib", help="calibration text: comma-separated text domains (jargon, python-docs, "
                                   "debian-reference, gnu-standards, fortunes) and/or local .txt, .txt.gz or .jsonl "
                                   "('text' field) files, mixed evenly (default: jargon). Each one's last 10%% of "
                                   "tokens is held out, never calibrated on")
    p.add_argument("--eval", help="evaluation texts, the same way (default: every domain when --calib is not given, "
                                  "for quantize every domain --calib does not name, else the --calib texts); a domain "
                                  "is evaluated on its held-out last 10%%, a file that calibration does not read in "
                                  "whole")
    if calibration:
        p.add_argument("--nsamples", type=_positive, default=32,
                       help="calibration windows (default 32: 64 cost 1.6-1.8x the calibrated run time and measured no "
                            "better on the texts calibration never read; bench/results/"
                            "levers-calib-size-cpu-2026-12-02.md)")
    p.add_argument("--seqlen", type=_positive, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--eval-windows", type=_positive, default=8,
                   help="held-out evaluation windows per evaluation text, consecutive and non-overlapping (default 8: "
                        "5 texts x 8 x 512 tokens; one such evaluation of the default model takes ~1-2 min on 2 cores)")
    p.add_argument("--eval-seqlen", type=_positive, default=None, help="tokens per evaluation window (default --seqlen)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed and baseline rotation seed")


def _quant_options(p: argparse.ArgumentParser) -> None:
    from .jobs import REFINE_PASSES, SEARCH_BELOW_BPW
    p.add_argument("--ignore", help="regex of module names to keep in full precision (e.g. 'mlp\\.down_proj')")
    p.add_argument("--offload", action="store_true", help="keep the model on CPU, move one block at a time to the device")
    p.add_argument("--resume", action="store_true", help="save each finished block under OUT/resume and skip it on a rerun")
    p.add_argument("--act-order", action="store_true", help="quantize columns by decreasing Hessian diagonal")
    p.add_argument("--metric-search", action=argparse.BooleanOptionalAction, default=None,
                   help="PVQ: refine pulses under each group's Hessian block metric (slower). Default: on below "
                        f"{SEARCH_BELOW_BPW:g} bpw, off above, as measured on text calibration never read (README, "
                        "fine-tuning)")
    p.add_argument("--refine-passes", type=_non_negative, default=None, metavar="N",
                   help="PVQ: N coordinate-descent passes over each layer's groups after error feedback "
                        f"(lowers the layer loss ~6%% with N=2). Default: {REFINE_PASSES} below {SEARCH_BELOW_BPW:g} "
                        "bpw, 0 above")
    p.add_argument("--tune-epochs", type=_non_negative, default=0, metavar="EPOCHS",
                   help="after each group of a block is quantized, train the block's linears not yet quantized "
                        "for EPOCHS passes over the calibration chunks toward the block's unquantized outputs, "
                        "then quantize them from the trained weights (QuIP#'s tuning within a block; Hessian "
                        "methods; default 0: none)")
    p.add_argument("--tune-lr", type=_positive_float, default=TUNE_LR, metavar="LR",
                   help=f"Adam's learning rate for --tune-epochs, relative to each layer's weight RMS "
                        f"(default {TUNE_LR:g})")
    p.add_argument("--fp-targets", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize each layer toward the unquantized model's outputs (asymmetric calibration; "
                        "one more forward per block; any Hessian method). Default: per method, as measured on "
                        "text calibration never saw (README, levers out of domain): on for the GPTQ baselines, "
                        "off for PVQ; --fp-targets / --no-fp-targets set it for every run")
    p.add_argument("--batch-size", type=_positive, default=8, help="calibration windows per forward pass (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", help="output directory")


def main(argv: list[str] | None = None) -> int:
    from . import generate as generation
    from . import jobs, tasks, wa

    parser = argparse.ArgumentParser(prog="pvq-cuda", description="Pyramid Vector Quantization for LLMs",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="PVQ-quantize a model, save it, compare with fp32 and baselines")
    _data_options(q)
    _quant_options(q)
    rate = q.add_mutually_exclusive_group()
    rate.add_argument("--config", choices=list(PRESETS),
                      help="one PVQ preset for every layer instead of the allocated default (--bpw 3.25; "
                           "pvq-datafree: pvq-3.25)")
    rate.add_argument("--bpw", type=_rate, metavar="R",
                      help=f"any mean rate R in [2.0, 4.5] bits per weight (default {jobs.QUANTIZE_BPW} for the "
                           "Hessian-aware method): each layer "
                           "gets the D, K and gain bits that minimise the summed predicted loss (from its weight, its "
                           "calibration Hessian and the output's sensitivity to it) at R, to within 0.01 bpw; "
                           "the choices are saved with the model. Better than the presets at every rate on the "
                           "default model (README)")
    q.add_argument("--method", default="pvq", help="'pvq' (Hessian-aware, default) or 'pvq-datafree'")
    q.add_argument("--act-config", dest="act_config", choices=list(ACT_PRESETS),
                   help="also code every quantized layer's input activations online with this PVQ activation preset "
                        "(W+A; recorded in the saved model)")
    q.add_argument("--finetune", type=_non_negative, default=0, metavar="STEPS",
                   help="after coding, train row scales, gain levels and norm weights toward the unquantized model "
                        "for STEPS Adam steps on the calibration windows, the codes fixed (KL of the next-token "
                        "distributions); the table shows the model before and after (default 0: off)")
    q.add_argument("--finetune-blocks", type=_non_negative, default=0, metavar="EPOCHS",
                   help="before --finetune's steps (or alone), fine-tune the same parameters block by block: "
                        "EPOCHS passes over the calibration windows per decoder block, matching the unquantized "
                        "block's outputs (default 0: off)")
    q.add_argument("--finetune-windows", type=_positive, default=None, metavar="N",
                   help="fine-tune on N windows of the calibration text, drawn as the calibration windows are "
                        "(same seed, never from the held-out part; the last eighth held out to watch the KL). "
                        "Default: max(--nsamples, 4 x STEPS), about one pass (reusing 32 windows over 40 steps "
                        "overfit them; README)")
    # None, not the default value, so that a given option is told from an absent one (jobs.py)
    q.add_argument("--finetune-data", choices=["calibration", "generated"], default=None,
                   help="what --finetune trains on: windows of the calibration text (default), or windows the "
                        "unquantized model writes itself, sampled at temperature 1 from the calibration windows' "
                        "first tokens (seeded by --seed; README, fine-tuning)")
    q.add_argument("--finetune-lr", type=_positive_float, default=None, metavar="LR",
                   help="Adam's learning rate on the log-factors for --finetune and --finetune-blocks "
                        f"(default {LEARNING_RATE:g}: each factor moves by at most about 0.1%% a step)")
    q.add_argument("--finetune-head", action="store_true",
                   help="with --finetune, also train the output head's weight (tied to the input embedding where "
                        "the model ties them) as elementwise factors, as AQLM trains its unquantized parameters "
                        "(README, fine-tuning)")
    q.add_argument("--baselines", default=",".join(jobs.QUANTIZE_BASELINES),
                   help="comma-separated baseline methods to run beside it, or 'none' "
                        f"(default {','.join(jobs.QUANTIZE_BASELINES)})")
    q.set_defaults(run=jobs.cmd_quantize)

    e = sub.add_parser("eval", help="held-out perplexity (last line `perplexity: <value>`), or lm-eval tasks")
    _data_options(e, calibration=False)
    e.add_argument("--json", action="store_true", help="print one JSON object instead")
    e.add_argument("--tasks", help="comma-separated lm-evaluation-harness tasks instead of the perplexity: "
                                   "'pvq_heldout' (word/byte perplexity and bits per byte of the held-out text) or "
                                   "any task whose YAML is in a --task-dir and whose data is local")
    e.add_argument("--task-dir", action="append", metavar="DIR", help="a folder of lm-eval task YAMLs (repeatable)")
    e.add_argument("--limit", type=_positive, help="lm-eval: at most this many documents per task")
    e.add_argument("--batch-size", type=_positive, default=1, help="lm-eval batch size (default 1)")
    e.set_defaults(run=lambda a: tasks.cmd_eval_tasks(a) if a.tasks else jobs.cmd_eval(a))

    c = sub.add_parser("compare", help="full table and plot into bench/results/")
    _data_options(c)
    _quant_options(c)
    c.add_argument("--config", help="comma-separated PVQ presets (default pvq-2.25,pvq-3.25,pvq-4.25; with --act "
                                    "pvq-4.25,pvq-3.25)")
    c.add_argument("--bpw", type=_rates, metavar="RATES",
                   help="also PVQ (Hessian-aware) at these mean rates, each layer's config allocated by predicted "
                        "loss: comma-separated bits per weight in [2.0, 4.5], or 'sweep' (2.0 to 4.5 in steps of "
                        "0.25): the Pareto curve beside the baselines in the plot")
    c.add_argument("--act", action="store_true",
                   help="weights and activations: perplexity against bits per activation for PVQ-coded activations "
                        "and INT baselines on each --config weight rate, into bench/results/wa_<model>.{md,json,png}")
    c.add_argument("--act-config", dest="act_configs",
                   help="--act: comma-separated activation presets (default pvq-a8.5,pvq-a8,pvq-a6.25,pvq-a4.25; "
                        f"choices {', '.join(ACT_PRESETS)})")
    c.add_argument("--act-baselines", help="--act: comma-separated INT activation baselines, int<b>-token or "
                                           "int<b>-g<G>, or 'none' (default " + ",".join(wa.WA_BASELINES) + ")")
    c.add_argument("--act-decoded", action="store_true",
                   help="--act: multiply coded activations as dequantized fp32 operands (dense BLAS) instead of the "
                        "integer W+A kernel; the same product up to float rounding")
    c.set_defaults(run=lambda a: wa.cmd_compare_act(a) if a.act else jobs.cmd_compare(a))

    g = sub.add_parser("generate", help="generate text from a model (streamed), then tokens/s")
    g.add_argument("--model", help="a directory written by pvq-cuda quantize, an HF directory, a .gguf file "
                                   "(default: SmolLM2-135M-Instruct)")
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--max-new-tokens", type=_positive, default=128, help="tokens to generate at most (default 128)")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="use the tokenizer's chat template (default: when it has one)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sampling")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    g.set_defaults(run=generation.cmd_generate)

    s = sub.add_parser("setup", help="fetch the default corpus (apt-get download jargon-text) and convert the "
                                     "default model into the cache")
    s.add_argument("--force", action="store_true", help="fetch the corpus again")
    s.set_defaults(run=jobs.cmd_setup)

    demo = sub.add_parser("demo", help="PVQ a random Gaussian matrix; SQNR and bpw beside INT3/INT4 RTN")
    demo.add_argument("--rows", type=int, default=4096)
    demo.add_argument("--cols", type=int, default=4096)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as err:
        # Bad input is the user's to fix: say what, without a traceback (PVQ_CUDA_DEBUG=1 shows it).
        if os.environ.get("PVQ_CUDA_DEBUG"):
            raise
        print(f"pvq-cuda {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
