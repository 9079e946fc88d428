"""The codec ops: search (projection onto the pyramid), encode and decode (paper.md §2–§3), and the
quantizer's metric pulse moves."""

from __future__ import annotations

import torch

from .checks import FLOAT_DTYPES, INT_DTYPES, check_last_dim, check_tensor
from .counting import check_limits


def search(x: torch.Tensor, K: int) -> torch.Tensor:
    """Nearest point of the pyramid P(D, K) in angle to each row of ``x[..., D]``.

    Args:
        x: float32, float16 or bfloat16 tensor of shape ``[..., D]``, D in {1, 2, 4, 8, 16, 32};
            finite values only.
        K: pulses per group, ``1 <= K <= 127`` (and ``ceil(log2 V(D,K)) <= 63``).

    Returns:
        int8 pulses ``y`` of shape ``[..., D]`` with ``sum |y| == K`` per row and the signs of ``x``.
        Greedy placement plus pulse-move refinement; an all-zero row gives ``K`` on its first axis.
    """
    check_tensor("pvq_cuda.search", "x", x, FLOAT_DTYPES)
    check_limits(check_last_dim("pvq_cuda.search", "x", x), K, "pvq_cuda.search")
    return torch.ops.pvq_cuda.search.default(x, K)


def encode(pulses: torch.Tensor, K: int) -> torch.Tensor:
    """Split-order index of each pulse vector (paper.md §2; the on-disk format).

    Args:
        pulses: integer tensor of shape ``[..., D]`` with ``sum |y| == K`` in every row.
        K: pulses per group.

    Returns:
        int64 tensor of shape ``[...]`` with values in ``[0, V(D, K))``.
    """
    check_tensor("pvq_cuda.encode", "pulses", pulses, INT_DTYPES)
    check_limits(check_last_dim("pvq_cuda.encode", "pulses", pulses), K, "pvq_cuda.encode")
    return torch.ops.pvq_cuda.encode.default(pulses, K)


def decode(index: torch.Tensor, D: int, K: int) -> torch.Tensor:
    """Pulse vectors of split-order indices: the inverse of :func:`encode`.

    Args:
        index: int64 (or int32) tensor of any shape, values in ``[0, V(D, K))``.
        D, K: group size and pulses.

    Returns:
        int8 tensor of shape ``[*index.shape, D]``.
    """
    check_tensor("pvq_cuda.decode", "index", index, (torch.int64, torch.int32))
    check_limits(D, K, "pvq_cuda.decode")
    return torch.ops.pvq_cuda.decode.default(index.long(), D, K)


def metric_moves(pulses: torch.Tensor, w_metric: torch.Tensor, y_metric: torch.Tensor, fit_num: torch.Tensor,
                 fit_den: torch.Tensor, w_sign: torch.Tensor,
                 metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the quantizer's metric pulse search, for each row: the single pulse move i -> j
    that most raises the fit (y·M·wᵀ)² / (y·M·yᵀ) of pulses y to target w under metric M.

    Args (float64, CPU; ``[rows, D]`` unless said): ``pulses`` y; ``w_metric`` w·M; ``y_metric``
    y·M; ``fit_num`` y·(w·M) and ``fit_den`` y·(y·M), ``[rows]``; ``w_sign`` sign(w) as ±1 (the
    sign a pulse takes on a coordinate y does not use yet); ``metric`` M, ``[D, D]``, symmetric.

    Returns:
        (better, moved): bool ``[rows]``, whether the best move raises the fit by more than a
        relative 1e-12, and float64 ``[rows, D]``, y with that move made (y itself where not better).
        Ties go to the first move in (i, j) order. The scores round exactly as
        ``quantization/quantize.py``'s torch scoring, the path on other devices (csrc/codec/metric_moves.h).
    """
    args = (pulses, w_metric, y_metric, fit_num, fit_den, w_sign, metric)
    _check_metric_moves(args)
    return torch.ops.pvq_cuda._metric_moves.default(*args)


def _check_metric_moves(args) -> None:
    """Float64 dense tensors on the CPU (or meta); the shapes are checked by the kernel."""
    for name, t in zip(("pulses", "w_metric", "y_metric", "fit_num", "fit_den", "w_sign", "metric"), args):
        check_tensor("pvq_cuda.metric_moves", name, t, (torch.float64,))
        if t.device.type == "cuda":
            raise ValueError(f"pvq_cuda.metric_moves: {name} must be on the CPU (the op has only a CPU kernel; "
                             f"quantize_weight scores moves with torch ops on other devices), got {t.device}")


@torch.library.register_fake("pvq_cuda::_metric_moves")
def _metric_moves_fake(pulses, w_metric, y_metric, fit_num, fit_den, w_sign, metric):
    _check_metric_moves((pulses, w_metric, y_metric, fit_num, fit_den, w_sign, metric))
    return pulses.new_empty(pulses.shape[:1], dtype=torch.bool), torch.empty_like(pulses)


@torch.library.register_fake("pvq_cuda::search")
def _search_fake(x, K):
    check_tensor("pvq_cuda.search", "x", x, FLOAT_DTYPES)
    check_limits(check_last_dim("pvq_cuda.search", "x", x), K, "pvq_cuda.search")
    return x.new_empty(x.shape, dtype=torch.int8)


@torch.library.register_fake("pvq_cuda::encode")
def _encode_fake(pulses, K):
    check_tensor("pvq_cuda.encode", "pulses", pulses, INT_DTYPES)
    check_limits(check_last_dim("pvq_cuda.encode", "pulses", pulses), K, "pvq_cuda.encode")
    return pulses.new_empty(pulses.shape[:-1], dtype=torch.int64)


@torch.library.register_fake("pvq_cuda::decode")
def _decode_fake(index, D, K):
    check_tensor("pvq_cuda.decode", "index", index, (torch.int64,))
    check_limits(D, K, "pvq_cuda.decode")
    return index.new_empty((*index.shape, D), dtype=torch.int8)
