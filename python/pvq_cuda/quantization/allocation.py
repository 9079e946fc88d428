"""Any average bit rate: a PVQ config per layer (D, K, gain bits) that minimises the summed
predicted output loss of the layers at a given mean bits per weight.

The prediction (per layer ℓ and candidate config c):

    loss_ℓ(c) = d(c) · S_ℓ · F_ℓ,        S_ℓ = (‖W_ℓ‖² / n_ℓ) · tr(D_ℓ)

- d(c) is the config's relative distortion ‖W − Ŵ‖²/‖W‖² on i.i.d. Gaussian rows, measured by
  running the data-free quantizer (:func:`quantize_weight`) on a fixed random matrix. After the
  Hadamard rotation a layer's weights look Gaussian (paper.md §6), so d(c) is the error per unit
  of weight energy the config leaves, whatever the layer.
- S_ℓ turns that into the layer's output loss tr(ΔW H ΔWᵀ) under GPTQ/LDLQ error feedback: with
  H = L·diag(D)·Lᵀ (the rotated, damped Hessian), quantizing column by column and feeding each
  column's error forward leaves an output loss Σ_j D_jj ‖e_j‖², and with white errors of variance
  d(c)·‖W‖²/n per weight that is d(c)·(‖W‖²/n)·tr(D). (Plain rounding without feedback would
  pay tr(H) instead of tr(D) ≤ tr(H).)
- F_ℓ weighs one layer's output error against another's by what it does to the model's output:
  the mean over calibration tokens and output channels of the squared gradient of the model's
  log-likelihood with respect to the layer's output, at labels drawn from the model itself (the
  diagonal of the Fisher information, the Hessian of the KL divergence from the unquantized model).
  For an output error e_t that is white across channels, the expected KL grows by ½·F_ℓ·‖e_t‖² a
  token. Without it (F_ℓ = 1) an error in block 0's down_proj counted as much as one of equal size
  in block 29's down_proj (F: 1.8e-3 against 1.7e-5 on SmolLM2-135M); the allocation then came
  out worse than the uniform presets at every rate, and with F better at every rate (out of
  domain, 3.25 bpw: 1.152x fp32 against the preset's 1.201x; README). Data-free runs have no
  calibration tokens, and take F_ℓ = 1.

Measured on SmolLM2-135M (16 layers of blocks 0, 2, 15, 29; three configs from 2.5 to 3.25 bpw),
the Hessian-aware quantizer's actual loss is 1.03-1.25x the prediction, 2.1x on one layer (block 0's
o_proj), while tr(H) in place of tr(D) would be off by 2.4-21x: the prediction ranks layers well
enough to share bits between them.

The allocation is a multiple-choice knapsack: a Lagrange multiplier λ trades loss against bits
(each layer takes argmin_c loss_ℓ(c) + λ·bits_ℓ(c)); λ is bisected to the largest rate not above
the budget, then single-layer upgrades with the best loss drop per bit fill what is left. Bits
are counted exactly as stored (:func:`stored_bits`), and the budget is never exceeded.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ..format.config import MAX_CODE_BITS, PVQConfig
from ..format.weight import stored_bits
from ..ops import max_pulses
from .quantize import quantize_weight

GROUP_SIZES = (16, 8)       # the presets' D: the kernels' fast paths
GAIN_BITS = (1, 2, 3, 4)
CODE_BPW_RANGE = (1.0, 6.0)  # candidate configs' code bits per weight
_SAMPLE_SHAPE = (64, 1024)   # the Gaussian matrix d(c) is measured on (65k weights: ~10 ms a config)


@dataclass(frozen=True)
class LayerStats:
    """What the prediction needs of a layer: its shape, S = (‖W‖²/n)·tr(D) and the output
    sensitivity F (module doc)."""

    out_features: int
    in_features: int
    scale: float
    sensitivity: float = 1.0


def layer_stats(weight: torch.Tensor, hessian: torch.Tensor, seed: int = 0) -> LayerStats:
    """LayerStats of a weight [N, n] and its damped Hessian [n, n] (in the weight's basis; the
    rotation of seed ``seed`` is applied here, so tr(D) is that of the basis the codes live in)."""
    from ..format.weight import rotation_signs
    from .hessian import rotate_hessian

    N, n = weight.shape
    H = rotate_hessian(hessian.double(), rotation_signs(n, seed).to(hessian.device))
    chol = torch.linalg.cholesky(H)  # H = C Cᵀ = L diag(D) Lᵀ with D_jj = C_jj²
    trace_d = float(chol.diagonal().square().sum())
    energy = float(weight.double().square().sum()) / n
    return LayerStats(N, n, energy * trace_d)


def candidates(group_sizes: Iterable[int] = GROUP_SIZES, gain_bits: Iterable[int] = GAIN_BITS,
               code_bpw_range: tuple[float, float] = CODE_BPW_RANGE, seed: int = 0) -> list[PVQConfig]:
    """The configs with a group size and gain bits from the lists whose codes fit the kernels' 64
    bits and whose code rate lies in ``code_bpw_range``: for each code width, the largest K that
    fits it (at equal bits a larger K is a finer grid of directions, never a worse one)."""
    from ..ops import index_bits

    out = []
    for D in group_sizes:
        for gb in gain_bits:
            widest: dict[int, int] = {}  # code bits -> largest K
            for K in range(1, max_pulses(D) + 1):
                bits = index_bits(D, K) + gb
                if bits <= MAX_CODE_BITS:
                    widest[bits] = K
            for K in widest.values():
                c = PVQConfig(D=D, K=K, scale_bits=gb, rotate=True, seed=seed)
                if code_bpw_range[0] <= c.code_bpw <= code_bpw_range[1]:
                    out.append(c)
    return out


@functools.cache
def distortion(config: PVQConfig) -> float:
    """d(c): the config's relative squared error on a fixed Gaussian matrix (seeded, so repeatable;
    the seed of the config only picks the rotation, which Gaussian data does not notice)."""
    g = torch.Generator().manual_seed(1234)
    W = torch.randn(*_SAMPLE_SHAPE, generator=g)
    W_hat = quantize_weight(W, config).dequantize()
    return float((W - W_hat).square().sum() / W.square().sum())


def _hull(points: list[tuple[int, float, PVQConfig]]) -> list[tuple[int, float, PVQConfig]]:
    """The lower convex hull of (bits, loss) points, by increasing bits: the configs a Lagrangian
    choice can pick; dominated ones (more bits, no less loss) drop out."""
    hull: list[tuple[int, float, PVQConfig]] = []
    for p in sorted(points, key=lambda t: (t[0], t[1])):
        if hull and p[1] >= hull[-1][1]:
            continue
        while len(hull) >= 2:
            (b1, l1, _), (b2, l2, _) = hull[-2], hull[-1]
            if (l2 - l1) * (p[0] - b1) >= (p[1] - l1) * (b2 - b1):  # hull[-1] is above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


@dataclass
class Allocation:
    configs: dict[str, PVQConfig]
    bits: int
    weights: int
    predicted_loss: float
    sensitivity: dict[str, float]  # each layer's F (module doc), as the prediction used it

    @property
    def bpw(self) -> float:
        return self.bits / self.weights


def allocate(layers: Mapping[str, LayerStats], bpw: float, configs: Iterable[PVQConfig] | None = None) -> Allocation:
    """The config per layer that minimises Σ d(c)·S_ℓ·F_ℓ with a mean of at most ``bpw`` bits per
    weight (every stored bit counted)."""
    if not layers:
        raise ValueError("allocate: no layers")
    configs = list(configs) if configs is not None else candidates()
    per_layer: dict[str, list[tuple[int, float, PVQConfig]]] = {}
    for name, st in layers.items():
        pts = [(stored_bits(c, st.out_features, st.in_features), distortion(c) * st.scale * st.sensitivity, c)
               for c in configs if st.in_features % c.D == 0]
        if not pts:
            raise ValueError(f"allocate: no candidate config fits layer {name!r} (in_features {st.in_features})")
        per_layer[name] = _hull(pts)
    weights = sum(st.out_features * st.in_features for st in layers.values())
    budget = bpw * weights
    lowest = sum(h[0][0] for h in per_layer.values())
    highest = sum(h[-1][0] for h in per_layer.values())
    if not lowest <= budget <= highest:
        raise ValueError(f"allocate: {bpw} bpw is outside what the candidate configs reach for these layers "
                         f"({lowest / weights:.3f} to {highest / weights:.3f})")

    def choose(lam: float) -> dict[str, int]:
        return {n: min(range(len(h)), key=lambda i: h[i][1] + lam * h[i][0]) for n, h in per_layer.items()}

    def total(pick: dict[str, int]) -> int:
        return sum(per_layer[n][i][0] for n, i in pick.items())

    lo, hi = 0.0, 1.0
    while total(choose(hi)) > budget:  # large enough λ to fit the budget
        hi *= 4
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if total(choose(mid)) <= budget else (mid, hi)
        if hi - lo <= 1e-12 * hi:
            break
    pick = choose(hi)
    # Fill what λ's steps leave: the next hull point of a layer, best loss drop per bit first.
    while True:
        room = budget - total(pick)
        best, best_gain = None, 0.0
        for n, i in pick.items():
            h = per_layer[n]
            if i + 1 < len(h) and h[i + 1][0] - h[i][0] <= room:
                gain = (h[i][1] - h[i + 1][1]) / (h[i + 1][0] - h[i][0])
                if gain > best_gain:
                    best, best_gain = n, gain
        if best is None:
            break
        pick[best] += 1
    chosen = {n: per_layer[n][i][2] for n, i in pick.items()}
    loss = math.fsum(per_layer[n][i][1] for n, i in pick.items())
    return Allocation(chosen, total(pick), weights, loss, {n: st.sensitivity for n, st in layers.items()})
