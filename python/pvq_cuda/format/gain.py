"""Data-free gain levels (paper.md §4).

After a random rotation, a group B of D of a row's n weights carries the fraction
f = |w_B|^2 / |w_row|^2 ~ Beta(D/2, (n-D)/2) of the row's energy. The 2^bits levels are Lloyd–Max
optimal for sqrt(f) under that law, so they depend on (D, n, bits) only and every decoder can
share one small table per layer.
"""

from __future__ import annotations

import functools
import math

import numpy as np

_GRID = 1 << 17          # cells of the discretized density; levels move < 1e-6 beyond this
_ITERATIONS = 300        # Lloyd iterations; from the high-rate start 3,000 give the same levels at bits <= 8
_TAIL = 14.0             # sqrt(n f) ~ chi_D: beyond sqrt(D) + 14 the mass is below 1e-40


@functools.lru_cache(maxsize=64)
def _levels(D: int, n: int, bits: int, high_rate: bool) -> tuple[float, ...]:
    count = 1 << bits
    if n == D:  # one group per row: it holds all the energy
        return (1.0,) * count
    # Density of t = sqrt(f): p(t) ~ t^(D-1) (1 - t^2)^((n-D)/2 - 1), in logs so that n = 65,536
    # neither underflows nor overflows.
    hi = min(1.0, (math.sqrt(D) + _TAIL) / math.sqrt(n))
    t = (np.arange(_GRID) + 0.5) * (hi / _GRID)
    logp = (D - 1) * np.log(t) + ((n - D) / 2 - 1) * np.log1p(-t * t)
    w = np.exp(logp - logp.max())
    w /= w.sum()
    # Where Lloyd starts. ``high_rate``: at the quantiles of p^(1/3), the optimal quantizer's point
    # density at high rate (Panter–Dite). From p's own quantiles Lloyd creeps toward the tails so
    # slowly that at 7 bits (activations, D=1..2) 300 iterations ended 3–4.5 dB of SNR short of the
    # optimum. At the weights' 1–4 bits both starts end within 0.02 dB of each other, but not at the
    # same levels (up to 0.5 % apart), and that moves codes: the default job's 3.25-bpw model went
    # from 1.143x to 1.158x fp32 out of domain, about what another rotation seed does. Weights keep
    # the start every weight result was measured with; activations take the high-rate one.
    if high_rate:
        density = np.exp((logp - logp.max()) / 3)
        cdf = np.cumsum(density / density.sum())
    else:
        cdf = np.cumsum(w)
    levels = t[np.searchsorted(cdf, (np.arange(count) + 0.5) / count)]
    for _ in range(_ITERATIONS):
        cells = np.searchsorted((levels[1:] + levels[:-1]) / 2, t)
        mass = np.bincount(cells, weights=w, minlength=count)
        moment = np.bincount(cells, weights=w * t, minlength=count)
        levels = np.where(mass > 0, moment / np.maximum(mass, 1e-300), levels)
    return tuple(float(v) for v in np.sort(levels))


def beta_gain_levels(D: int, n: int, bits: int, *, high_rate_start: bool = False) -> np.ndarray:
    """Lloyd–Max levels for sqrt(f), f ~ Beta(D/2, (n-D)/2), as float64 in increasing order.

    Args:
        D: group size (>= 1).
        n: row length, a multiple of D (up to at least 65,536).
        bits: gain bits per group, 0..8 (0 gives the single optimal level).
        high_rate_start: start Lloyd at the high-rate point density p^(1/3) (activations; needed
            for the optimum at 6-8 bits) instead of at p's quantiles (weights, the default).
    """
    if not (isinstance(D, int) and D >= 1):
        raise ValueError(f"beta_gain_levels: D must be an int >= 1, got {D!r}")
    if not (isinstance(n, int) and n >= D and n % D == 0):
        raise ValueError(f"beta_gain_levels: n must be a multiple of D={D}, got n={n!r}")
    if not (isinstance(bits, int) and 0 <= bits <= 8):
        raise ValueError(f"beta_gain_levels: bits must be an int in [0, 8], got {bits!r}")
    return np.array(_levels(D, n, bits, bool(high_rate_start)))
