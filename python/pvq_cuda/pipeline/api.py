"""quantize_model / quantize_models: the public entry points, their argument checks and set-up."""

from __future__ import annotations

import inspect
import math
import os
import re
import time
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..format.activation import as_activation_config, check_activation_shape
from ..format.config import DEFAULT_PRESET, PVQConfig
from ..layers.decoder import check_dense_blocks, decoder_layers, linears
from ..layers.quantized_model import set_activation_coding
from ..quantization.hessian import DEFAULT_DAMP
from ..quantization.methods import parse_method, width_problem
from ..quantization.quantize import check_refine_passes
from .allocate import allocate_run, check_bpw
from .calibration import calibration_chunks, calibration_digest
from .resume import Resume, fingerprint
from .run import LOSS_DEFINITION, Run, config_for, progress_bar
from .stream import execute
from .tune import TUNE_LR


def compile_overrides(overrides) -> list[tuple[re.Pattern, PVQConfig]]:
    out = []
    for pattern, cfg in (overrides or {}).items():
        if isinstance(cfg, str):
            cfg = PVQConfig.preset(cfg)
        if not isinstance(cfg, PVQConfig):
            raise TypeError(f"quantize_model: overrides[{pattern!r}] must be a PVQConfig or a preset name")
        try:
            out.append((re.compile(pattern), cfg))
        except re.error as e:
            raise ValueError(f"quantize_model: overrides key {pattern!r} is not a valid regex: {e}") from e
    return out


def kept_in_full_precision(model: nn.Module, in_blocks: set[str], ignore_re) -> dict[str, str]:
    """Every linear and embedding that the run leaves in full precision, with the reason: the
    log's answer to "was anything skipped?"."""
    owner: dict[int, str] = {}  # a parameter's first module, to name tied weights (Gemma's lm_head)
    for name, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            owner.setdefault(id(p), name)
    kept = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            kept[name] = "embedding (never quantized)"
        elif isinstance(mod, nn.Linear) and name not in in_blocks:
            tied = owner[id(mod.weight)]
            kept[name] = ("outside the decoder blocks (lm_head and embeddings always stay)"
                          + (f"; its weight is tied to {tied}'s" if tied != name else ""))
        elif isinstance(mod, nn.Linear) and ignore_re is not None and ignore_re.search(name):
            kept[name] = f"matches ignore={ignore_re.pattern!r}"
    return kept


def quantize_model(model: nn.Module, calibration=None, config: PVQConfig | str | None = None, *,
                   ignore: str | None = None, device=None, offload: bool = False, act_order: bool = False,
                   resume_dir: str | os.PathLike | None = None, progress: bool = True, method: str = "pvq",
                   overrides: Mapping[str, PVQConfig | str] | None = None, damp: float = DEFAULT_DAMP,
                   batch_size: int = 8, seed: int = 0, log_path: str | os.PathLike | None = None,
                   calibration_info: Mapping | None = None, metric_search: bool = False,
                   fp_targets: bool = False, refine_passes: int = 0, act_config=None,
                   bpw: float | None = None, tune_epochs: int = 0, tune_lr: float = TUNE_LR) -> dict:
    """Quantize the decoder linears of a causal LM in place, block by block.

    Args:
        model: a transformers causal LM with ``model.model.layers`` dense decoder blocks: tested on
            Llama (SmolLM2), Mistral, Qwen2, Qwen3, Phi-3, Gemma-2, Gemma-3 and OLMo-2. Mixture-of-
            experts blocks, weight matrices outside nn.Linear layers and linears whose input width
            the method cannot take (``in_features`` a multiple of D; with the rotation a Hadamard
            size m·2^k, m in {1, 12, 20, 28, 36, 52, 60}) raise ValueError naming them, before any work.
        calibration: token ids, int64 ``[nsamples, seqlen]`` or a list of 1-D tensors; required by
            the methods that use Hessians (``pvq``, ``gptq-*``), ignored by the data-free ones.
        config: a :class:`PVQConfig` or a preset name (default ``pvq-3.25``), for ``method="pvq"``.
        ignore: regex; linears whose full name matches (``re.search``) stay in full precision.
            Only the decoder blocks are quantized: embeddings and lm_head always stay.
        device: where the work runs (default CUDA when available, else CPU). Without ``offload``
            the whole model moves there.
        offload: keep the model and the activations on CPU and move one block at a time to ``device``.
        act_order: quantize columns in order of decreasing Hessian diagonal (GPTQ's desc_act).
        metric_search: PVQ only: refine each group's pulses under its Hessian block metric
            (``quantize_weight(..., metric_search=True)``; slower, usually better).
        refine_passes: PVQ only: coordinate-descent passes over each layer's groups after error
            feedback (``quantize_weight(..., refine_passes=n)``; lowers the layer loss, costs time).
        fp_targets: quantize each layer toward the unquantized model's outputs (asymmetric
            calibration, :func:`fp_target_weight`); costs one more forward per block and the fp
            model's activations beside the quantized ones. Any method with a Hessian.
        tune_epochs: methods with a Hessian: after each group of a block is quantized, train the
            block's linears not yet quantized (their weights and biases; layers kept by ``ignore``
            never) for this many passes over the calibration chunks, Adam, one step a chunk, so
            that the block's outputs match its outputs before quantization (with ``fp_targets``:
            the unquantized model's), keeping the best epoch's weights; the later groups are then
            quantized from the trained weights (QuIP#'s fine-tuning within a block,
            :mod:`pvq_cuda.pipeline.tune`). 0 (default): none. Each group's losses are in the log
            (``tune``). On SmolLM2-135M it helps at 2.25 bpw (~3 % perplexity out of domain) and
            only fits the calibration text at 3.25 (README).
        tune_lr: Adam's learning rate for ``tune_epochs``, relative to each layer's weight RMS
            (a step moves a weight by at most about ``tune_lr`` · RMS).
        resume_dir: save each finished block there and skip finished blocks on a rerun with the
            same settings (a rerun with other settings raises ValueError).
        progress: show a tqdm bar (layer name, loss, ETA).
        method: ``"pvq"`` (default), ``"pvq-datafree"``, or a baseline such as ``"rtn-int4"``,
            ``"gptq-int3"``, ``"gptq-rot-int3"`` (see :mod:`pvq_cuda.methods`); baselines leave
            dense ``nn.Linear`` layers holding the dequantized weights (simulated quantization).
        overrides: ``{regex: PVQConfig or preset name}``, per-module configs (first match wins).
        damp: Hessian damping λ (λ·mean(diag H) is added to the diagonal).
        batch_size: calibration samples per forward pass.
        seed: seed of the baselines' rotation (PVQ's rotation seed is ``config.seed``).
        log_path: where the JSON log is (re)written after every block.
        calibration_info: JSON-able description of the calibration data, stored in the
            ``quantization_config`` (e.g. ``{"source": ..., "nsamples": ..., "seqlen": ...}``).
        act_config: an :class:`~pvq_cuda.ActivationConfig` or preset name (``pvq-a4.25`` ...): after
            the weights are quantized, every quantized layer codes its input activations online
            with it (W+A, paper.md §7; recorded in the saved ``quantization_config``). PVQ methods
            only; the weights are calibrated as without it.
        bpw: a mean rate R in [2.0, 4.5] bits per weight (everything stored counted) instead of one
            config for all: before quantizing, each linear gets the D, K and gain bits that minimise
            the summed predicted loss of all of them at R (:mod:`pvq_cuda.quantization.allocation`:
            the loss of config c on a layer is predicted as d(c)·‖W‖²/n·tr(D)·F, with d(c) the
            config's relative error on Gaussian rows, D the pivots of the layer's rotated
            calibration Hessian, as error feedback sees them, and F the model output's sensitivity
            to the layer's output, a diagonal Fisher; the identity Hessian and F = 1 for
            data-free methods). On SmolLM2-135M it beats the uniform presets at every rate.
            The achieved mean is within 0.01 of R (ValueError otherwise). PVQ methods only, not with
            ``overrides``; ``config`` then only supplies the rotation seed. The chosen configs are
            in the log (``allocation``) and in the saved checkpoint (``module_overrides``).

    Returns:
        The log: ``{"method", "label", "config", "loss_definition", "device", "kept", "layers":
        [{"name", "block", "loss", "loss_kind", "bpw", "seconds", "hessian_seconds", "path", ...}],
        "seconds", "bpw"}``, where ``bpw`` is the parameter-weighted mean over the quantized
        linears, ``kept`` names every linear and embedding left in full precision with the reason,
        and ``path`` says how a calibrated layer's block ran (``"staged"`` or ``"generic"``).
        ``seconds`` counts the whole run, with ``bpw``'s statistics pass (also in
        ``allocation["seconds"]``; ~0 where a sweep had them already).
    """
    run = prepare(model, calibration, config, ignore=ignore, device=device, offload=offload, act_order=act_order,
                   resume_dir=resume_dir, progress=progress, method=method, overrides=overrides, damp=damp,
                   batch_size=batch_size, seed=seed, log_path=log_path, calibration_info=calibration_info,
                   metric_search=metric_search, fp_targets=fp_targets, refine_passes=refine_passes,
                   act_config=act_config, bpw=bpw, tune_epochs=tune_epochs, tune_lr=tune_lr)
    execute([run])
    _install_activation_coding(model, run)
    return run.log


def _install_activation_coding(model: nn.Module, run: Run) -> None:
    if run.act_config is not None:
        set_activation_coding(model, run.act_config)


def uses_fp_targets(method: str, fp_targets: bool) -> bool:
    """Whether a run of ``method`` quantizes toward fp targets (only methods with a Hessian do);
    such runs can share the fp model's pass (:func:`quantize_models`)."""
    return bool(fp_targets) and parse_method(method).hessian


#: quantize_models: the options each run may set for itself; the others are shared.
PER_RUN_OPTIONS = frozenset({"method", "config", "overrides", "act_order", "metric_search", "refine_passes",
                             "log_path", "calibration_info", "act_config", "bpw", "tune_epochs", "tune_lr"})


def quantize_models(models: Sequence[nn.Module], calibration=None, runs: Sequence[Mapping] | None = None,
                    **options) -> list[dict]:
    """Quantize several copies of one model, each by its own method, with the results of separate
    :func:`quantize_model` calls but less work.

    ``quantize_model(models[k], calibration, **options, **runs[k])`` for every k, except that the
    runs with a Hessian and ``fp_targets`` go block by block together and share the unquantized
    model's pass over each block (one forward per block instead of one per run: ~27 % of a
    pvq-3.25 run on SmolLM2). Each run's log has ``seconds`` = its own work plus the shared pass,
    and ``shared_seconds`` = the shared pass.

    Args:
        models: the copies (distinct objects, identical weights: checked block by block).
        calibration: token ids, as for :func:`quantize_model`, shared by all runs.
        runs: one mapping per model of the options in :data:`PER_RUN_OPTIONS` (``method``,
            ``config``, ``overrides``, ``act_order``, ``metric_search``, ``refine_passes``,
            ``log_path``, ``calibration_info``, ``act_config``, ``bpw``, ``tune_epochs``, ``tune_lr``).
        **options: any other :func:`quantize_model` keyword argument, shared by all runs;
            ``resume_dir`` is not taken (resume single runs with :func:`quantize_model`).

    Returns:
        The runs' logs, in the order of ``models``.
    """
    models = list(models)
    runs = [dict(r) for r in (runs if runs is not None else [{}] * len(models))]
    if len(runs) != len(models):
        raise ValueError(f"quantize_models: runs must hold one mapping per model ({len(models)}), got {len(runs)}")
    if len({id(m) for m in models}) != len(models):
        raise ValueError("quantize_models: models must be distinct objects (copies, e.g. copy.deepcopy)")
    if "resume_dir" in options:
        raise TypeError("quantize_models: resume_dir is not supported; resume single runs with quantize_model")
    for k, r in enumerate(runs):
        bad = sorted(set(r) - PER_RUN_OPTIONS)
        if bad:
            raise TypeError(f"quantize_models: runs[{k}] sets {bad}, which all runs share; pass them as keyword "
                            f"arguments (per-run options: {sorted(PER_RUN_OPTIONS)})")
    defaults = {n: p.default for n, p in inspect.signature(quantize_model).parameters.items()
                if n not in ("model", "calibration")}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"quantize_models: unexpected keyword arguments {unknown}")
    prepared = []
    for model, r in zip(models, runs):
        kw = {**defaults, **options, **r}
        prepared.append(prepare(model, calibration, kw.pop("config"), **dict(kw, progress=False)))
    if options.get("progress", True):  # one bar for all runs (several would interleave their lines)
        bar = progress_bar(sum(run.total_layers for run in prepared), f"{len(prepared)} runs")
        for run in prepared:
            run.bar = bar
    execute(prepared)
    for model, run in zip(models, prepared):
        _install_activation_coding(model, run)
    return [run.log for run in prepared]


def prepare(model: nn.Module, calibration, config, *, ignore, device, offload, act_order, resume_dir, progress,
             method, overrides, damp, batch_size, seed, log_path, calibration_info, metric_search, fp_targets,
             refine_passes, act_config=None, bpw=None, tune_epochs=0, tune_lr=TUNE_LR) -> Run:
    """Check quantize_model's arguments and set up its run (nothing is quantized yet)."""
    layers = decoder_layers(model)
    check_dense_blocks(layers)
    m = parse_method(method)
    if config is None:
        config = PVQConfig.preset(DEFAULT_PRESET)
    elif isinstance(config, str):
        config = PVQConfig.preset(config)
    elif not isinstance(config, PVQConfig):
        raise TypeError(f"quantize_model: config must be a PVQConfig or a preset name, got {type(config).__name__}")
    if ignore is not None:
        try:
            ignore_re = re.compile(ignore)
        except re.error as e:
            raise ValueError(f"quantize_model: ignore {ignore!r} is not a valid regex: {e}") from e
    else:
        ignore_re = None
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"quantize_model: batch_size must be a positive int, got {batch_size!r}")
    if not damp >= 0:
        raise ValueError(f"quantize_model: damp must be >= 0, got {damp!r}")
    check_refine_passes(refine_passes, "quantize_model")
    if not isinstance(tune_epochs, int) or isinstance(tune_epochs, bool) or tune_epochs < 0:
        raise ValueError(f"quantize_model: tune_epochs must be an int >= 0, got {tune_epochs!r}")
    if not (isinstance(tune_lr, (int, float)) and not isinstance(tune_lr, bool) and math.isfinite(tune_lr)
            and tune_lr > 0):
        raise ValueError(f"quantize_model: tune_lr must be a positive number, got {tune_lr!r}")
    act = as_activation_config(act_config, "quantize_model: act_config")
    if act is not None and m.kind != "pvq":
        raise ValueError(f"quantize_model: act_config codes activations against PVQ weights, but method {method!r} "
                         f"leaves dense layers; use method 'pvq' or 'pvq-datafree'")
    if bpw is not None:
        check_bpw(bpw)
        if m.kind != "pvq":
            raise ValueError(f"quantize_model: bpw chooses a PVQ config per layer, but method {method!r} is not PVQ; "
                             f"use method 'pvq' or 'pvq-datafree'")
        if overrides:
            raise ValueError("quantize_model: bpw chooses every layer's config itself; it cannot be combined with "
                             "overrides (use ignore= to keep layers in full precision)")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    overrides_c = compile_overrides(overrides)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    chunks = calibration_chunks(calibration, batch_size, vocab) if m.hessian else None

    in_blocks = {f"model.layers.{i}.{rel}": lin for i, b in enumerate(layers) for rel, lin in linears(b).items()}
    todo = [n for n in in_blocks if ignore_re is None or not ignore_re.search(n)]
    if not todo:
        raise ValueError("quantize_model: no linear layer is left to quantize (ignore matches all of them)")
    problems = [f"{n} ({why})" for n in todo
                if (why := width_problem(m, config_for(n, config, overrides_c), in_blocks[n].in_features))]
    if problems:
        raise ValueError(f"quantize_model: {m.name} cannot quantize {len(problems)} linear(s): "
                         f"{'; '.join(problems[:4])}{'; ...' if len(problems) > 4 else ''}. Keep them in full "
                         f"precision with ignore=, or give them a config that fits (e.g. one with rotate=False) with overrides=")
    if act is not None:  # before any work: each coded layer's input must fit the activation groups
        for name in todo:
            check_activation_shape(act, model.get_submodule(name).in_features, f"quantize_model: act_config at {name}")
        if not all(c.rotate for c in [config, *(c for _, c in overrides_c)]):
            raise ValueError("quantize_model: act_config codes activations in the weights' rotated basis; the PVQ "
                             "config must have rotate=True")

    model.eval()
    if not offload:
        model.to(dev)
    refine_passes = refine_passes if m.kind == "pvq" and m.hessian else 0
    tune_epochs = tune_epochs if m.hessian else 0  # data-free methods carry no activations to train on
    run = Run(model, m, config, overrides_c, ignore_re, dev, offload, act_order, metric_search, damp, seed, progress,
               log_path, len(todo), fp_targets=uses_fp_targets(method, fp_targets), refine_passes=refine_passes,
               tune_epochs=tune_epochs, tune_lr=tune_lr)
    run.layers, run.chunks = layers, chunks
    run.act_config = act
    run.log = {"method": m.name, "label": m.label, "config": config.to_dict() if m.kind == "pvq" else None,
               "overrides": {p.pattern: c.to_dict() for p, c in overrides_c}, "ignore": ignore,
               "act_order": act_order, "metric_search": metric_search, "refine_passes": refine_passes,
               "tune_epochs": tune_epochs, "tune_lr": tune_lr if tune_epochs else None,
               "fp_targets": run.fp_targets, "act_config": None if act is None else act.to_dict(),
               "damp": damp if m.hessian else None, "device": str(dev), "offload": offload,
               "loss_definition": LOSS_DEFINITION, "calibration": dict(calibration_info or {}),
               "kept": kept_in_full_precision(model, set(in_blocks), ignore_re),
               "layers": [], "seconds": None, "bpw": None}
    if chunks is not None:
        run.log["calibration"].update(nsamples=sum(c.shape[0] for c in chunks),
                                      tokens=sum(c.numel() for c in chunks))
    if bpw is not None:  # before the fingerprint: resuming needs the same allocation
        t_alloc = time.perf_counter()
        a = allocate_run(run, todo, bpw)
        t_alloc = time.perf_counter() - t_alloc
        config, overrides_c = run.config, run.overrides
        run.log["config"] = config.to_dict()
        run.log["overrides"] = {p.pattern: c.to_dict() for p, c in overrides_c}
        run.log["allocation"] = {"bpw": bpw, "achieved": a.bpw, "predicted_loss": a.predicted_loss,
                                 "layers": {n: c.to_dict() for n, c in a.configs.items()},
                                 "sensitivity": a.sensitivity, "seconds": t_alloc}
    if resume_dir is not None:
        run.resume = Resume(resume_dir, fingerprint(model, m, config, overrides_c, ignore, act_order, metric_search,
                                                      run.fp_targets, refine_passes, damp, seed,
                                                      calibration_digest(chunks), tune_epochs, tune_lr))
    return run
