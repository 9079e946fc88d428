"""The CLI's jobs: quantize (the main job), eval and compare.

Each job loads a model (default: SmolLM2-135M-Instruct, Q4_1-dequantized), cuts calibration and
held-out evaluation windows from a text (default: the Jargon File), and for each method copies the
fp32 model, runs :func:`quantize_model` on the copy and measures its held-out perplexity.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import DEFAULT_PRESET, PRESETS
from .corpus import make_windows, read_text, tokenize
from .evaluate import perplexity, ratio_standard_error
from .loading import LoadedModel, load_model
from .methods import baselines_available, hessian_pvq_available, parse_method
from .report import Row, markdown_table, plot, write_json, write_text

QUANTIZE_BASELINES = ("rtn-int4", "rtn-int3", "gptq-int4", "gptq-int3")
COMPARE_BASELINES = ("rtn-int4", "rtn-int3", "rtn-int2", "gptq-int4", "gptq-int3", "gptq-int2",
                     "gptq-rot-int4", "gptq-rot-int3", "gptq-rot-int2")
COMPARE_PRESETS = ("pvq-2.25", "pvq-3.25", "pvq-4.25")


@dataclass
class Job:
    """Everything a job needs: the loaded fp32 model, the windows, the device, the options."""

    lm: LoadedModel
    calibration: torch.Tensor
    evaluation: torch.Tensor
    data_info: dict
    device: torch.device
    args: object


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


def prepare(args, need_calibration: bool = True) -> Job:
    """Load the model and cut the windows (calibration and evaluation never overlap)."""
    t0 = time.perf_counter()
    lm = load_model(args.model)
    eval_ids = None
    if args.eval is not None:
        eval_text, eval_name = read_text(args.eval, "--eval")
        eval_ids = tokenize(lm.tokenizer, eval_text)
    if need_calibration or eval_ids is None:
        calib_text, calib_name = read_text(args.calib, "--calib")
        calib_ids = tokenize(lm.tokenizer, calib_text)
        if eval_ids is None:
            eval_name = f"{calib_name}, held-out last 10% of its tokens"
    else:  # eval only, from its own file: no calibration text is needed
        calib_ids, calib_name = eval_ids, "(none)"
    seqlen = args.seqlen
    if not need_calibration:  # eval only: any calibration window size fits
        seqlen = min(seqlen, len(calib_ids) // 2)
    windows = make_windows(calib_ids, eval_ids, nsamples=args.nsamples, seqlen=max(seqlen, 2),
                           eval_windows=args.eval_windows, eval_seqlen=args.eval_seqlen or args.seqlen,
                           seed=args.seed)
    info = {"model": lm.name, "calibration_source": calib_name, "evaluation_source": eval_name, **windows.info}
    _say(f"pvq-cuda: {lm.name}; {len(calib_ids)} tokens of {calib_name}; load {time.perf_counter() - t0:.1f} s")
    return Job(lm, windows.calibration, windows.evaluation, info, _device(args), args)


def _slug(model_arg: str | None) -> str:
    """A file-name stem for --model: its last path component (the default model's own name)."""
    name = Path(model_arg.rstrip("/")).stem if model_arg else "smollm2-135m-instruct-q4_1"
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-") or "model"


def _labels(method: str, preset: str | None, log: dict | None) -> tuple[str, str, str]:
    """(label, family, note) of a row."""
    m = parse_method(method)
    if m.kind != "pvq":
        fam = "GPTQ rotated" if m.rotate else m.kind.upper()
        return f"{fam} INT{m.bits} g{m.group}", f"{fam} (simulated)", ""
    if not m.hessian:
        return f"PVQ {preset} data-free", "PVQ data-free", ""
    used = log is not None and any(e.get("hessian_used") for e in log["layers"])
    if used:
        return f"PVQ {preset} Hessian-aware", "PVQ Hessian-aware", ""
    return f"PVQ {preset}", "PVQ (Hessian-aware unavailable)", "quantize_weight took no Hessian: data-free"


def run_method(job: Job, method: str, preset: str | None, fp32: dict, log_path: Path | None,
               keep_base: bool = True):
    """Quantize a copy of the fp32 model by ``method`` and evaluate it against ``fp32`` (the fp32
    model's :func:`perplexity` result); returns (row, log, quantized model)."""
    from .model import quantize_model

    args = job.args
    model = copy.deepcopy(job.lm.model) if keep_base else job.lm.model
    resume = None
    if args.resume:
        resume = Path(args.out_dir) / "resume" / f"{method}-{preset or 'baseline'}"
    _say(f"pvq-cuda: {method}{' ' + preset if preset else ''}")
    log = quantize_model(model, job.calibration, preset or DEFAULT_PRESET, ignore=args.ignore, device=job.device,
                         offload=args.offload, act_order=args.act_order, resume_dir=resume,
                         metric_search=args.metric_search and parse_method(method).kind == "pvq",
                         refine_passes=args.refine_passes,
                         fp_targets=args.fp_targets,
                         progress=not args.no_progress, method=method, batch_size=args.batch_size, seed=args.seed,
                         log_path=log_path, calibration_info=job.data_info if parse_method(method).hessian else None)
    ev = perplexity(model, job.evaluation, device=job.device)
    label, family, note = _labels(method, preset, log)
    se = ratio_standard_error(ev["window_nll"], fp32["window_nll"])
    row = Row(method if preset is None else f"{method}:{preset}", label, family, log["bpw"], ev["perplexity"],
              ev["perplexity"] / fp32["perplexity"], log["seconds"], note, se)
    _say(f"pvq-cuda: {label}: bpw {row.bpw:.3f}, perplexity {row.perplexity:.3f} ({row.ratio:.3f}x fp32"
         f"{'' if se is None else f' +- {se:.3f}'}), {row.seconds:.1f} s")
    return row, log, model


def _fp32_row(job: Job) -> tuple[Row, dict]:
    ev = perplexity(job.lm.model, job.evaluation, device=job.device)
    bits = 8 * next(job.lm.model.parameters()).element_size()
    return Row("fp32", f"fp{bits} (unquantized)", "fp32", float(bits), ev["perplexity"], 1.0, None), ev


def _baselines_to_run(names) -> list[str]:
    if not names:
        return []
    if not baselines_available():
        _say("pvq-cuda: pvq_cuda.baselines is not in this build: the RTN/GPTQ rows are skipped")
        return []
    return list(names)


def _header(job: Job) -> list[str]:
    d = job.data_info
    lines = [f"model: {job.lm.name}",
             f"calibration: {d['nsamples']} x {d['seqlen']} tokens of {d['calibration_source']} (seed {d['seed']})",
             f"evaluation: {d['eval_windows']} x {d['eval_seqlen']} tokens of {d['evaluation_source']}",
             f"device: {job.device}"]
    if job.lm.note:
        lines.append(f"note: {job.lm.note}")
    if not hessian_pvq_available():
        lines.append("note: this build's quantize_weight takes no Hessian, so PVQ runs data-free")
    lines.append("bpw: bits per weight of the quantized decoder linears, everything stored counted; "
                 "baselines are simulated (dense layers holding the dequantized weights)")
    lines.append("× fp32: perplexity ratio ± one standard error from the spread of the per-window log-perplexity "
                 "differences against fp32 on the same windows; the windows are consecutive text, so other held-out "
                 "text can move a ratio by more than that")
    return lines


def cmd_quantize(args) -> int:
    """Quantize with PVQ, save the model to --out, print perplexity and time beside fp32 and baselines."""
    from .checkpoint import save_quantized

    t0 = time.perf_counter()
    preset = args.config or DEFAULT_PRESET
    method = args.method
    if parse_method(method).kind != "pvq":
        raise SystemExit(f"--method {method!r}: quantize saves a PVQ model; run baselines with `pvq-cuda compare`")
    default_out = Path("pvq-out") / f"{_slug(args.model)}-{preset}"
    args.out_dir = Path(args.out) if args.out else default_out
    job = prepare(args)
    fp32, fp32_eval = _fp32_row(job)
    rows, logs = [fp32], {}
    baselines = _baselines_to_run([] if args.baselines == "none" else args.baselines.split(","))
    for b in baselines:
        row, log, model = run_method(job, b, None, fp32_eval, None)
        rows.append(row)
        logs[b] = log
        del model
    row, log, model = run_method(job, method, preset, fp32_eval, args.out_dir / "quantization_log.json",
                                 keep_base=False)
    rows.append(row)
    logs[f"{method}:{preset}"] = log
    save_quantized(model, args.out_dir, tokenizer=job.lm.tokenizer, calibration_info=job.data_info)
    write_json(args.out_dir / "quantization_log.json",
               {"data": job.data_info, "results": [asdict(r) for r in rows], "runs": logs})
    print("\n".join(_header(job)))
    print()
    print(markdown_table(rows))
    print()
    print(f"saved: {args.out_dir} (per-layer log: {args.out_dir / 'quantization_log.json'}); "
          f"job time {time.perf_counter() - t0:.0f} s")
    print(f"perplexity: {row.perplexity:.4f}")
    return 0


def cmd_eval(args) -> int:
    """Held-out perplexity of --model (a quantized directory, an HF directory, a GGUF, or the default)."""
    args.nsamples = 1
    job = prepare(args, need_calibration=False)
    ev = perplexity(job.lm.model, job.evaluation, device=job.device)
    result = {"model": job.lm.name, "kind": job.lm.kind, **ev, "evaluation_source": job.data_info["evaluation_source"],
              "eval_seqlen": job.data_info["eval_seqlen"]}
    q = getattr(job.lm.model.config, "quantization_config", None)
    if isinstance(q, dict) and q.get("quant_method") == "pvq":
        result["quantization_config"] = q
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model: {job.lm.name} ({job.lm.kind})")
    print(f"evaluation: {ev['windows']} x {job.data_info['eval_seqlen']} tokens of "
          f"{job.data_info['evaluation_source']}; {ev['tokens']} predicted tokens; {ev['seconds']:.1f} s")
    print(f"perplexity: {ev['perplexity']:.4f}")
    return 0


def cmd_compare(args) -> int:
    """The full table: fp32, RTN/GPTQ/rotated GPTQ INT4/3/2 g128, PVQ 2.25/3.25/4.25 data-free and
    Hessian-aware; Markdown, JSON and a plot in --out (default bench/results)."""
    t0 = time.perf_counter()
    args.out_dir = Path(args.out) if args.out else Path("bench") / "results"
    job = prepare(args)
    slug = _slug(args.model)
    stem = args.out_dir / f"compare_{slug}"
    fp32, fp32_eval = _fp32_row(job)
    rows, logs = [fp32], {}
    runs = [(b, None) for b in _baselines_to_run(COMPARE_BASELINES)]
    presets = args.config.split(",") if args.config else list(COMPARE_PRESETS)
    for p in presets:
        if p not in PRESETS:
            raise SystemExit(f"--config {p!r}: unknown preset; choose from {', '.join(PRESETS)}")
    runs += [(m, p) for p in presets for m in ("pvq-datafree", "pvq")]
    for method, preset in runs:
        row, log, model = run_method(job, method, preset, fp32_eval, None)
        del model
        rows.append(row)
        logs[row.method] = log
        write_json(f"{stem}_log.json", {"data": job.data_info, "runs": logs})  # kept current: a long run
    header = _header(job)
    table = markdown_table(rows)
    total = time.perf_counter() - t0
    md = "\n".join([f"# pvq-cuda compare: {job.lm.name}", "", *[f"- {h}" for h in header],
                    f"- job time: {total:.0f} s", "", table, ""])
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

    print(f"corpus: {setup_corpus(force=args.force)}")
    print(f"model: {ensure_default_model()}")
    return 0
