"""Scalar baselines in the same framework as PVQ: round-to-nearest and GPTQ (issue 5 item 3).

Every baseline returns ``(W_hat, bpw)``: the dequantized weight (float32 ``[N, n]`` on W's device)
and the bits per weight, counted as PVQ's bpw is: every stored bit divided by N·n.

Storage format (what the bit count assumes)
    Asymmetric uniform grid per group of ``group`` consecutive input columns of one row:
    ``w_hat = q · scale + minimum`` with ``q`` a ``bits``-bit unsigned integer (0 .. 2^bits − 1),
    ``scale = (max − min) / (2^bits − 1)`` and ``minimum`` both stored as fp16. That is
    ``bits + 32/group`` bpw (INT4 g128 = 4.25, INT3 g128 = 3.25, INT2 g128 = 2.25), the nominal
    rates of the PVQ presets (pvq-2.25/3.25/4.25), so the comparisons are at equal bits.

    n must be a multiple of ``group`` unless ``ragged=True``: then the last group of each row is
    shorter (GPTQ's reference code and the AutoGPTQ layout, ceil(n/group) scales per row) and is
    paid for in full: bpw = bits + 32·ceil(n/group)/n. SmolLM2's n = 576 at group 128 is 4 groups of
    128 and one of 64: INT4 = 4.278 bpw. The :data:`BASELINES` registry uses ``ragged=True``.

    The zero point is an fp16 minimum, not the b-bit integer zero point of the GPTQ reference code
    (``w_hat = (q − z)·scale``, ``bits + (16 + bits)/group`` bpw, e.g. 4.156 at INT4 g128): an fp16
    minimum puts the grid on the group's range instead of rounding its offset to a whole step
    (never a weaker baseline for it), and it is paid for in full (16 bits, not b).
    The reconstruction always uses the fp16-rounded values that would be stored.

GPTQ (Frantar et al., 2023)
    Column-by-column error feedback under the layer Hessian H = (2/N) Σ x xᵀ: the width-1 case of
    :func:`pvq_cuda.error_feedback.error_feedback` (lazy 128-column super-blocks), with the group
    grid fitted from the current (feedback-updated) weights when the loop enters each group.
    Callers pass an already damped Hessian (``hessian.damp_hessian``, λ = 0.01 by GPTQ habit); one
    that is still not positive definite gets more damping from ``inverse_cholesky_upper``.

    ``act_order=True`` quantizes the columns in descending diag(H) order with *static groups*: all
    group grids are fitted up front from the original weights, groups being contiguous columns
    of the stored (original) order. Grids fitted on entering each group in act-order would tie
    each group to a scattered set of columns, so the stored layout would need a per-column group
    index (n·log2(n/group) more bits) or an input permutation at run time; static groups keep the
    plain layout, and the bpw, of the non-act-order case. The price: the grids do not see the
    feedback updates (values pushed past a group's range are clamped).

    ``rotate=True`` is QuIP/QuaRot-style incoherence, the same rotation PVQ uses (paper.md §6):
    with R = H_n·S/√n (S = ``rotation_signs(n, seed)``), GPTQ runs on W' = W Rᵀ (rows rotated by
    ``hadamard_transform(W, signs)``) under H' = R H Rᵀ, and the result is brought back to the
    original basis, W_hat = W'_hat R = ``hadamard_transform(W'_hat) * signs`` (H_n is symmetric).
    A deployment keeps W'_hat and rotates the inputs instead; either way the 64-bit seed is stored
    and counted: bpw = bits + 32/group + 64/(N·n).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..format.weight import rotation_signs
from ..ops import hadamard_split, hadamard_transform
from .error_feedback import error_feedback, inverse_cholesky_upper
from .hessian import rotate_hessian

MIN_BITS, MAX_BITS = 2, 8
SCALE_BITS = 16    # fp16 scale per group
MINIMUM_BITS = 16  # fp16 minimum (zero point) per group
SEED_BITS = 64     # the rotation seed, once per layer
_FP16_MAX = 65504.0
_TINY = 1e-30      # divisor guard for a group whose fp16 step is 0 (constant or sub-fp16 range)


def baseline_bpw(bits: int, group: int = 128, shape: tuple[int, int] | None = None, rotate: bool = False) -> float:
    """Bits per weight of the asymmetric group format for a weight of ``shape`` = (N, n).

    bits + 32·ceil(n/group)/n (= bits + 32/group when group divides n; that is also the value
    without a shape), plus 64/(N·n) for the seed of a rotated layer (which needs the shape).
    """
    if shape is None:
        if rotate:
            raise ValueError("baseline_bpw: a rotated layer needs the shape (N, n) to count its seed")
        return bits + (SCALE_BITS + MINIMUM_BITS) / group
    rows, n = shape
    bpw = bits + (SCALE_BITS + MINIMUM_BITS) * -(-n // group) / n
    if rotate:
        bpw += SEED_BITS / (rows * n)
    return bpw


def _check_bits(fn: str, bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{fn}: bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


def _check_weight(fn: str, W, group, ragged: bool) -> tuple[int, int]:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{fn}: W must be a torch.Tensor, got {type(W).__name__}")
    if not W.is_floating_point():
        raise TypeError(f"{fn}: W must be a floating-point tensor, got {str(W.dtype).removeprefix('torch.')}")
    if W.dim() != 2 or W.shape[0] == 0 or W.shape[1] == 0:
        raise ValueError(f"{fn}: W must be a non-empty 2-D [out_features, in_features] matrix, "
                         f"got shape {list(W.shape)}")
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0:
        raise ValueError(f"{fn}: group must be a positive integer, got {group!r}")
    rows, n = W.shape
    if n % group and not ragged:
        raise ValueError(f"{fn}: in_features n={n} must be a multiple of group={group} "
                         "(or pass ragged=True for a shorter last group)")
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{fn}: W contains NaN or Inf")
    if float(W.abs().max()) > _FP16_MAX:
        raise ValueError(f"{fn}: |W| exceeds the fp16 range ({_FP16_MAX}) of the stored group minimum and scale")
    return rows, n


def _check_hessian(fn: str, H, n: int) -> None:
    if not isinstance(H, torch.Tensor):
        raise TypeError(f"{fn}: H must be the layer's [n, n] Hessian tensor, got {type(H).__name__}")
    if not H.is_floating_point():
        raise TypeError(f"{fn}: H must be a floating-point tensor, got {str(H.dtype).removeprefix('torch.')}")
    if H.dim() != 2 or H.shape[0] != n or H.shape[1] != n:
        raise ValueError(f"{fn}: H must have shape [n, n] = [{n}, {n}] for W with n={n} columns, got {list(H.shape)}")
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"{fn}: H contains NaN or Inf")


def _fit_grid(Wg: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(minimum, scale) of each group along the last dim of Wg, fp16-rounded (as stored), as float32."""
    lo = Wg.amin(-1, keepdim=True).clamp(-_FP16_MAX, _FP16_MAX).half().float()
    step = ((Wg.amax(-1, keepdim=True) - lo) / (2**bits - 1)).clamp(0, _FP16_MAX).half().float()
    return lo, step


def _column_grids(Wf: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(minimum, scale) of every column's group, each float32 [N, n]; the last group may be short."""
    rows, n = Wf.shape
    full = n - n % group
    parts = []
    if full:
        lo, step = _fit_grid(Wf[:, :full].reshape(rows, full // group, group), bits)
        parts.append((lo.expand(-1, -1, group).reshape(rows, full), step.expand(-1, -1, group).reshape(rows, full)))
    if full < n:
        lo, step = _fit_grid(Wf[:, full:], bits)
        parts.append((lo.expand(-1, n - full), step.expand(-1, n - full)))
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)


def _round_to_grid(x: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """q · step + lo with q = round((x − lo)/step) clamped to 0 .. 2^bits − 1."""
    q = ((x - lo) / step.clamp_min(_TINY)).round_().clamp_(0, 2**bits - 1)
    return q * step + lo


def rtn_quantize(W: torch.Tensor, bits: int, group: int = 128, ragged: bool = False) -> tuple[torch.Tensor, float]:
    """Round-to-nearest, asymmetric min/max per group of ``group`` input columns.

    Args:
        W: ``[N, n]`` floating-point weight, n a multiple of ``group`` (unless ``ragged``), finite.
        bits: 2..8.
        group: consecutive input columns sharing one fp16 scale and one fp16 minimum.
        ragged: allow a shorter last group when ``group`` does not divide n (counted in bpw).

    Returns:
        ``(W_hat, bpw)``: float32 ``[N, n]`` on W's device, and ``bits + 32/group``
        (``bits + 32·ceil(n/group)/n`` ragged).
    """
    fn = "rtn_quantize"
    _check_bits(fn, bits)
    rows, n = _check_weight(fn, W, group, ragged)
    Wf = W.detach().float()
    lo, step = _column_grids(Wf, bits, group)
    return _round_to_grid(Wf, lo, step, bits), baseline_bpw(bits, group, (rows, n))


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group: int = 128, rotate: bool = False,
                  seed: int = 0, act_order: bool = False, ragged: bool = False) -> tuple[torch.Tensor, float]:
    """GPTQ with asymmetric group grids; optionally act-order (static groups) and Hadamard-rotated.

    Args:
        W: ``[N, n]`` floating-point weight, n a multiple of ``group`` (unless ``ragged``), finite.
        H: ``[n, n]`` damped layer Hessian (2/N) Σ x xᵀ + λ·mean(diag)·I, finite; moved to W's device.
        bits: 2..8.
        group: consecutive input columns (of the stored basis: the rotated one with ``rotate``)
            sharing one fp16 scale and one fp16 minimum.
        rotate: quantize W' = W Rᵀ under R H Rᵀ (R = Hadamard·diag(rotation_signs(n, seed))/√n);
            n must be a supported Hadamard size (``hadamard_split(n)``).
        seed: the rotation seed, 0 .. 2^64 − 1 (counted as 64 stored bits).
        act_order: quantize columns in descending diag(H) order, with static groups.
        ragged: allow a shorter last group when ``group`` does not divide n (counted in bpw).

    Returns:
        ``(W_hat, bpw)``: float32 ``[N, n]`` on W's device in the original basis, and
        ``bits + 32/group`` (``bits + 32·ceil(n/group)/n`` ragged; ``+ 64/(N·n)`` rotated).
        The work runs on W's device.
    """
    fn = "gptq_quantize"
    _check_bits(fn, bits)
    rows, n = _check_weight(fn, W, group, ragged)
    _check_hessian(fn, H, n)
    Wf = W.detach().float().contiguous()
    Hf = H.detach().to(device=W.device, dtype=torch.float32)
    signs = None
    if rotate:
        if hadamard_split(n) is None:
            raise ValueError(f"{fn}: rotate=True needs a Hadamard size n = m·2^k with m in "
                             f"(1, 12, 20, 28, 36, 52, 60), n <= 32768; got n={n}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"{fn}: seed must be an integer in 0 .. 2^64 - 1, got {seed!r}")
        signs = rotation_signs(n, seed).to(W.device)
        Wf = hadamard_transform(Wf, signs)
        Hf = rotate_hessian(Hf, signs)

    if act_order:
        perm = torch.argsort(Hf.diagonal(), descending=True, stable=True)
        lo, step = _column_grids(Wf, bits, group)  # static groups, in the stored order
        lo, step = lo[:, perm], step[:, perm]      # the grid of the j-th quantized column is column j

        def quantize_column(j: int, w: torch.Tensor, _u: torch.Tensor) -> torch.Tensor:
            return _round_to_grid(w, lo[:, j:j + 1], step[:, j:j + 1], bits)

        Qp = error_feedback(Wf[:, perm], inverse_cholesky_upper(Hf[perm][:, perm]), 1, quantize_column)
        Q = torch.empty_like(Qp)
        Q[:, perm] = Qp
    else:
        grid: list[torch.Tensor] = []

        def start_group(_j: int, cols: torch.Tensor) -> None:
            grid[:] = _fit_grid(cols, bits)  # from the current, feedback-updated columns

        def quantize_column(_j: int, w: torch.Tensor, _u: torch.Tensor) -> torch.Tensor:
            return _round_to_grid(w, grid[0], grid[1], bits)

        Q = error_feedback(Wf, inverse_cholesky_upper(Hf), 1, quantize_column, group=group, start_group=start_group)

    if rotate:
        Q = hadamard_transform(Q) * signs  # W'_hat R, R = H_n S/√n with H_n symmetric
    return Q, baseline_bpw(bits, group, (rows, n), rotate)


Baseline = Callable[[torch.Tensor, "torch.Tensor | None"], "tuple[torch.Tensor, float]"]


def _rtn(bits: int) -> Baseline:
    def run(W: torch.Tensor, H: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        return rtn_quantize(W, bits, ragged=True)

    run.__name__ = f"rtn_int{bits}"
    run.__doc__ = (f"Round-to-nearest INT{bits}, group 128 (the last one shorter where 128 does not divide n), "
                   "asymmetric (fp16 scale + fp16 minimum); H is ignored.")
    run.needs_hessian = False
    return run


def _gptq(bits: int, rotate: bool, act_order: bool) -> Baseline:
    def run(W: torch.Tensor, H: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        if H is None:
            raise ValueError(f"{run.__name__}: GPTQ needs the layer's damped Hessian H, got None")
        return gptq_quantize(W, H, bits, rotate=rotate, act_order=act_order, ragged=True)

    tag = "-rot" * rotate + "-ao" * act_order
    run.__name__ = f"gptq{tag.replace('-', '_')}_int{bits}"
    run.__doc__ = (f"GPTQ INT{bits}, group 128 (the last one shorter where 128 does not divide n), "
                   "asymmetric (fp16 scale + fp16 minimum)"
                   + (", Hadamard-rotated (seed 0)" if rotate else "")
                   + (", act-order with static groups" if act_order else "") + "; needs H.")
    run.needs_hessian = True
    return run


BASELINE_BITS = (2, 3, 4, 8)

#: Named scalar baselines, each ``fn(W, H_or_None) -> (W_hat, bpw)``, all group 128 with
#: ``ragged=True`` (so they run on SmolLM2's n = 576 layers too):
#:
#: - ``rtn-int{b}``: :func:`rtn_quantize` (H ignored, may be None);
#: - ``gptq-int{b}``: :func:`gptq_quantize` in the natural column order;
#: - ``gptq-ao-int{b}``: with act-order (static groups);
#: - ``gptq-rot-int{b}``: on Hadamard-rotated weights (seed 0), W_hat in the original basis;
#: - ``gptq-rot-ao-int{b}``: both;
#:
#: for b in :data:`BASELINE_BITS` (2, 3, 4, 8). Each function has ``needs_hessian`` (bool) and a
#: docstring; the GPTQ ones raise ValueError when H is None.
BASELINES: dict[str, Baseline] = {}
for _b in BASELINE_BITS:
    BASELINES[f"rtn-int{_b}"] = _rtn(_b)
for _rot in (False, True):
    for _ao in (False, True):
        for _b in BASELINE_BITS:
            BASELINES[f"gptq{'-rot' * _rot}{'-ao' * _ao}-int{_b}"] = _gptq(_b, _rot, _ao)
del _b, _rot, _ao

__all__ = ["BASELINES", "BASELINE_BITS", "baseline_bpw", "gptq_quantize", "rtn_quantize"]
