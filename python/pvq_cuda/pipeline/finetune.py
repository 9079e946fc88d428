"""finetune_scales: after coding, train the continuous parameters of a PVQ model toward its
unquantized original, the codes fixed (issue 18.4).

What is trained: each PVQLinear's row scales and gain levels, and the model's normalisation
weights (every module whose class name ends in ``RMSNorm`` or ``LayerNorm``). Each is trained as a
multiplicative factor ``exp(t)``, ``t`` starting at 0, so one learning rate fits parameters of any
magnitude and a row scale never changes sign. The loss is the KL divergence of the quantized
model's next-token distribution from the original's, over the calibration tokens (the teacher
runs beside it, no labels needed).

How: during training each PVQLinear is stood in for by a dense twin (``_ScaledDirections``) that
keeps the layer's decoded directions, ``base[i, g·D:(g+1)·D] = y/‖y‖`` in the rotated basis, and
rebuilds its weight as ``row_scale[i] · levels[gain[i, g]] · base`` with the trainable factors,
so autograd reaches them; the input is rotated as PVQLinear rotates it. That twin costs 4 bytes a
weight (plus its gradient in flight): a training-time cost, fine for the models this runs on a
CPU here. Afterwards the trained values are written back into the packed layers (row scales
rounded to their stored float16) and the twins are removed; the codes are never touched.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from torch.nn import functional as F

from ..format.weight import PVQWeight
from ..layers.linear import PVQLinear
from ..ops import dequantize_packed, hadamard_transform


class _ScaledDirections(nn.Module):
    """A PVQLinear's weight as fixed directions times trainable row scales and gain levels."""

    def __init__(self, layer: PVQLinear) -> None:
        super().__init__()
        w, c = layer.weight, layer.config
        ones_rows = torch.ones_like(w.row_scale)
        ones_levels = torch.ones_like(w.levels)
        base = dequantize_packed(w.codes, ones_rows, ones_levels, w.out_features, w.in_features, c.D, c.K,
                                 c.scale_bits)
        _, gain = w.unpack()
        # Not a submodule: the twin stands in for the layer, and the swap walks submodules.
        object.__setattr__(self, "layer", layer)
        self.D = c.D
        self.register_buffer("base", base)
        self.register_buffer("gain", gain)
        self.register_buffer("row_scale0", w.row_scale.float())
        self.register_buffer("levels0", w.levels.clone())
        self.log_row = nn.Parameter(torch.zeros_like(self.row_scale0))
        self.log_levels = nn.Parameter(torch.zeros_like(self.levels0))
        # The decomposition must reproduce the packed weight, or training would start elsewhere.
        rebuilt = self.weight().detach()
        exact = w.dequantize(rotated=True)
        if not torch.allclose(rebuilt, exact, rtol=1e-5, atol=1e-6 * float(exact.abs().max())):
            raise RuntimeError("finetune_scales: the decoded directions do not rebuild the layer's weight")

    def weight(self) -> torch.Tensor:
        levels = self.levels0 * self.log_levels.exp()
        group = levels[self.gain] * (self.row_scale0 * self.log_row.exp())[:, None]  # [N, groups]
        return self.base * group.repeat_interleave(self.D, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        signs = self.layer.signs
        xr = hadamard_transform(x.float(), signs) if signs is not None else x.float()
        bias = None if self.layer.bias is None else self.layer.bias.float()
        return F.linear(xr, self.weight(), bias).to(x.dtype)

    @torch.no_grad()
    def write_back(self) -> None:
        layer = self.layer
        row_scale = (self.row_scale0 * self.log_row.exp()).to(torch.float16)
        levels = self.levels0 * self.log_levels.exp()
        PVQWeight(layer.codes, row_scale, levels, layer.out_features, layer.in_features, layer.config,
                  validate=True)  # what the layer will hold must be a valid packed weight
        layer.row_scale.copy_(row_scale)
        layer.levels.copy_(levels)
        layer.disable_decoded_cache()


def _norms(model: nn.Module) -> list[tuple[nn.Module, str]]:
    out = []
    for mod in model.modules():
        name = type(mod).__name__
        if (name.endswith("RMSNorm") or name.endswith("LayerNorm")) and isinstance(getattr(mod, "weight", None),
                                                                                  nn.Parameter):
            out.append((mod, "weight"))
    return out


def _swap(model: nn.Module, old_to_new: dict[int, nn.Module]) -> None:
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if id(child) in old_to_new:
                setattr(parent, name, old_to_new[id(child)])


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) in nats."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def finetune_scales(model: nn.Module, reference: nn.Module, calibration: torch.Tensor, *, steps: int = 100,
                    lr: float = 1e-3, batch_size: int = 4, norms: bool = True, held_out: int = 0,
                    progress: bool = True) -> dict:
    """Train the row scales and gain levels of ``model``'s PVQ layers (and its norm weights, with
    ``norms``) toward ``reference``, the same model unquantized; the codes stay. In place.

    Args:
        model: a causal LM whose decoder linears are PVQLinear (after :func:`quantize_model`).
        reference: the unquantized model (same architecture), the teacher; not changed.
        calibration: token ids, int64 ``[nsamples, seqlen]``; the last ``held_out`` windows are not
            trained on and give the held-out KL before and after.
        steps: optimizer steps (Adam), each on ``batch_size`` windows, cycling through them.
        lr: Adam's learning rate on the log-factors (1e-3: about 0.1 % per step at most).

    Returns:
        ``{"steps", "seconds", "trained_parameters", "kl_train_first", "kl_train_last",
        "kl_held_out_before", "kl_held_out_after"}`` (KL in nats per token; held-out ones None
        without ``held_out``).
    """
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.dtype != torch.long:
        raise ValueError("finetune_scales: calibration must be int64 token ids [nsamples, seqlen]")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"finetune_scales: steps must be a positive int, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"finetune_scales: lr must be a positive number, got {lr!r}")
    if not isinstance(held_out, int) or not 0 <= held_out < calibration.shape[0]:
        raise ValueError(f"finetune_scales: held_out must be an int in [0, {calibration.shape[0] - 1}] (windows "
                         f"left for training), got {held_out!r}")
    layers = [m for m in model.modules() if isinstance(m, PVQLinear)]
    if not layers:
        raise ValueError("finetune_scales: model has no PVQLinear layers (quantize it first)")
    if any(m.act_config is not None for m in layers):
        raise ValueError("finetune_scales: layers with coded activations take no gradient; finetune before "
                         "setting act_config")
    t0 = time.perf_counter()
    device = layers[0].codes.device
    train, test = calibration[:calibration.shape[0] - held_out], calibration[calibration.shape[0] - held_out:]

    twins = {id(m): _ScaledDirections(m) for m in layers}
    norm_params = _norms(model) if norms else []
    norm_orig = [getattr(m, a) for m, a in norm_params]
    norm0 = [p.detach().clone() for p in norm_orig]
    norm_logs = [nn.Parameter(torch.zeros_like(w, dtype=torch.float32)) for w in norm0]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    done = False
    _swap(model, twins)
    try:
        for p, _ in frozen:
            p.requires_grad_(False)

        def set_norms() -> None:
            for (mod, attr), w0, t in zip(norm_params, norm0, norm_logs):
                delattr(mod, attr)
                setattr(mod, attr, (w0.float() * t.exp()).to(w0.dtype))  # a tensor for this forward

        def kl_on(ids: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                teacher = reference(input_ids=ids.to(device)).logits
            set_norms()
            return _kl(model(input_ids=ids.to(device)).logits, teacher)

        def held_out_kl() -> float | None:
            if not len(test):
                return None
            with torch.no_grad():
                return float(sum(kl_on(test[i:i + batch_size]) * len(test[i:i + batch_size])
                                 for i in range(0, len(test), batch_size)) / len(test))

        params = [p for t in twins.values() for p in (t.log_row, t.log_levels)] + norm_logs
        opt = torch.optim.Adam(params, lr=lr)
        before = held_out_kl()
        losses = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="finetune", unit="step")
        for step in range(steps):
            start = (step * batch_size) % len(train)
            ids = torch.cat([train, train])[start:start + min(batch_size, len(train))]
            loss = kl_on(ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.set_postfix(kl=f"{losses[-1]:.4f}")
                bar.update()
        if bar is not None:
            bar.close()
        after = held_out_kl()
        done = True
    finally:
        # Trained values on success; on any error the model is left exactly as it came.
        _swap(model, {id(t): t.layer for t in twins.values()})
        for (mod, attr), orig, w0, t in zip(norm_params, norm_orig, norm0, norm_logs):
            if attr not in mod._parameters:  # a plain tensor from the last forward
                delattr(mod, attr)
                mod.register_parameter(attr, orig)
            if done:
                orig.data.copy_((w0.float() * t.detach().exp()).to(w0.dtype))
        for p, rg in frozen:
            p.requires_grad_(rg)
    for t in twins.values():
        t.write_back()
    trained = sum(t.log_row.numel() + t.log_levels.numel() for t in twins.values()) + sum(w.numel() for w in norm0)
    return {"steps": steps, "lr": lr, "batch_size": batch_size, "norms": norms, "seconds": time.perf_counter() - t0,
            "trained_parameters": trained, "kl_train_first": losses[0], "kl_train_last": losses[-1],
            "kl_held_out_before": before, "kl_held_out_after": after}
