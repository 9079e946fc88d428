"""The state of one quantize_model run, and the quantization of one layer or one group in it."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..format.atomic import write_json
from ..format.config import PVQConfig
from ..layers.decoder import set_submodule
from ..layers.linear import PVQLinear
from ..layers.quantized_model import make_save_pretrained_atomic, model_quantization_config
from ..quantization.hessian import HessianCollector
from ..quantization.methods import Method, h_loss, quantize_linear, weight_loss
from .capture import ShiftCollector
from .resume import Resume
from .tune import TUNE_LR

LOSS_DEFINITION = ("H-weighted relative error tr((W-Wq) H (W-Wq)^T) / tr(W H W^T), H the damped calibration "
                   "Hessian of the layer; data-free methods log the weight error |W-Wq|^2/|W|^2 instead")


def progress_bar(total: int, desc: str, unit: str = "layer"):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True)


def config_for(name: str, config: PVQConfig, overrides) -> PVQConfig:
    """The config of module ``name``: that of the first override (regex, config) it matches, else ``config``."""
    for pattern, cfg in overrides:
        if pattern.search(name):
            return cfg
    return config


class Run:
    """State of one quantize_model call."""

    def __init__(self, model, method: Method, config: PVQConfig, overrides, ignore, device, offload, act_order,
                 metric_search, damp, seed, progress, log_path, total_layers, fp_targets=False, refine_passes=0,
                 tune_epochs=0, tune_lr=TUNE_LR):
        self.model, self.method, self.config = model, method, config
        self.fp_targets = fp_targets
        self.overrides = overrides
        self.ignore = ignore
        self.device, self.offload = device, offload
        self.act_order, self.metric_search, self.damp, self.seed = act_order, metric_search, damp, seed
        self.refine_passes = refine_passes
        self.tune_epochs, self.tune_lr = tune_epochs, tune_lr  # tune.tune_pending between a block's groups
        self.layers: nn.ModuleList | None = None
        self.chunks: list[torch.Tensor] | None = None  # calibration token ids, one tensor per forward
        self.resume: Resume | None = None
        self.log_path = log_path
        self.log: dict = {}
        self.total_layers = total_layers
        self.bar = progress_bar(total_layers, method.name) if progress else None

    def config_for(self, name: str) -> PVQConfig:
        return config_for(name, self.config, self.overrides)

    def record(self, entry: dict) -> None:
        self.log["layers"].append(entry)
        if self.bar is not None:
            self.bar.set_description(f"{self.method.name}: {entry['name']}")
            self.bar.set_postfix(loss=f"{entry['loss']:.4g}")
            self.bar.update(1)

    def write_log(self) -> None:
        if self.log_path is not None:
            write_json(self.log_path, self.log)

    def quantize_layer(self, block: nn.Module, prefix: str, rel: str, H: torch.Tensor | None, seconds_h: float,
                       block_index: int, shift: torch.Tensor | None = None, input_norm: float | None = None) -> None:
        full = f"{prefix}{rel}"
        linear = block.get_submodule(rel)
        # The baselines overwrite the nn.Linear's weight in place: keep the original for the loss.
        W = linear.weight.detach().clone() if self.method.simulated else linear.weight.detach()
        t0 = time.perf_counter()
        if shift is not None:
            W = fp_target_weight(W, shift, H)
        res = quantize_linear(linear, self.method, self.config_for(full), H, act_order=self.act_order,
                              metric_search=self.metric_search, refine_passes=self.refine_passes, seed=self.seed,
                              weight=W if shift is not None else None)
        seconds = time.perf_counter() - t0
        if res.module is not linear:
            set_submodule(block, rel, res.module)
        loss = h_loss(W, res.w_hat, H) if H is not None else weight_loss(W, res.w_hat)
        if isinstance(res.module, PVQLinear):
            res.module.set_input_norm(input_norm)
            res.module.enable_decoded_cache()  # the rest of the pipeline runs dense GEMMs on the decoded weight
        self.record({"name": full, "block": block_index, "out_features": linear.out_features,
                     "in_features": linear.in_features, "loss": loss,
                     "loss_kind": "hessian" if H is not None else "weight", "hessian_used": res.hessian_used,
                     "bpw": res.bpw, "seconds": seconds, "hessian_seconds": seconds_h,
                     **({"input_norm": input_norm} if input_norm is not None else {})})


    def quantize_group(self, block: nn.Module, prefix: str, block_index: int, names: list[str],
                       hc: HessianCollector, shift: ShiftCollector | None, seconds_h: float) -> None:
        """Quantize the layers ``names`` of one sequential group with their collected Hessians."""
        for n in names:
            try:
                H = hc.hessian(n)
            except KeyError:
                raise RuntimeError(f"quantize_model: {prefix + n} was never called in the block's forward pass, "
                                   f"so it has no Hessian") from None
            S = None if shift is None else shift.sum * (2.0 / max(hc.tokens(n), 1))
            self.quantize_layer(block, prefix, n, H, seconds_h, block_index, shift=S, input_norm=hc.input_norm(n))

def fp_target_weight(W: torch.Tensor, shift: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """The weight whose outputs on the quantized model's inputs X best match the fp model's W·X̃.

    min_Q ‖W X̃ − Q X‖² is min_Q ‖(W_t − Q) X‖² plus a constant, with the least-squares target
    W_t = W + W·S·H⁻¹, S = (2/N) Σ (x̃ − x) xᵀ and H the damped (2/N) Σ x xᵀ. Written as a
    correction of W it leaves W unchanged when X̃ = X (damping does not shrink it). This is the
    asymmetric calibration of GPTQv2/GPTAQ: error feedback then also undoes the drift that the
    earlier quantized layers left in this layer's inputs.
    """
    Wd, Hd = W.double(), H.double().to(W.device)
    rhs = (Wd @ shift.double().to(W.device)).T
    # W S H⁻¹ = (H⁻¹ (W S)ᵀ)ᵀ, H symmetric. The damped H is positive definite, and a Cholesky
    # solve takes ~0.8x an LU one at n = 1536; LU is the fallback for an H that is not.
    L, info = torch.linalg.cholesky_ex(Hd)
    corr = torch.cholesky_solve(rhs, L) if int(info) == 0 else torch.linalg.solve(Hd, rhs)
    return (Wd + corr.T).to(W.dtype)


def finish(run: Run, seconds: float) -> None:
    """The log's totals (``seconds``: the run's own work, plus its allocation's statistics pass
    where it had one), and the PVQ model's quantization_config."""
    m = run.method
    run.log["seconds"] = seconds + (run.log.get("allocation") or {}).get("seconds", 0.0)
    params = sum(e["out_features"] * e["in_features"] for e in run.log["layers"])
    run.log["bpw"] = sum(e["bpw"] * e["out_features"] * e["in_features"] for e in run.log["layers"]) / params
    run.write_log()
    if m.kind == "pvq":
        calib = (dict(run.log["calibration"], metric_search=run.metric_search, refine_passes=run.refine_passes,
                      fp_targets=run.fp_targets, tune_epochs=run.tune_epochs,
                      **({"tune_lr": run.tune_lr} if run.tune_epochs else {})) if m.hessian else None)
        run.model.config.quantization_config = model_quantization_config(
            run.model, calibration=calib, damp=run.log["damp"], act_order=run.act_order, method=m.name)
        make_save_pretrained_atomic(run.model)  # model.save_pretrained works right away, as save_quantized


def decoded_cache(block: nn.Module, on: bool) -> None:
    """Within the pipeline, quantized layers run as dense GEMMs on their decoded weights (the
    fused kernel is meant for small batches); the caches go once a block is finished."""
    for mod in block.modules():
        if isinstance(mod, PVQLinear):
            mod.enable_decoded_cache() if on else mod.disable_decoded_cache()


def block_to(block: nn.Module, run: Run, where) -> None:
    if run.offload:
        block.to(where)
