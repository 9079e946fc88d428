"""quantize_weight: PVQ of one layer's weight, data-free or Hessian-aware (paper.md §4–§6)."""

from __future__ import annotations

import torch

from ..format.config import DEFAULT_PRESET, PVQConfig
from ..format.gain import beta_gain_levels
from ..format.weight import PVQWeight, rotation_signs
from ..ops import encode, hadamard_transform, metric_moves, pack_codes, search
from .error_feedback import error_feedback, inverse_cholesky_upper
from .hessian import rotate_hessian

METRIC_SEARCH_PASSES = 4  # pulse-move passes under the block metric; gains flatten out after ~3
# Off the CPU (where ops.metric_moves scores in registers) the metric search builds its [rows, D, D]
# float64 move scores with torch ops, at most this many at once (128 MB a temporary): a GPU runs few
# large kernels, and memory stays bounded on wide layers (28,672 rows at D = 32 take two chunks).
# Chunks of 2^17 were the fastest for this path on a 2-core CPU, before the native op replaced it.
_MOVE_SCORES = 2 ** 24


def quantize_weight(W: torch.Tensor, config: PVQConfig | None = None, hessian: torch.Tensor | None = None, *,
                    act_order: bool = False, metric_search: bool = False, refine_passes: int = 0) -> PVQWeight:
    """PVQ of a weight ``[out_features, in_features]`` into a packed :class:`PVQWeight`.

    Data-free (``hessian=None``): rotate (if ``config.rotate``), pick each group's direction by
    pyramid search and code its least-squares gain, relative to the rotated row norm, with the
    Beta levels.

    Hessian-aware (``hessian`` = the layer's input Hessian, float ``[in, in]``, e.g. from
    :class:`HessianCollector`): the Hessian is rotated with the weights, groups of D columns are
    quantized in order with GPTQ-style error feedback (``act_order``: groups by decreasing
    Hessian diagonal), and each group's gain is the Hessian-optimal s* = uᵀMw / uᵀMu under its
    block metric M, coded with the same levels. ``metric_search`` also moves pulses while that
    lowers the block-metric error (slower, usually better). ``refine_passes`` > 0 then revisits
    every group that many times, re-coding it toward its best value given all the others under
    the full Hessian and keeping the new code where the loss drops (coordinate descent; see
    :func:`_refine_groups`).

    Either way the fp16 row scale is finally refit: the row norm times the one factor per row
    that minimizes the (H-weighted) error of the coded row. Runs on W's device.
    """
    config = config if config is not None else PVQConfig.preset(DEFAULT_PRESET)
    if not isinstance(config, PVQConfig):
        raise TypeError(f"quantize_weight: config must be a PVQConfig, got {type(config).__name__}")
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ValueError(f"quantize_weight: W must be a 2-D tensor [out_features, in_features], got "
                         f"{getattr(W, 'shape', type(W).__name__)}")
    if not W.dtype.is_floating_point:
        raise TypeError(f"quantize_weight: W must be floating point, got {W.dtype}")
    N, n = W.shape
    D, K = config.D, config.K
    if N < 1 or n < 1 or n % D:
        raise ValueError(f"quantize_weight: in_features ({n}) must be a positive multiple of D={D}")
    if not torch.isfinite(W).all():
        raise ValueError("quantize_weight: W must be finite (it holds NaN or Inf)")
    if hessian is not None:
        if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (n, n):
            raise ValueError(f"quantize_weight: hessian must be a [{n}, {n}] tensor (in_features squared), got "
                             f"{getattr(hessian, 'shape', type(hessian).__name__)}")
        if not torch.isfinite(hessian).all():
            raise ValueError("quantize_weight: hessian must be finite (it holds NaN or Inf)")
    elif act_order or metric_search or refine_passes:
        raise ValueError("quantize_weight: act_order, metric_search and refine_passes need a hessian")
    check_refine_passes(refine_passes, "quantize_weight")

    w = W.detach().float()
    signs = rotation_signs(n, config.seed).to(w.device) if config.rotate else None
    if signs is not None:
        w = hadamard_transform(w, signs)
    norms = w.norm(dim=1)
    if (norms > torch.finfo(torch.float16).max).any():
        raise ValueError("quantize_weight: a row norm exceeds the float16 range of the row scales")
    scale = norms.half().float().unsqueeze(-1)  # [N, 1]: the fp16 row scales the codes are chosen against
    levels = torch.tensor(beta_gain_levels(D, n, config.scale_bits), dtype=torch.float32, device=w.device)
    midpoints = (levels[1:] + levels[:-1]) / 2

    if hessian is None:
        groups = w.reshape(N, n // D, D)
        pulses = search(groups, K)
        direction = _unit(pulses)
        gain = torch.where(scale > 0, (groups * direction).sum(-1) / scale.clamp_min(1e-30), torch.zeros(()))
        index, gain_code = encode(pulses, K), torch.bucketize(gain, midpoints)
        q = (scale.unsqueeze(-1) * levels[gain_code].unsqueeze(-1) * direction).reshape(N, n)
        refit = _row_refit(w, q, None)
    else:
        index, gain_code, refit = _hessian_aware_codes(w, hessian, signs, scale, levels, midpoints, config,
                                                       act_order, metric_search, refine_passes)
    row_scale = (scale.squeeze(-1) * refit).clamp_max(torch.finfo(torch.float16).max).half()
    codes = pack_codes(index.cpu(), gain_code.cpu(), config.index_bits, config.scale_bits)
    return PVQWeight(codes.to(w.device), row_scale, levels, N, n, config, validate=False, signs=signs)


def check_refine_passes(value, caller: str) -> None:
    """Raise ValueError naming ``caller`` unless ``value`` is a valid ``refine_passes`` (an int >= 0)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{caller}: refine_passes must be an int >= 0, got {value!r}")


def _unit(pulses: torch.Tensor) -> torch.Tensor:
    p = pulses.float()
    return p * torch.rsqrt(p.square().sum(-1, keepdim=True))


def _hessian_aware_codes(w, hessian, signs, scale, levels, midpoints, config, act_order, metric_search,
                         refine_passes):
    N, n = w.shape
    D, K = config.D, config.K
    H = hessian.to(w.device, torch.float32)
    if signs is not None:
        H = rotate_hessian(H, signs)
    G = n // D
    order = torch.arange(G, device=w.device)
    if act_order:  # most sensitive groups first, while the most columns remain to absorb their error
        order = torch.argsort(H.diagonal().reshape(G, D).sum(-1), descending=True, stable=True)
        cols = (order[:, None] * D + torch.arange(D, device=w.device)).reshape(-1)
        w, H = w[:, cols], H[cols][:, cols]
    U = inverse_cholesky_upper(H).float()
    index = torch.empty(N, G, dtype=torch.int64, device=w.device)
    gain_code = torch.empty(N, G, dtype=torch.int64, device=w.device)
    safe_scale = scale.clamp_min(1e-30)

    def code_group(t: torch.Tensor, M: torch.Tensor):
        """The best code of target columns t under metric M: (pulses, gain code, reconstruction)."""
        pulses = search(t, K)
        if metric_search:
            pulses = _metric_search(pulses, t, M)
        u = _unit(pulses)
        uM = u @ M
        s = (uM * t).sum(-1, keepdim=True) / ((uM * u).sum(-1, keepdim=True) * safe_scale)
        code = torch.bucketize(torch.where(scale > 0, s, torch.zeros(())).squeeze(-1), midpoints)
        return pulses, code, scale * levels[code].unsqueeze(-1) * u

    def quantize_block(j: int, w_b: torch.Tensor, u_bb: torch.Tensor) -> torch.Tensor:
        # The error of this block costs e M eᵀ with M = (U_bbᵀ U_bb)⁻¹ once the rest is corrected.
        u_inv = torch.linalg.solve_triangular(u_bb, torch.eye(D, device=w.device), upper=True)
        pulses, code, q = code_group(w_b, u_inv @ u_inv.T)
        g = int(order[j // D])
        index[:, g] = encode(pulses, K)
        gain_code[:, g] = code
        return q

    Q = error_feedback(w, U, D, quantize_block)
    if refine_passes:
        Q = _refine_groups(w, H, Q, D, refine_passes, code_group, order, index, gain_code, K)
    return index, gain_code, _row_refit(w, Q, H)


def _refine_groups(w, H, Q, D, passes, code_group, order, index, gain_code, K):
    """Coordinate descent over the groups after error feedback, under the full loss (w−Q)H(w−Q)ᵀ.

    Error feedback codes each group once, against columns later groups have not yet corrected.
    With every other group fixed, the loss is smallest when group B's error equals
    −E_rest H_rest,B H_BB⁻¹, i.e. when Q_B hits the target Q_B + G_B H_BB⁻¹ (G = (w−Q)H). Each
    group is re-coded toward that target under the metric H_BB and the new code is kept in the
    rows where the loss drops, so the loss never rises; G follows by a rank-D update. On
    SmolLM2's layers two passes lower the H-weighted loss by 6 % at 3.25 bpw (8 % at 2.25), for
    O(out·in²) work per pass, about what error feedback costs."""
    n = w.shape[1]
    Hd = H.double()
    G = (w - Q).double() @ Hd
    Q = Q.clone()
    for _ in range(passes):
        for j in range(0, n, D):
            b = slice(j, j + D)
            H_bb = Hd[b, b]
            target = Q[:, b].double() + torch.linalg.solve(H_bb, G[:, b].T).T
            pulses, code, q = code_group(target.float(), H_bb.float())
            d = (Q[:, b] - q).double()  # the change of the error w_B − Q_B
            better = ((d @ H_bb) * d).sum(-1) + 2 * (d * G[:, b]).sum(-1) < 0
            rows = better.nonzero().squeeze(1)  # the re-coded rows: only there do Q and G change
            if not len(rows):
                continue
            Q[:, b] = torch.where(better[:, None], q, Q[:, b])
            G[rows] += d[rows] @ Hd[b, :]
            g = int(order[j // D])
            index[:, g] = torch.where(better, encode(pulses, K), index[:, g])
            gain_code[:, g] = torch.where(better, code, gain_code[:, g])
    return Q


def _row_refit(w: torch.Tensor, q: torch.Tensor, H: torch.Tensor | None) -> torch.Tensor:
    """Per-row factor a minimizing (w − a·q) H (w − a·q)ᵀ (H = I when None): a = qHwᵀ / qHqᵀ.

    The row scale was fixed before any group was coded; once all the gains are quantized (and,
    with error feedback, the columns moved), one least-squares factor per row takes back the part
    of the error that lies along the row's own reconstruction. It lowers the H-weighted loss by
    1–4 % on SmolLM2's layers at no cost in bits (the factor folds into the fp16 row scale)."""
    qh = q if H is None else q @ H
    num, den = (qh * w).sum(1), (qh * q).sum(1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.ones(()))


def _metric_search(pulses: torch.Tensor, w: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Hill-climb single pulse moves i -> j that raise (yMwᵀ)²/(yMyᵀ), the fit of direction y to w
    under M with its best gain. Signs follow w on newly used coordinates.

    A move changes y by δ = −sign(y_i)·e_i + σ_j·e_j, so every move's score follows from yMw, yMy,
    Mw, My and M's entries: O(D²) per row and pass instead of O(D³) for rescoring each candidate
    vector (16x less work at D=16, where this dominated the Hessian-aware run)."""
    N, D = pulses.shape
    y = pulses.double()
    Md = M.double()
    Mw_all = w.double() @ Md  # [N, D]; M is symmetric
    sgn_all = torch.where(w < 0, -1.0, 1.0).double()
    # A row whose pulses did not move in a pass scores the same next pass and stays put, so each
    # pass rescans only the rows the last one moved: after the first pass that is 2-4 % of them.
    active = torch.arange(N, device=w.device)
    for _ in range(METRIC_SEARCH_PASSES):
        per_call = len(active) if _native_moves(y) else max(1, _MOVE_SCORES // (D * D))
        moves = [_best_moves(y[r], Mw_all[r], sgn_all[r], Md) for r in active.split(per_call)]
        better = torch.cat([b for b, _ in moves])
        if not better.any():
            break
        active = active[better]
        y[active] = torch.cat([m for _, m in moves])[better]
    return y.to(torch.int8)


def _native_moves(y: torch.Tensor) -> bool:
    """Whether the native op scores the moves (``ops.metric_moves``: the CPU) or torch ops do."""
    return y.device.type == "cpu"


def _best_moves(y: torch.Tensor, Mw: torch.Tensor, sgn_w: torch.Tensor, Md: torch.Tensor):
    """For rows y (float64 pulses) with Mw = w M and sgn_w = sign(w): whether each row's best single
    pulse move i -> j raises its fit, and the rows with that move made. Both paths round every
    score alike, so the codes do not depend on which one ran (tests/test_quantize_hessian.py)."""
    My = y @ Md
    num0, den0 = (y * Mw).sum(-1), (y * My).sum(-1)
    if _native_moves(y):
        return metric_moves(y, Mw, My, num0, den0, sgn_w, Md)
    return _scored_moves(y, Mw, My, num0, den0, sgn_w, Md)


def _scored_moves(y, Mw, My, num0, den0, sgn_w, Md):
    """The torch path of :func:`_best_moves` (csrc/codec/metric_moves.h has the same expressions).

    The [rows, D, D] scores are built in place to keep memory traffic down. Each row's score comes
    from that row alone, so scoring the rows in chunks gives the same codes as all at once."""
    n, D = y.shape
    d_src = -torch.sign(y)                              # [n, D]: the pulse leaving i
    d_dst = torch.where(y == 0, sgn_w, torch.sign(y))   # [n, D]: the pulse arriving at j
    # Fit after the move: num = (y+δ)Mwᵀ, den = (y+δ)M(y+δ)ᵀ = yMyᵀ + 2δMyᵀ + δMδᵀ.
    num = (num0[:, None] + d_src * Mw)[:, :, None] + (d_dst * Mw)[:, None, :]
    den = (den0[:, None] + 2 * d_src * My)[:, :, None] + (2 * d_dst * My)[:, None, :]
    diag = Md.diagonal()
    den.add_(diag[None, :, None]).add_(diag[None, None, :])
    den.add_(torch.mul(d_src[:, :, None], d_dst[:, None, :]).mul_(2 * Md))
    score = num.square_().div_(den.clamp_min_(1e-300))
    no_move = (y == 0)[:, :, None] | torch.eye(D, dtype=torch.bool, device=y.device)  # y_i = 0 or i = j
    score.masked_fill_(no_move, -1.0)
    best = num0.square() / den0.clamp_min(1e-300)
    top, arg = score.reshape(n, D * D).max(dim=1)
    better = top > best * (1 + 1e-12)
    i, j = arg // D, arg % D
    rows = torch.arange(n, device=y.device)
    moved = y.clone()
    moved[rows, i] += d_src[rows, i]
    moved[rows, j] += d_dst[rows, j]
    return better, moved
