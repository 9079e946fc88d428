"""An independent pure-Python model of the split-order codec and of greedy search (paper.md §2–§3).

Exact Python integers, no tables, no shared code with csrc/: the C++ and CUDA kernels are checked
against this, so a shared mistake in the tables cannot hide.
"""

from __future__ import annotations

import math
from functools import lru_cache


@lru_cache(maxsize=None)
def V(n: int, k: int) -> int:
    if k == 0:
        return 1
    if n == 0:
        return 0
    return V(n - 1, k) + V(n - 1, k - 1) + V(n, k - 1)


def closed_form(n: int, k: int) -> int:
    if k == 0:
        return 1
    return sum(2**i * math.comb(n, i) * math.comb(k - 1, i - 1) for i in range(1, min(n, k) + 1))


def offset(n: int, k: int, k1: int) -> int:
    h = n // 2
    return sum(V(h, j) * V(h, k - j) for j in range(k1))


def encode(y: list[int]) -> int:
    n, k = len(y), sum(abs(v) for v in y)
    if n == 1:
        return 1 if y[0] < 0 else 0
    h = n // 2
    k1 = sum(abs(v) for v in y[:h])
    return offset(n, k, k1) + encode(y[:h]) * V(h, k - k1) + encode(y[h:])


def decode(i: int, n: int, k: int) -> list[int]:
    if n == 1:
        return [0] if k == 0 else [-k if i else k]
    h = n // 2
    k1 = 0
    while offset(n, k, k1 + 1) <= i:
        k1 += 1
    q, r = divmod(i - offset(n, k, k1), V(h, k - k1))
    return decode(q, h, k1) + decode(r, h, k - k1)


def greedy_search(x: list[float], K: int) -> list[int]:
    """The classic greedy of paper.md §3 (projection, then one pulse at a time), in floats."""
    a = [abs(v) for v in x]
    s = sum(a)
    if s == 0:
        y = [0] * len(x)
        y[0] = K
        return y
    y = [math.floor(K * v / s) for v in a]
    while sum(y) < K:
        xy, yy = sum(p * q for p, q in zip(a, y)), sum(q * q for q in y)
        j = max(range(len(a)), key=lambda j: (xy + a[j]) ** 2 / (yy + 2 * y[j] + 1))
        y[j] += 1
    return [-q if v < 0 else q for q, v in zip(y, x)]
