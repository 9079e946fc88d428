"""Bit allocation across layers (quantization/allocation.py): the predicted loss of a layer, the
convex hull of its choices, and the knapsack under a mean bits-per-weight budget."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pvq_cuda.format import PVQConfig, stored_bits
from pvq_cuda.ops import index_bits
from pvq_cuda.ops import max_pulses as K_limit
from pvq_cuda.quantization.allocation import (LayerStats, _hull, allocate, candidates, distortion,
                                              layer_stats)

SMALL = [PVQConfig(D=16, K=K, scale_bits=2) for K in (6, 12, 20, 30, 44)] + \
        [PVQConfig(D=8, K=K, scale_bits=3) for K in (4, 9, 16)]


def test_candidates_fit_the_kernels_and_the_range():
    cs = candidates(code_bpw_range=(2.0, 4.0))
    assert cs and all(2.0 <= c.code_bpw <= 4.0 and c.code_bits <= 64 for c in cs)
    assert {c.D for c in cs} == {8, 16} and {c.scale_bits for c in cs} == {1, 2, 3, 4}
    # one K per code width: the largest that fits it
    for (D, gb), group in itertools.groupby(sorted(cs, key=lambda c: (c.D, c.scale_bits, c.K)),
                                            key=lambda c: (c.D, c.scale_bits)):
        group = list(group)
        assert len({c.code_bits for c in group}) == len(group)
        for c in group:  # K + 1 would need a wider code
            assert K_limit(D) == c.K or index_bits(D, c.K + 1) + gb > c.code_bits


def test_distortion_falls_with_pulses_and_is_repeatable():
    ds = [distortion(PVQConfig(D=16, K=K, scale_bits=2)) for K in (4, 10, 20, 40)]
    assert all(a > b for a, b in zip(ds, ds[1:]))
    assert 0.2 < ds[0] < 0.5 and ds[-1] < 0.02  # relative squared error: ~1/3 at 1.1 bpw, ~1 % at 3.6
    distortion.cache_clear()
    assert distortion(PVQConfig(D=16, K=10, scale_bits=2)) == ds[1]


def test_layer_stats_scale_with_weight_energy_and_hessian():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 64, generator=g)
    X = torch.randn(500, 64, generator=g) * torch.linspace(0.2, 3.0, 64)
    H = X.T @ X / 500
    s = layer_stats(W, H)
    assert (s.out_features, s.in_features) == (24, 64)
    assert layer_stats(2 * W, H).scale == pytest.approx(4 * s.scale, rel=1e-9)
    assert layer_stats(W, 3 * H).scale == pytest.approx(3 * s.scale, rel=1e-9)
    # tr(D) ≤ tr(H): error feedback never does worse than rounding
    assert s.scale <= float(W.square().sum()) / 64 * float(H.trace()) * (1 + 1e-9)
    # white inputs (H = I, unchanged by the rotation): nothing to feed back, tr(D) = tr(H) = n
    assert layer_stats(W, torch.eye(64)).scale == pytest.approx(float(W.double().square().sum()), rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.floats(0.01, 10.0)), min_size=1, max_size=25))
def test_hull_is_the_lower_convex_hull(points):
    pts = [(b, l, None) for b, l in points]
    hull = _hull(pts)
    bits = [h[0] for h in hull]
    assert bits == sorted(set(bits))
    assert all(a[1] > b[1] for a, b in zip(hull, hull[1:]))  # more bits, strictly less loss
    for (b1, l1, _), (b2, l2, _), (b3, l3, _) in zip(hull, hull[1:], hull[2:]):
        assert (l2 - l1) * (b3 - b1) < (l3 - l1) * (b2 - b1)  # strictly convex
    for b, l, _ in pts:  # every point on or above the hull
        if b < bits[0]:
            continue
        if b >= bits[-1]:
            assert l >= hull[-1][1] - 1e-12
            continue
        k = max(i for i, x in enumerate(bits) if x <= b)
        (b1, l1, _), (b2, l2, _) = hull[k], hull[k + 1]
        assert l >= l1 + (l2 - l1) * (b - b1) / (b2 - b1) - 1e-9
    assert min(p[0] for p in pts) == bits[0]


def _random_layers(seed: int, n: int) -> dict[str, LayerStats]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 128), (128, 64), (32, 256), (96, 128)]
    return {f"l{i}": LayerStats(*shapes[i % len(shapes)], float(torch.rand(1, generator=g)) * 10 ** (i % 3))
            for i in range(n)}


def _exhaustive(layers, bpw, configs):
    weights = sum(s.out_features * s.in_features for s in layers.values())
    best = math.inf
    for combo in itertools.product(configs, repeat=len(layers)):
        bits = sum(stored_bits(c, s.out_features, s.in_features) for c, s in zip(combo, layers.values()))
        if bits <= bpw * weights:
            best = min(best, sum(distortion(c) * s.scale for c, s in zip(combo, layers.values())))
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bpw", [2.0, 2.6, 3.3])
def test_allocation_keeps_the_budget_and_is_near_the_optimum(seed, bpw):
    layers = _random_layers(seed, 4)
    a = allocate(layers, bpw, SMALL)
    assert a.bits <= bpw * a.weights and a.bpw <= bpw
    assert a.bits == sum(stored_bits(a.configs[n], s.out_features, s.in_features) for n, s in layers.items())
    assert a.predicted_loss == pytest.approx(sum(distortion(a.configs[n]) * s.scale for n, s in layers.items()))
    optimum = _exhaustive(layers, bpw, SMALL)
    assert optimum <= a.predicted_loss <= 1.1 * optimum
    uniform = [sum(distortion(c) * s.scale for s in layers.values()) for c in SMALL
               if sum(stored_bits(c, s.out_features, s.in_features) for s in layers.values()) <= bpw * a.weights]
    assert a.predicted_loss <= min(uniform) * (1 + 1e-12)


def test_more_bits_never_predict_more_loss():
    layers = _random_layers(7, 6)
    losses = [allocate(layers, r, SMALL).predicted_loss for r in (1.8, 2.2, 2.6, 3.0, 3.4, 3.8)]
    assert all(a >= b for a, b in zip(losses, losses[1:]))


def test_sensitive_layers_get_more_bits():
    layers = {"easy": LayerStats(64, 128, 1.0), "hard": LayerStats(64, 128, 100.0)}
    a = allocate(layers, 2.6, SMALL)
    assert a.configs["hard"].code_bpw > a.configs["easy"].code_bpw


def test_layers_whose_output_matters_more_get_more_bits():
    """Equal layer losses, one weighed 100x by the output's sensitivity: the allocation follows F
    alone, the same way it follows S, and reports the F it used."""
    layers = {"quiet": LayerStats(64, 128, 1.0, 1.0), "loud": LayerStats(64, 128, 1.0, 100.0)}
    a = allocate(layers, 2.6, SMALL)
    assert a.configs["loud"].code_bpw > a.configs["quiet"].code_bpw
    assert a.sensitivity == {"quiet": 1.0, "loud": 100.0}
    folded = allocate({"quiet": LayerStats(64, 128, 1.0), "loud": LayerStats(64, 128, 100.0)}, 2.6, SMALL)
    assert folded.configs == a.configs and folded.predicted_loss == pytest.approx(a.predicted_loss)


def test_bad_budgets_and_layers_are_refused():
    layers = _random_layers(0, 2)
    with pytest.raises(ValueError, match="outside what the candidate configs reach"):
        allocate(layers, 0.5, SMALL)
    with pytest.raises(ValueError, match="outside what the candidate configs reach"):
        allocate(layers, 9.0, SMALL)
    with pytest.raises(ValueError, match="no layers"):
        allocate({}, 3.0, SMALL)
    with pytest.raises(ValueError, match="no candidate config fits layer 'odd'"):
        allocate({"odd": LayerStats(8, 12, 1.0)}, 3.0, SMALL)
