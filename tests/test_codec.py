"""The split-order codec: bijection, round trips, and agreement with the pure-Python reference."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pvq_cuda
import reference_codec as ref

SMALL = [(D, K) for D in pvq_cuda.SUPPORTED_D for K in range(1, 128) if pvq_cuda.pyramid_size(D, K) <= 200_000]


def test_small_cases_cover_every_group_size():
    assert {D for D, _ in SMALL} == set(pvq_cuda.SUPPORTED_D)
    assert len(SMALL) > 300


@pytest.mark.parametrize("D,K", SMALL)
def test_exhaustive_bijection(D, K, device):
    V = pvq_cuda.pyramid_size(D, K)
    index = torch.arange(V, device=device)
    y = pvq_cuda.decode(index, D, K)
    assert y.shape == (V, D) and y.dtype == torch.int8
    assert torch.all(y.long().abs().sum(1) == K)  # every code is a pyramid point ...
    assert torch.unique(y, dim=0).shape[0] == V  # ... each one once, so all V points appear
    assert torch.equal(pvq_cuda.encode(y, K), index)  # and encode inverts decode


@pytest.mark.parametrize("D,K", [(D, K) for D, K in SMALL if K % 7 == 1 or pvq_cuda.pyramid_size(D, K) < 300])
def test_order_matches_reference(D, K):
    """The frozen on-disk order: index i decodes to the reference's i-th point."""
    V = pvq_cuda.pyramid_size(D, K)
    rng = random.Random(D * 1000 + K)
    index = sorted({rng.randrange(V) for _ in range(200)} | {0, V - 1})
    y = pvq_cuda.decode(torch.tensor(index), D, K)
    assert y.tolist() == [ref.decode(i, D, K) for i in index]


def _random_indices(V: int, n: int, rng: random.Random) -> list[int]:
    return [0, V - 1] + [rng.randrange(V) for _ in range(n - 2)]


@pytest.mark.parametrize("D", pvq_cuda.SUPPORTED_D)
def test_random_round_trips_up_to_the_limit(D, device):
    kmax = pvq_cuda.max_pulses(D)
    rng = random.Random(D)
    for K in sorted({1, 2, 3, kmax // 3, kmax // 2, kmax - 1, kmax} - {0}):
        V = pvq_cuda.pyramid_size(D, K)
        index = torch.tensor(_random_indices(V, 4000, rng), device=device)
        y = pvq_cuda.decode(index, D, K)
        assert torch.all(y.long().abs().sum(1) == K)
        assert torch.equal(pvq_cuda.encode(y, K), index)
        for i, row in zip(index[:25].tolist(), y[:25].tolist()):
            assert row == ref.decode(i, D, K)
            assert ref.encode(row) == i


@settings(max_examples=60, deadline=None)
@given(D=st.sampled_from(pvq_cuda.SUPPORTED_D), data=st.data())
def test_random_pulse_vectors_round_trip(D, data):
    K = data.draw(st.integers(1, pvq_cuda.max_pulses(D)))
    # A random composition of K into D signed parts.
    cuts = sorted(data.draw(st.lists(st.integers(0, K), min_size=D - 1, max_size=D - 1)))
    parts = [b - a for a, b in zip([0] + cuts, cuts + [K])]
    signs = data.draw(st.lists(st.sampled_from([-1, 1]), min_size=D, max_size=D))
    y = torch.tensor([[p * s for p, s in zip(parts, signs)]], dtype=torch.int8)
    i = pvq_cuda.encode(y, K)
    assert int(i) == ref.encode(y[0].tolist())
    assert torch.equal(pvq_cuda.decode(i, D, K), y)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_encode_accepts_integer_dtypes(dtype):
    y = pvq_cuda.decode(torch.randint(0, pvq_cuda.pyramid_size(8, 16), (64,)), 8, 16)
    assert torch.equal(pvq_cuda.encode(y.to(dtype), 16), pvq_cuda.encode(y, 16))


def test_shapes_and_views(device):
    index = torch.randint(0, pvq_cuda.pyramid_size(8, 16), (3, 5, 7), device=device)
    y = pvq_cuda.decode(index, 8, 16)
    assert y.shape == (3, 5, 7, 8)
    assert torch.equal(pvq_cuda.encode(y, 16), index)
    # Non-contiguous inputs give the same answer as contiguous ones.
    assert torch.equal(pvq_cuda.decode(index.transpose(0, 2), 8, 16), y.transpose(0, 2))
    assert torch.equal(pvq_cuda.encode(y.transpose(0, 1), 16), index.transpose(0, 1))
    # Scalars and empty tensors.
    assert pvq_cuda.decode(index[0, 0, 0], 8, 16).shape == (8,)
    assert pvq_cuda.decode(index[:0], 8, 16).shape == (0, 5, 7, 8)
    assert pvq_cuda.encode(y[:, :0], 16).shape == (3, 0, 7)
    assert pvq_cuda.decode(index.int(), 8, 16).equal(y)  # int32 indices are widened
