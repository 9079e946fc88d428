"""GPTQ / LDLQ error feedback with column blocks of any width (paper.md §6).

Quantizing column block B of W to Q_B leaves the error E = (W_B − Q_B) U_BB⁻¹, where U is the
upper Cholesky factor of H⁻¹; pushing E·U_{B,rest} into the columns not yet quantized makes the
final error small under the Hessian metric tr((W−Q) H (W−Q)ᵀ). Width 1 is GPTQ; width D quantizes
a PVQ group at a time (BlockLDLQ). Updates are lazy: inside a 128-column super-block they are
applied at once, to the rest of the matrix once per super-block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SUPER_BLOCK = 128


def inverse_cholesky_upper(H: torch.Tensor, max_tries: int = 5) -> torch.Tensor:
    """U upper-triangular with H⁻¹ = Uᵀ U (float64 internally for stability).

    One Cholesky factorization and one triangular inverse: with J the order-reversing permutation
    and J H J = L Lᵀ, U = J L⁻¹ J is upper triangular with a positive diagonal and
    Uᵀ U = J L⁻ᵀ L⁻¹ J = H⁻¹, so it is the unique such factor. Forming H⁻¹ and factoring it again,
    as GPTQ does, took 1.65x as long at n = 1536 on this project's 2-core CPU
    (`bench/bench_error_feedback.py`).

    A Hessian that is not positive definite (dead inputs, too few tokens) gets more damping,
    10x per try starting at 1e-6·mean(diag); the last failure raises ValueError.
    """
    Hd = H.double().flip(0, 1)
    mean_diag = float(Hd.diagonal().mean().clamp_min(1e-12))
    for attempt in range(max_tries + 1):
        A = Hd
        if attempt:  # damping only when a factorization failed: each full pass costs ~5 ms at n = 1536
            A = Hd.clone()
            A.diagonal().add_(1e-6 * 10 ** (attempt - 1) * mean_diag)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            Linv = _lower_triangular_inverse(L)
            if bool(torch.isfinite(Linv).all()):
                return Linv.flip(0, 1)
    raise ValueError("error feedback: the Hessian is not positive definite even after damping; "
                     "check it for NaN/Inf or collect more calibration tokens")


def _lower_triangular_inverse(L: torch.Tensor) -> torch.Tensor:
    """L⁻¹ for lower-triangular L, by halves: [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹ B A⁻¹, C⁻¹]].

    n³/3 multiply-adds, nearly all in matrix products; a triangular solve against the identity
    does three times that arithmetic (it does not know the right-hand side is triangular)."""
    out = torch.zeros_like(L)
    _invert_into(L, out)
    return out


def _invert_into(L: torch.Tensor, out: torch.Tensor) -> None:
    """Write L⁻¹ into ``out`` (a view of zeros): its diagonal blocks, then the block below them."""
    n = L.shape[0]
    if n <= 128:
        out.copy_(torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False))
        return
    h = n // 2
    _invert_into(L[:h, :h], out[:h, :h])
    _invert_into(L[h:, h:], out[h:, h:])
    out[h:, :h] = (out[h:, h:] @ L[h:, :h]).neg_() @ out[:h, :h]


def error_feedback(W: torch.Tensor, U: torch.Tensor, width: int,
                   quantize_block: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor], *,
                   group: int = 0,
                   start_group: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Quantize W [rows, n] column block by column block with error feedback; returns Q.

    ``quantize_block(j, W_B, U_BB)`` gets the start column j, the current (feedback-updated)
    columns W[:, j:j+width] and the diagonal block of U, and returns their quantized values.

    With ``start_group``, ``start_group(j, W_G)`` is called on entering each group of ``group``
    columns (a multiple of width; the last group may be shorter), before its first block is
    quantized, with the group's current columns W[:, j:j+group] (a new tensor, every earlier
    block's feedback applied, including updates still pending past the super-block): GPTQ fits
    its group scales there.
    """
    n = W.shape[1]
    if n % width or SUPER_BLOCK % width:
        raise ValueError(f"error feedback: n={n} and {SUPER_BLOCK} must be multiples of width={width}")
    if start_group is not None and (group <= 0 or group % width):
        raise ValueError(f"error feedback: group={group} must be a positive multiple of width={width}")
    U = U.to(W.dtype)
    if width == 1:
        return _error_feedback_columns(W, U, quantize_block, group, start_group)
    return _error_feedback_blocks(W, U, width, quantize_block, group, start_group)


def _error_feedback_blocks(W: torch.Tensor, U: torch.Tensor, width: int,
                           quantize_block: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor], group: int,
                           start_group: Callable[[int, torch.Tensor], None] | None) -> torch.Tensor:
    """:func:`error_feedback`'s loop for any width (arguments already checked, U in W's dtype)."""
    n = W.shape[1]
    W = W.clone()
    Q = torch.empty_like(W)
    for b0 in range(0, n, SUPER_BLOCK):
        b1 = min(b0 + SUPER_BLOCK, n)
        err = torch.empty(W.shape[0], b1 - b0, dtype=W.dtype, device=W.device)
        for j in range(b0, b1, width):
            if start_group is not None and j % group == 0:
                g1 = min(j + group, n)
                cur = W[:, j:g1].clone()
                if g1 > b1:  # columns past this super-block still lack its lazy update from b0..j
                    cur[:, b1 - j:] -= err[:, :j - b0] @ U[b0:j, b1:g1]
                start_group(j, cur)
            k = j + width
            U_bb = U[j:k, j:k]
            q = quantize_block(j, W[:, j:k], U_bb)
            Q[:, j:k] = q
            e = torch.linalg.solve_triangular(U_bb, W[:, j:k] - q, upper=True, left=False)
            err[:, j - b0:k - b0] = e
            W[:, k:b1] -= e @ U[j:k, k:b1]
        W[:, b1:] -= err @ U[b0:b1, b1:]
    return Q


def _error_feedback_columns(W: torch.Tensor, U: torch.Tensor,
                            quantize_block: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor], group: int,
                            start_group: Callable[[int, torch.Tensor], None] | None) -> torch.Tensor:
    """:func:`error_feedback` at width 1 (GPTQ), the same steps with fewer, cheaper torch calls.

    GPTQ runs this loop once per input column (300k columns for the default model's GPTQ pair),
    so each call's overhead counts. The work runs on Wᵀ, where a column is a contiguous row and a
    rank-1 update is one ``addr_``; the 1×1 triangular solve is a division by U[j, j]. It takes
    about half the time of the any-width loop, and agrees with it to float32 rounding."""
    n = W.shape[1]
    Wt = W.t().contiguous()
    Qt = torch.empty_like(Wt)
    diag = U.diagonal().tolist()
    for b0 in range(0, n, SUPER_BLOCK):
        b1 = min(b0 + SUPER_BLOCK, n)
        err = torch.empty(b1 - b0, W.shape[0], dtype=W.dtype, device=W.device)
        for j in range(b0, b1):
            if start_group is not None and j % group == 0:
                g1 = min(j + group, n)
                cur = Wt[j:g1].clone()
                if g1 > b1:  # columns past this super-block still lack its lazy update from b0..j
                    cur[b1 - j:] -= U[b0:j, b1:g1].t() @ err[:j - b0]
                start_group(j, cur.t())
            w = Wt[j]
            q = quantize_block(j, w.unsqueeze(1), U[j:j + 1, j:j + 1]).squeeze(1)
            Qt[j] = q
            e = torch.sub(w, q, out=err[j - b0]).div_(diag[j])
            if j + 1 < b1:
                Wt[j + 1:b1].addr_(U[j, j + 1:b1], e, alpha=-1)
        if b1 < n:
            Wt[b1:].addmm_(U[b0:b1, b1:].t(), err, alpha=-1)
    return Qt.t().contiguous()


def hessian_loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W−Q) H (W−Q)ᵀ) / tr(W H Wᵀ): the relative output error on the calibration inputs."""
    d = (W - Q).double()
    Wd, Hd = W.double(), H.double()
    return float(((d @ Hd) * d).sum() / ((Wd @ Hd) * Wd).sum().clamp_min(1e-30))
