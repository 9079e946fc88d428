"""Quantization methods by name, and the quantization of one linear layer by each.

`quantize_model` runs every method through the same block-by-block pipeline, so that comparisons
are fair: same calibration data, same Hessians, same order. A method is named by a string:

=====================  ==========================================================================
``pvq``                PVQ with the given PVQConfig, Hessian-aware (error feedback on the
                       calibration Hessian)
``pvq-datafree``       PVQ without calibration (``quantize_weight(W, config)``)
``rtn-int<b>[-g<G>]``  round-to-nearest, b bits, asymmetric, group G (default 128), simulated:
                       the layer stays an ``nn.Linear`` holding the dequantized weight
``gptq-int<b>[-g<G>]`` GPTQ, same storage as RTN, simulated
``gptq-rot-int<b>...`` GPTQ on Hadamard-rotated weights (QuIP/QuaRot-style incoherence), simulated
=====================  ==========================================================================

The baselines come from :mod:`pvq_cuda.quantization.baselines` (``rtn_quantize``, ``gptq_quantize``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..format.config import PVQConfig
from ..layers.linear import PVQLinear
from ..ops import HADAMARD_BASES, HADAMARD_MAX_N, hadamard_split
from .baselines import gptq_quantize, rtn_quantize
from .quantize import quantize_weight

BASELINE_GROUP = 128  # the group size of every baseline in the tables

_METHOD_RE = re.compile(r"^(?P<kind>rtn|gptq|gptq-rot)-int(?P<bits>[1-8])(?:-g(?P<group>\d+))?$")


@dataclass(frozen=True)
class Method:
    """A parsed method name.

    Attributes:
        name: the canonical name (lower case, the default group size left out).
        kind: ``"pvq"``, ``"rtn"`` or ``"gptq"``.
        hessian: whether the method uses calibration Hessians.
        bits, group: scalar baselines only.
        rotate: GPTQ on rotated weights.
    """

    name: str
    kind: str
    hessian: bool
    bits: int | None = None
    group: int | None = None
    rotate: bool = False

    @property
    def simulated(self) -> bool:
        """True for the baselines: dense ``nn.Linear`` layers holding dequantized weights."""
        return self.kind != "pvq"

    @property
    def label(self) -> str:
        if self.kind == "pvq":
            return "PVQ Hessian-aware" if self.hessian else "PVQ data-free"
        rot = " rotated" if self.rotate else ""
        return f"{self.kind.upper()}{rot} INT{self.bits} g{self.group} (simulated)"


def parse_method(name: str) -> Method:
    """Parse a method name (see the module docstring); raises ValueError naming ``method``."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a str, got {type(name).__name__}")
    n = name.strip().lower()
    if n == "pvq":
        return Method(n, "pvq", hessian=True)
    if n in ("pvq-datafree", "pvq-data-free"):
        return Method("pvq-datafree", "pvq", hessian=False)
    m = _METHOD_RE.match(n)
    if m is None:
        raise ValueError(f"method {name!r} is not known; use 'pvq', 'pvq-datafree', 'rtn-int<b>[-g<G>]', "
                         f"'gptq-int<b>[-g<G>]' or 'gptq-rot-int<b>[-g<G>]' (b in 1..8)")
    group = int(m["group"]) if m["group"] else BASELINE_GROUP
    if group < 1:
        raise ValueError(f"method {name!r}: the group size must be >= 1")
    kind = m["kind"]
    canonical = f"{kind}-int{m['bits']}" + ("" if group == BASELINE_GROUP else f"-g{group}")
    return Method(canonical, "gptq" if kind.startswith("gptq") else "rtn", hessian=kind.startswith("gptq"),
                  bits=int(m["bits"]), group=group, rotate=kind == "gptq-rot")


def width_problem(method: Method, config: PVQConfig, in_features: int) -> str | None:
    """Why ``method`` (with ``config`` for PVQ) cannot quantize a linear of ``in_features`` inputs,
    or None when it can. PVQ codes groups of D inputs; PVQ with its rotation and rotated GPTQ take
    the Hadamard transform over all inputs, whose sizes are n = m·2^k (ops.hadamard_split)."""
    if method.kind == "pvq" and in_features % config.D:
        return f"in_features {in_features} is not a multiple of the group size D={config.D}"
    rotated = config.rotate if method.kind == "pvq" else method.rotate
    if rotated and hadamard_split(in_features) is None:
        return (f"in_features {in_features} is not a Hadamard size n = m·2^k with m in "
                f"{{{', '.join(map(str, HADAMARD_BASES))}}} and n <= {HADAMARD_MAX_N}, which the rotation needs "
                f"(e.g. 640 = 20·32 is one, 176 = 11·16 is not)")
    return None


def h_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """The H-weighted relative error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), ΔW = W − Ŵ, with H the damped
    calibration Hessian the layer was quantized with: the share of the layer's output energy on
    the calibration inputs that quantization loses (damping adds a small weight-MSE term)."""
    W = W.float()
    dW = W - W_hat.float().to(W.device)
    H = H.to(W.device)
    num = ((dW @ H) * dW).sum(dtype=torch.float64)
    den = ((W @ H) * W).sum(dtype=torch.float64)
    return float(num / den) if den > 0 else float("nan")


def weight_loss(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """The relative weight error ‖W − Ŵ‖² / ‖W‖² (used where no Hessian exists)."""
    W = W.float()
    den = W.square().sum(dtype=torch.float64)
    return float((W - W_hat.float().to(W.device)).square().sum(dtype=torch.float64) / den) if den > 0 else float("nan")


@dataclass
class LayerResult:
    module: nn.Module   # the replacement: PVQLinear, or the same nn.Linear holding Ŵ (baselines)
    w_hat: torch.Tensor  # the dequantized weight, original basis, float32
    bpw: float
    hessian_used: bool


def quantize_linear(linear: nn.Linear, method: Method, config: PVQConfig, hessian: torch.Tensor | None = None, *,
                    act_order: bool = False, metric_search: bool = False, refine_passes: int = 0, seed: int = 0,
                    weight: torch.Tensor | None = None) -> LayerResult:
    """Quantize one ``nn.Linear`` by ``method`` (``hessian``: the damped fp32 [in, in] Hessian;
    ``act_order``, ``metric_search``, ``refine_passes``: see :func:`quantize_weight`).

    ``weight``: the weight to quantize in place of ``linear.weight`` (same shape), e.g. the fp
    target of :func:`pvq_cuda.pipeline.fp_target_weight`."""
    W = linear.weight.detach() if weight is None else weight.detach()
    if W.shape != linear.weight.shape:
        raise ValueError(f"quantize_linear: weight must have the linear's shape {tuple(linear.weight.shape)}, "
                         f"got {tuple(W.shape)}")
    bias = None if linear.bias is None else linear.bias.detach()
    if method.hessian and hessian is None:
        raise ValueError(f"method {method.name!r} needs a calibration Hessian")
    if method.kind == "pvq":
        use_h = method.hessian and hessian is not None
        if use_h:
            weight = quantize_weight(W, config, hessian=hessian, act_order=act_order, metric_search=metric_search,
                                     refine_passes=refine_passes)
        else:
            weight = quantize_weight(W, config)
        layer = PVQLinear.from_weight(weight, bias)
        return LayerResult(layer, weight.dequantize(), weight.bpw, use_h)

    # A last group shorter than the others where the group size does not divide in_features
    # (SmolLM2's 576 at g128), paid for in the baselines' bpw.
    extra = {"ragged": True} if W.shape[1] % method.group else {}
    if method.kind == "rtn":
        w_hat, bpw = rtn_quantize(W, method.bits, group=method.group, **extra)
    else:
        w_hat, bpw = gptq_quantize(W, hessian, method.bits, group=method.group, rotate=method.rotate, seed=seed,
                                     act_order=act_order, **extra)
    w_hat = w_hat.float()
    with torch.no_grad():
        linear.weight.copy_(w_hat.to(linear.weight.dtype))
    return LayerResult(linear, w_hat, float(bpw), method.hessian)
