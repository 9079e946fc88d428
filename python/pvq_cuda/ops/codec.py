"""The codec ops: search (projection onto the pyramid), encode and decode (paper.md §2–§3)."""

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
