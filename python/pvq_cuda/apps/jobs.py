"""The CLI's jobs: quantize (the main job), eval and compare.

Each job loads a model (default: SmolLM2-135M-Instruct, Q4_1-dequantized), cuts calibration and
held-out evaluation windows from a text (default: the Jargon File), and for each method copies the
fp32 model, runs :func:`quantize_model` on the copy and measures its held-out perplexity.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..format.config import DEFAULT_PRESET, PRESETS
from ..pipeline import PER_RUN_OPTIONS, quantize_model, quantize_models, uses_fp_targets
from ..quantization.methods import parse_method
from .corpus import leading_bos, make_domain_windows, read_source, tokenize_all
from .domains import CALIBRATION_DOMAIN, DOMAINS, EVALUATION_DOMAINS
from .evaluate import perplexity
from .loading import LoadedModel, load_model
from .report import Row, domain_summary, markdown_table, plot, write_json, write_text

# RTN INT3 is left out of the default job (compare keeps it): at 26.8x fp32 on the default model it
# says nothing a reader needs, and its evaluation was a tenth of the job's ten-minute budget.
QUANTIZE_BASELINES = ("rtn-int4", "gptq-int4", "gptq-int3")
COMPARE_BASELINES = ("rtn-int4", "rtn-int3", "rtn-int2", "gptq-int4", "gptq-int3", "gptq-int2",
                     "gptq-rot-int4", "gptq-rot-int3", "gptq-rot-int2")
COMPARE_PRESETS = ("pvq-2.25", "pvq-3.25", "pvq-4.25")
# quantize (Hessian-aware) without --config or --bpw: each layer's config allocated for 3.25 bpw,
# which measured 1.143x fp32 against the pvq-3.25 preset's 1.201x on the texts calibration never
# read (README).
QUANTIZE_BPW = 3.25


@dataclass
class Job:
    """Everything a job needs: the loaded fp32 model, the windows, the device, the options."""

    lm: LoadedModel
    calibration: torch.Tensor
    evaluation: dict[str, torch.Tensor]  # evaluation windows per source (domain or file)
    data_info: dict
    device: torch.device
    args: object
    # --finetune-windows: more windows of the calibration text for fine-tuning only (None: the calibration windows)
    finetune: torch.Tensor | None = None


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _device(args) -> torch.device:
    if args.device:
        try:
            dev = torch.device(args.device)
        except RuntimeError as e:
            raise SystemExit(f"--device {args.device!r}: {e}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device!r}: CUDA is not available on this machine")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sources(args, need_calibration: bool, unseen_only: bool = False) -> tuple[list[str], list[str]]:
    """The calibration and evaluation sources (domain names or files) the options ask for. By
    default calibration reads the Jargon File and evaluation every domain (with ``unseen_only``,
    every domain calibration does not read); with --calib files and no --eval, evaluation is those
    files' held-out parts."""
    calib = [s for s in (args.calib or CALIBRATION_DOMAIN).split(",") if s]
    if args.eval:
        evaluation = [s for s in args.eval.split(",") if s]
    elif unseen_only and all(s in DOMAINS for s in calib) and set(EVALUATION_DOMAINS) - set(calib):
        evaluation = [s for s in EVALUATION_DOMAINS if s not in calib]
    elif args.calib is None:
        evaluation = list(EVALUATION_DOMAINS)
    else:
        evaluation = calib
    return calib, evaluation


def finetune_windows(args) -> int | None:
    """How many windows --finetune trains on: --finetune-windows, else max(--nsamples, 4 x STEPS),
    about one pass of new windows (4 a step). 32 calibration windows reused five times over 40
    steps overfit them: the training KL fell by half and the held-out KL by 5 %; 160 windows
    brought the default job's 3.25-bpw model to 1.106x fp32 out of domain against 1.122x
    (README, fine-tuning). None when nothing is fine-tuned."""
    from ..pipeline.finetune import STEP_WINDOWS

    steps, epochs = getattr(args, "finetune", 0), getattr(args, "finetune_blocks", 0)
    if not (steps or epochs):
        return None
    return getattr(args, "finetune_windows", None) or max(args.nsamples, STEP_WINDOWS * steps)


def prepare(args, need_calibration: bool = True, unseen_only: bool = False) -> Job:
    """Load the model and cut the windows (calibration and evaluation never overlap; each starts
    with the BOS token where the model's tokenizer adds one). ``unseen_only``: evaluate by default
    on the domains calibration does not read (:func:`_sources`)."""
    t0 = time.perf_counter()
    lm = load_model(args.model)
    calib, evaluation = _sources(args, need_calibration, unseen_only)
    # A file that calibration does not read is evaluated whole; a domain always on its held-out part
    # (an eval-only job holds out what the same options would calibrate on, so its numbers match).
    whole = frozenset(s for s in evaluation if s not in DOMAINS and s not in calib)
    if not need_calibration:
        calib = []
    texts, names = {}, {}
    for spec in dict.fromkeys(calib + evaluation):
        texts[spec], names[spec] = read_source(spec, "--calib" if spec in calib else "--eval")
    ids = tokenize_all(lm.tokenizer, texts)
    seqlen = args.seqlen
    if not need_calibration:  # eval only: no calibration windows are cut
        seqlen = 2
    bos = leading_bos(lm.tokenizer)

    def cut(nsamples: int, eval_windows: int | None):  # one draw for calibration and fine-tuning windows
        return make_domain_windows({s: ids[s] for s in calib}, {s: ids[s] for s in evaluation}, nsamples=nsamples,
                                   seqlen=seqlen, eval_windows=eval_windows,
                                   eval_seqlen=args.eval_seqlen or args.seqlen, seed=args.seed, whole=whole,
                                   bos_token_id=bos)

    windows = cut(args.nsamples, args.eval_windows)
    info = {"model": lm.name,
            "calibration_sources": {s: names[s] for s in calib},
            "evaluation_sources": {s: names[s] + (" (whole file)" if s in whole else ", held-out last 10% of its tokens")
                                   for s in evaluation},
            **windows.info}
    finetune = None
    count = finetune_windows(args)
    if calib and count and count != args.nsamples:
        # The same sources, seed and draw as the calibration windows, only more of them, all before
        # each text's held-out part. With one calibration text the calibration windows come first
        # (torch's seeded draw of N starts begins with the draw of fewer; tests check it).
        finetune = cut(count, 1).calibration
        info["finetune_windows"] = count
    _say(f"pvq-cuda: {lm.name}; calibration {', '.join(calib) or '(none)'}; evaluation {', '.join(evaluation)}; "
         f"load {time.perf_counter() - t0:.1f} s")
    return Job(lm, windows.calibration, windows.evaluation, info, _device(args), args, finetune)


def _evaluate(job: Job, model, keep_logprobs: bool = False) -> dict[str, dict]:
    """The model's perplexity on each evaluation source (with ``keep_logprobs``: and its
    next-token log-probabilities, see :func:`perplexity`)."""
    return {name: perplexity(model, w, device=job.device, keep_logprobs=keep_logprobs)
            for name, w in job.evaluation.items()}


def _eval_seconds(evals: dict[str, dict]) -> float:
    return math.fsum(ev["seconds"] for ev in evals.values())


def _slug(model_arg: str | None) -> str:
    """A file-name stem for --model: its last path component (the default model's own name)."""
    name = Path(model_arg.rstrip("/")).stem if model_arg else "smollm2-135m-instruct-q4_1"
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-") or "model"


def rate_preset(bpw: float) -> str:
    """The name a run at an allocated mean rate goes by where a preset name would ("3.25bpw")."""
    return f"{bpw:g}bpw"


def _rate_of(preset: str | None) -> float | None:
    """The rate of a :func:`rate_preset` name, None for a preset."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)bpw", preset or "")
    return float(m.group(1)) if m else None


def _labels(method: str, preset: str | None, log: dict | None) -> tuple[str, str, str]:
    """(label, family, note) of a row."""
    m = parse_method(method)
    if m.kind != "pvq":
        fam = "GPTQ rotated" if m.rotate else m.kind.upper()
        return f"{fam} INT{m.bits} g{m.group}", f"{fam} (simulated)", ""
    rate = _rate_of(preset)
    if rate is not None:  # its own family: the plot draws the allocated rates as one curve
        label, family, note = _labels(method, DEFAULT_PRESET, log)
        return (label.replace(DEFAULT_PRESET, f"at {rate:g} bpw (allocated)"), family + ", allocated", note)
    act = (log or {}).get("act_config")
    if act:
        preset = f"{preset} + activations D={act['D']}, K={act['K']}, {act['gain_bits']} gain bits"
    if not m.hessian:
        return f"PVQ {preset} data-free", "PVQ data-free", ""
    used = log is not None and any(e.get("hessian_used") for e in log["layers"])
    if used:
        return f"PVQ {preset} Hessian-aware", "PVQ Hessian-aware", ""
    return f"PVQ {preset}", "PVQ (Hessian-aware unavailable)", "quantize_weight took no Hessian: data-free"


def fp_targets_for(method: str, requested: bool | None) -> bool:
    """Whether a run of ``method`` quantizes toward the fp model's outputs: as requested
    (``--fp-targets`` / ``--no-fp-targets``), else per method as measured on the texts calibration
    never read (README, "The same levers out of domain"): on for the GPTQ baselines, which they
    improve there by far, off for PVQ, where they fit the calibration text and did not help the
    others. Only methods with a Hessian take them."""
    if requested is None:
        requested = parse_method(method).kind != "pvq"
    return uses_fp_targets(method, requested)


#: Below this rate a Hessian-aware PVQ row searches harder by default: metric search and
#: REFINE_PASSES refinement passes. Out of domain, on the default model, they lowered perplexity by
#: 7 % and 6 % at 2.25 bpw allocated (two calibration draws) and by 2 % at 2.75, and moved nothing
#: at 3.0 (1.007x +- 0.008) or 3.25; 4 passes did worse than 2
#: (bench/results/search-by-rate-cpu-2026-12-04.md). They cost about 1.9x the plain quantization
#: time allocated at 2.25 and 2.5x for the uniform pvq-2.25 preset
#: (bench/results/search-speed-cpu-2026-12-04.md).
SEARCH_BELOW_BPW = 3.0
REFINE_PASSES = 2


def search_for(method: str, rate: float, metric_search: bool | None, refine_passes: int | None) -> tuple[bool, int]:
    """(metric_search, refine_passes) of a run of ``method`` at ``rate`` bits per weight: as
    requested (``--metric-search`` / ``--no-metric-search``, ``--refine-passes N``), else on with
    REFINE_PASSES passes for Hessian-aware PVQ below SEARCH_BELOW_BPW, off above and for the other
    methods. Only PVQ searches."""
    m = parse_method(method)
    if m.kind != "pvq":
        return False, 0
    searched = m.hessian and rate < SEARCH_BELOW_BPW
    return (searched if metric_search is None else metric_search,
            (REFINE_PASSES if searched else 0) if refine_passes is None else refine_passes)


def _run_options(job: Job, method: str, preset: str | None, log_path: Path | None) -> dict:
    """quantize_model's keyword arguments for one row."""
    args = job.args
    m = parse_method(method)
    act = getattr(args, "act_config", None) if m.kind == "pvq" else None  # quantize --act-config
    rate = _rate_of(preset)
    config = DEFAULT_PRESET if rate is not None else preset or DEFAULT_PRESET
    metric_search, refine_passes = search_for(method, PRESETS[config].code_bpw if rate is None else rate,
                                              args.metric_search, args.refine_passes)
    return dict(config=config, bpw=rate, method=method,
                ignore=args.ignore, device=job.device, act_config=act,
                offload=args.offload, act_order=args.act_order, metric_search=metric_search,
                refine_passes=refine_passes, fp_targets=fp_targets_for(method, args.fp_targets),
                tune_epochs=args.tune_epochs, tune_lr=args.tune_lr,
                progress=not args.no_progress,
                batch_size=args.batch_size, seed=args.seed, log_path=log_path,
                calibration_info=job.data_info if m.hessian else None)


def _row(job: Job, method: str, preset: str | None, model, log: dict, fp32: dict,
         logprobs: dict | None = None) -> Row:
    """Evaluate a quantized model against ``fp32`` (the fp32 model's results per source). With a
    ``logprobs`` dict, the same pass also fills it with the model's log-probabilities per source."""
    evals = _evaluate(job, model, keep_logprobs=logprobs is not None)
    if logprobs is not None:
        logprobs.update({name: ev.pop("logprobs") for name, ev in evals.items()})
    ppl, ratio, se, per = domain_summary(evals, fp32)
    label, family, note = _labels(method, preset, log)
    row = Row(method if preset is None else f"{method}:{preset}", label, family, log["bpw"], ppl, ratio,
              log["seconds"], note, se, per, _eval_seconds(evals))
    _say(f"pvq-cuda: {label}: bpw {row.bpw:.3f}, perplexity {row.perplexity:.3f} ({row.ratio:.3f}x fp32"
         f"{'' if se is None else f' +- {se:.3f}'}{', geometric mean over ' + str(len(per)) + ' texts' if len(per) > 1 else ''})"
         f", {row.seconds:.1f} s")
    return row


def _search_note(opts: dict) -> str:
    """What a run searches beyond error feedback, for its progress line (the defaults depend on
    the rate: search_for)."""
    parts = (["metric search"] if opts["metric_search"] else []) + \
        ([f"{opts['refine_passes']} refinement pass{'es' if opts['refine_passes'] > 1 else ''}"]
         if opts["refine_passes"] else [])
    return f" ({', '.join(parts)})" if parts else ""


def run_method(job: Job, method: str, preset: str | None, fp32: dict, log_path: Path | None,
               keep_base: bool = True, logprobs: dict | None = None):
    """Quantize a copy of the fp32 model by ``method`` and evaluate it against ``fp32`` (the fp32
    model's :func:`perplexity` result); returns (row, log, quantized model). ``logprobs``: see
    :func:`_row`."""
    model = copy.deepcopy(job.lm.model) if keep_base else job.lm.model
    opts = _run_options(job, method, preset, log_path)
    if job.args.resume:
        opts["resume_dir"] = Path(job.args.out_dir) / "resume" / f"{method}-{preset or 'baseline'}"
    _say(f"pvq-cuda: {method}{' ' + preset if preset else ''}{_search_note(opts)}")
    log = quantize_model(model, job.calibration, **opts)
    return _row(job, method, preset, model, log, fp32, logprobs), log, model


def run_methods(job: Job, runs: list[tuple[str, str | None, Path | None]], fp32: dict, keep_base: bool = True,
                logprobs: dict | None = None):
    """Every (method, preset, log_path) of ``runs`` as :func:`run_method` gives it, yielding
    (index into runs, row, log, model) as each is done. With a ``logprobs`` dict, each row's
    evaluation also puts the model's log-probabilities per source in ``logprobs[index]`` (one pass
    for both). Runs that can share the fp model's pass
    over each block (Hessian methods with fp targets, without --resume) are quantized together by
    quantize_models, as many copies at a time as fit in half the free memory. With
    ``keep_base=False`` the last run quantizes the job's model itself."""

    def shares(k: int) -> bool:
        return not job.args.resume and fp_targets_for(runs[k][0], job.args.fp_targets)

    todo = list(range(len(runs)))
    while todo:
        batch = [k for k in todo if shares(k)][:_copies_that_fit(job)] if shares(todo[0]) else []
        if len(batch) < 2:
            k = todo.pop(0)
            sink = None if logprobs is None else logprobs.setdefault(k, {})
            yield (k, *run_method(job, *runs[k][:2], fp32, runs[k][2], keep_base or k != len(runs) - 1, sink))
            continue
        todo = [k for k in todo if k not in batch]
        models = [copy.deepcopy(job.lm.model) if keep_base or k != len(runs) - 1 else job.lm.model for k in batch]
        opts = [_run_options(job, *runs[k]) for k in batch]
        shared = {key: v for key, v in opts[0].items() if key not in PER_RUN_OPTIONS}
        names = [" ".join(n for n in runs[k][:2] if n) + _search_note(o) for k, o in zip(batch, opts)]
        _say(f"pvq-cuda: {', '.join(names)} together (one pass of the fp model over each block, shared)")
        logs = quantize_models(models, job.calibration, [{key: v for key, v in o.items() if key in PER_RUN_OPTIONS}
                                                          for o in opts], **shared)
        for k, log in zip(batch, logs):
            model = models.pop(0)  # the caller may drop each model once it has its row
            sink = None if logprobs is None else logprobs.setdefault(k, {})
            yield k, _row(job, *runs[k][:2], model, log, fp32, sink), log, model


def _copies_that_fit(job: Job) -> int:
    """How many copies of the model fit in half the free memory of where they live (at least 1)."""
    model = job.lm.model
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    try:
        if job.device.type == "cuda" and not job.args.offload:
            free = torch.cuda.mem_get_info(job.device)[0]
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError, RuntimeError):
        return 1
    return max(1, int(free // 2 // max(size, 1)))


def _fp32_row(job: Job) -> tuple[Row, dict]:
    evals = _evaluate(job, job.lm.model)
    ppl, _, _, per = domain_summary(evals, None)
    bits = 8 * next(job.lm.model.parameters()).element_size()
    return Row("fp32", f"fp{bits} (unquantized)", "fp32", float(bits), ppl, 1.0, None, domains=per,
               eval_seconds=_eval_seconds(evals)), evals


def _header(job: Job, logs: dict) -> list[str]:
    d = job.data_info
    calib = "; ".join(f"{d['sources'][s]['samples']} x {d['seqlen']} tokens of {name}"
                      for s, name in d["calibration_sources"].items())
    lines = [f"model: {job.lm.name}", f"calibration: {calib} (seed {d['seed']})"]
    lines += [f"evaluation '{s}': {d['eval_windows'][s]} x {d['eval_seqlen']} tokens of {name}"
              for s, name in d["evaluation_sources"].items()]
    lines.append(f"device: {job.device}")
    if job.lm.note:
        lines.append(f"note: {job.lm.note}")
    lines.append("bpw: bits per weight of the quantized decoder linears, everything stored counted; "
                 "baselines are simulated (dense layers holding the dequantized weights)")
    shared = {round(log["shared_seconds"]) for log in logs.values() if "shared_seconds" in log}
    if shared:
        lines.append(f"time: the runs with a Hessian went block by block together and shared one pass of the fp model "
                     f"over each block ({', '.join(f'{t} s' for t in sorted(shared))}); each row's time is its own "
                     f"work plus that whole pass, what it takes alone")
    lines.append("× fp32: perplexity ratio ± one standard error from the spread of the per-window log-perplexity "
                 "differences against fp32 on the same windows; the windows are consecutive text, so other held-out "
                 "text can move a ratio by more than that")
    if len(job.evaluation) > 1:
        lines.append("geo. mean: the geometric mean over the evaluation texts (of perplexities, and of ratios, whose "
                     "standard errors add in quadrature); the per-text columns are ratios to fp32, fp32's row its "
                     "perplexity")
    return lines


def _check_finetune_options(args) -> None:
    """Refuse an option that shapes fine-tuning when no fine-tuning is asked for: ignoring it would
    hide the user's mistake. The options default to None, so one given with its default value is
    refused too."""
    steps, epochs = getattr(args, "finetune", 0), getattr(args, "finetune_blocks", 0)
    if getattr(args, "finetune_head", False) and not steps:
        raise ValueError("--finetune-head trains the head in --finetune's end-to-end steps: give --finetune STEPS")
    options = (("--finetune-windows", "finetune_windows"), ("--finetune-data", "finetune_data"),
               ("--finetune-lr", "finetune_lr"))
    given = [option for option, attr in options if getattr(args, attr, None) is not None]
    if given and not (steps or epochs):
        raise ValueError(f"{', '.join(given)} shape{'s' * (len(given) == 1)} fine-tuning: give --finetune STEPS "
                         f"or --finetune-blocks EPOCHS")


def cmd_quantize(args) -> int:
    """Quantize with PVQ, save the model to --out, print perplexity and time beside fp32 and baselines."""
    from ..layers.quantized_model import save_quantized

    t0 = time.perf_counter()
    method = args.method
    m = parse_method(method)
    if m.kind != "pvq":
        raise SystemExit(f"--method {method!r}: quantize saves a PVQ model; run baselines with `pvq-cuda compare`")
    _check_finetune_options(args)
    if args.bpw is None and args.config is None:
        # Data-free runs keep the preset: without calibration the allocation only weighs weight
        # energy, which was never measured against it.
        args.bpw, args.config = (QUANTIZE_BPW, None) if m.hessian else (None, DEFAULT_PRESET)
    preset = rate_preset(args.bpw) if args.bpw is not None else args.config
    default_out = Path("pvq-out") / f"{_slug(args.model)}-{preset}"
    args.out_dir = Path(args.out) if args.out else default_out
    # Evaluated on the texts calibration never read (what a user gets on other text), not the
    # calibration text's held-out tail: that one flatters every calibrated method (README).
    job = prepare(args, unseen_only=True)
    fp32, fp32_eval = _fp32_row(job)
    rows, logs = [fp32], {}
    baselines = [] if args.baselines == "none" else args.baselines.split(",")
    runs = [(b, None, None) for b in baselines] + [(method, preset, args.out_dir / "quantization_log.json")]
    done = {}
    finetune, block_epochs = getattr(args, "finetune", 0), getattr(args, "finetune_blocks", 0)
    for k, row, log, model in run_methods(job, runs, fp32_eval, keep_base=bool(finetune or block_epochs)):
        done[k] = row
        logs[row.method] = log
        if k == len(runs) - 1:
            quantized = model
        del model
    rows += [done[k] for k in range(len(runs))]
    row, model = rows[-1], quantized
    if finetune or block_epochs:  # the same model before and after, in one table
        row = _finetuned_row(job, model, method, preset, logs[row.method], fp32_eval, finetune, block_epochs)
        rows.append(row)
    save_quantized(model, args.out_dir, tokenizer=job.lm.tokenizer, calibration_info=job.data_info)
    write_json(args.out_dir / "quantization_log.json",
               {"data": job.data_info, "results": [asdict(r) for r in rows], "runs": logs})
    print("\n".join(_header(job, logs)))
    print()
    print(markdown_table(rows))
    print()
    print(f"saved: {args.out_dir} (per-layer log: {args.out_dir / 'quantization_log.json'}); "
          f"job time {time.perf_counter() - t0:.0f} s")
    print(f"perplexity: {row.perplexity:.4f}")
    return 0


def _finetuned_row(job: Job, model, method: str, preset: str, log: dict, fp32: dict, steps: int,
                   block_epochs: int = 0) -> Row:
    """--finetune / --finetune-blocks: train ``model``'s row scales, gain levels and norm weights
    (and its output head, with --finetune-head) toward the fp32 model on the calibration windows
    (the last eighth held out to watch), block by block and then end to end, then evaluate it
    again."""
    from ..pipeline.finetune import LEARNING_RATE, finetune_scales, sample_windows

    windows = job.calibration if job.finetune is None else job.finetune
    data = getattr(job.args, "finetune_data", None) or "calibration"
    generated, sampling_seconds = data == "generated", 0.0
    if generated:
        t = time.perf_counter()
        _say(f"pvq-cuda: sampling {windows.shape[0]} windows of {windows.shape[1]} tokens from the unquantized model")
        windows = sample_windows(job.lm.model, windows[:, 0].contiguous(), windows.shape[1], seed=job.args.seed,
                                 progress=not job.args.no_progress)
        sampling_seconds = time.perf_counter() - t
        _say(f"pvq-cuda: sampled in {sampling_seconds:.0f} s")
    held_out = max(1, windows.shape[0] // 8) if windows.shape[0] > 1 else 0
    lr = getattr(job.args, "finetune_lr", None) or LEARNING_RATE
    head = getattr(job.args, "finetune_head", False)
    what = ", ".join(([f"{block_epochs} block epoch{'s' * (block_epochs != 1)}"] if block_epochs else [])
                     + ([f"{steps} step{'s' * (steps != 1)}"] if steps else [])
                     + ([f"lr {lr:g}"] if lr != LEARNING_RATE else [])
                     + (["on the model's own samples"] if generated else [])
                     + (["output head too"] if head else []))
    _say(f"pvq-cuda: finetuning row scales, gain levels, norms{' and the output head' if head else ''} ({what})")
    ft = finetune_scales(model, job.lm.model, windows, steps=steps, held_out=held_out, head=head,
                         block_epochs=block_epochs, lr=lr, progress=not job.args.no_progress)
    if held_out:
        both = bool(block_epochs and steps)
        kls = [ft["kl_held_out_before"], *([ft["kl_held_out_after_blocks"]] if both else []), ft["kl_held_out_after"]]
        chain = " -> ".join(f"{v:.4f}" for v in kls)
        _say(f"pvq-cuda: finetune: KL on {held_out} held-out {'sampled' if generated else data} windows {chain} "
             f"nats/token"
             f"{' (before, after the blocks, after)' if both else ''}, {ft['seconds']:.0f} s")
    else:
        _say(f"pvq-cuda: finetune: {ft['seconds']:.0f} s")
    log["finetune"] = dict(ft, windows=windows.shape[0], held_out=held_out, data=data, head=head,
                           **({"sampling_seconds": sampling_seconds} if generated else {}))
    log = dict(log, seconds=log["seconds"] + ft["seconds"] + sampling_seconds)
    row = _row(job, method, preset, model, log, fp32)
    row.method += "+finetune"
    row.label += f" + finetuned scales ({what})"
    row.family += ", finetuned"
    return row


def cmd_eval(args) -> int:
    """Held-out perplexity of --model (a quantized directory, an HF directory, a GGUF, or the default)
    on each evaluation source, and their geometric mean."""
    args.nsamples = 1
    job = prepare(args, need_calibration=False)
    evals = _evaluate(job, job.lm.model)
    ppl, _, _, per = domain_summary(evals, None)
    result = {"model": job.lm.name, "kind": job.lm.kind, "perplexity": ppl,
              "windows": sum(ev["windows"] for ev in evals.values()), "tokens": sum(ev["tokens"] for ev in evals.values()),
              "domains": {n: {k: ev[k] for k in ("perplexity", "nll", "tokens", "windows", "seconds")}
                          for n, ev in evals.items()},
              "evaluation_sources": job.data_info["evaluation_sources"], "eval_seqlen": job.data_info["eval_seqlen"]}
    q = getattr(job.lm.model.config, "quantization_config", None)
    q = q.to_dict() if hasattr(q, "to_dict") else q
    if isinstance(q, dict) and q.get("quant_method") == "pvq":
        result["quantization_config"] = q
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model: {job.lm.name} ({job.lm.kind})")
    for name, ev in evals.items():
        print(f"evaluation '{name}': {ev['windows']} x {job.data_info['eval_seqlen']} tokens of "
              f"{job.data_info['evaluation_sources'][name]}: perplexity {ev['perplexity']:.4f} ({ev['seconds']:.1f} s)")
    if len(evals) > 1:
        print(f"geometric mean over {len(evals)} texts")
    print(f"perplexity: {ppl:.4f}")
    return 0


def cmd_compare(args) -> int:
    """The full table: fp32, RTN/GPTQ/rotated GPTQ INT4/3/2 g128, PVQ 2.25/3.25/4.25 data-free and
    Hessian-aware; Markdown, JSON and a plot in --out (default bench/results)."""
    t0 = time.perf_counter()
    args.out_dir = Path(args.out) if args.out else Path("bench") / "results"
    job = prepare(args)
    prepared = time.perf_counter() - t0
    slug = _slug(args.model)
    stem = args.out_dir / f"compare_{slug}"
    fp32, fp32_eval = _fp32_row(job)
    rows, logs = [fp32], {}
    runs = [(b, None) for b in COMPARE_BASELINES]
    presets = args.config.split(",") if args.config else list(COMPARE_PRESETS)
    for p in presets:
        if p not in PRESETS:
            raise SystemExit(f"--config {p!r}: unknown preset; choose from {', '.join(PRESETS)}")
    runs += [(m, p) for p in presets for m in ("pvq-datafree", "pvq")]
    runs += [("pvq", rate_preset(r)) for r in args.bpw or []]
    done = {}
    for k, row, log, model in run_methods(job, [(m, p, None) for m, p in runs], fp32_eval):
        del model
        done[k] = row
        logs[row.method] = log
        write_json(f"{stem}_log.json", {"data": job.data_info, "runs": logs})  # kept current: a long run
    rows += [done[k] for k in range(len(runs))]
    header = _header(job, logs)
    table = markdown_table(rows)
    total = time.perf_counter() - t0
    evaluating = math.fsum(r.eval_seconds for r in rows)
    md = "\n".join([f"# pvq-cuda compare: {job.lm.name}", "", *[f"- {h}" for h in header],
                    f"- job time: {total:.0f} s: {prepared:.0f} s loading and tokenizing, {evaluating:.0f} s in "
                    f"{len(rows)} evaluations, {total - prepared - evaluating:.0f} s quantizing (each shared pass "
                    f"of the fp model counted once; the models' copies and the logs included)", "", table, ""])
    write_text(f"{stem}.md", md)
    write_json(f"{stem}.json", {"data": job.data_info, "results": [asdict(r) for r in rows], "seconds": total})
    plot(rows, f"{stem}.png", f"{job.lm.name.split(' (')[0]}: held-out perplexity vs bits per weight")
    print(md)
    print(f"written: {stem}.md, {stem}.json, {stem}.png, {stem}_log.json")
    return 0


def cmd_setup(args) -> int:
    """Fetch the default corpus and convert the default model (both into the cache)."""
    from .corpus import setup_corpus
    from .loading import ensure_default_model

    for path in setup_corpus(force=args.force):
        print(f"corpus: {path}")
    print(f"model: {ensure_default_model()}")
    return 0
