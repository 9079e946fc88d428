"""Exact pyramid counts and the codec's limits, in Python integers."""

from __future__ import annotations

import functools

SUPPORTED_D = (1, 2, 4, 8, 16, 32)
MAX_K = 127
MAX_INDEX_BITS = 63


@functools.lru_cache(maxsize=None)
def _count_row(D: int, K: int) -> tuple[int, ...]:
    """V(D, k) for k = 0..K via V(D,k) = V(D-1,k) + V(D-1,k-1) + V(D,k-1)."""
    row = [1] + [0] * K  # D = 0
    for _ in range(D):
        new = [1] + [0] * K
        for k in range(1, K + 1):
            new[k] = row[k] + row[k - 1] + new[k - 1]
        row = new
    return tuple(row)


def pyramid_size(D: int, K: int) -> int:
    """V(D, K) = |{y in Z^D : sum |y_i| = K}|, exact for any D >= 0 and K >= 0."""
    if isinstance(D, bool) or not isinstance(D, int) or D < 0:
        raise ValueError(f"pyramid_size: D must be an int >= 0, got {D!r}")
    if isinstance(K, bool) or not isinstance(K, int) or K < 0:
        raise ValueError(f"pyramid_size: K must be an int >= 0, got {K!r}")
    if K == 0:
        return 1
    if D == 0:
        return 0
    return _count_row(D, K)[K]


def index_bits(D: int, K: int) -> int:
    """ceil(log2 V(D, K)): the width of a fixed-size index field."""
    return (pyramid_size(D, K) - 1).bit_length()


# Largest supported K per group size, fixed at import so that the checks below trace cleanly
# under torch.compile (no cached calls inside the graph).
_MAX_PULSES = {D: max(k for k in range(1, MAX_K + 1) if index_bits(D, k) <= MAX_INDEX_BITS) for D in SUPPORTED_D}


def max_pulses(D: int) -> int:
    """The largest K the codec supports at group size D."""
    check_limits(D, 1, "max_pulses")
    return _MAX_PULSES[D]


def check_limits(D: int, K: int, op: str) -> None:
    """Raise ValueError naming the limit unless (D, K) is a supported codec configuration."""
    if isinstance(D, bool) or not isinstance(D, int) or D not in SUPPORTED_D:
        raise ValueError(f"{op}: D must be one of {', '.join(map(str, SUPPORTED_D))}, got D={D!r}")
    if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= MAX_K:
        raise ValueError(f"{op}: K must be an int in [1, {MAX_K}], got K={K!r}")
    if K > _MAX_PULSES[D]:
        raise ValueError(
            f"{op}: ceil(log2 V(D,K)) must be <= {MAX_INDEX_BITS} so that an index fits int64, "
            f"but V({D},{K}) needs {index_bits(D, K)} bits; the largest K at D={D} is {_MAX_PULSES[D]}"
        )
