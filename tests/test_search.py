"""Search quality: against brute force over the whole pyramid, and against plain greedy."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pvq_cuda
import reference_codec as ref

BRUTE = [(2, 5), (2, 17), (4, 3), (4, 7), (4, 12), (8, 2), (8, 4), (8, 6), (16, 2), (16, 3)]


def _cosines(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y = y.double()
    return (x.double() * y).sum(-1) / (x.double().norm(dim=-1) * y.norm(dim=-1))


@pytest.mark.parametrize("D,K", BRUTE)
def test_search_against_brute_force(D, K):
    gen = torch.Generator().manual_seed(1000 * D + K)
    x = torch.randn(400, D, generator=gen)
    x[::4] *= torch.rand(100, D, generator=gen) ** 3  # uneven magnitudes: harder cases
    points = pvq_cuda.decode(torch.arange(pvq_cuda.pyramid_size(D, K)), D, K).double()
    xn = x.double() / x.double().norm(dim=1, keepdim=True)
    best = (xn @ (points / points.norm(dim=1, keepdim=True)).T).max(dim=1).values
    got = _cosines(x, pvq_cuda.search(x, K))
    ratio = got / best
    misses = (got < best - 1e-12).float().mean().item()
    print(f"\nsearch D={D} K={K}: misses the best point in {100 * misses:.2f}% of rows, "
          f"mean cos ratio {ratio.mean():.6f}, worst {ratio.min():.6f}")
    assert ratio.mean() >= 0.999
    assert ratio.min() >= 0.98


@pytest.mark.parametrize("D,K", [(4, 11), (8, 6), (8, 16), (8, 36), (16, 30), (32, 21)])
def test_search_at_least_as_good_as_greedy(D, K):
    gen = torch.Generator().manual_seed(D + K)
    x = torch.randn(300, D, generator=gen)
    ours = _cosines(x, pvq_cuda.search(x, K))
    greedy = _cosines(x, torch.tensor([ref.greedy_search(r, K) for r in x.double().tolist()]))
    assert torch.all(ours >= greedy - 1e-6)
    print(f"\nD={D} K={K}: better than greedy in {(ours > greedy + 1e-9).float().mean() * 100:.1f}% of rows")


@settings(max_examples=80, deadline=None)
@given(
    D=st.sampled_from(pvq_cuda.SUPPORTED_D),
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_search_properties(D, data, dtype):
    K = data.draw(st.integers(1, pvq_cuda.max_pulses(D)))
    values = data.draw(st.lists(st.floats(-1e4, 1e4, width=16), min_size=D, max_size=D))
    x = torch.tensor([values], dtype=dtype)
    y = pvq_cuda.search(x, K)
    assert y.dtype == torch.int8 and y.shape == x.shape
    assert int(y.long().abs().sum()) == K
    assert torch.all((y == 0) | (torch.sign(y.float()) == torch.sign(x.float())) | (x == 0))
    # Codes survive the trip through the index.
    assert torch.equal(pvq_cuda.decode(pvq_cuda.encode(y, K), D, K), y)


def test_search_edge_rows():
    y = pvq_cuda.search(torch.zeros(2, 8), 5)
    assert y.tolist() == [[5, 0, 0, 0, 0, 0, 0, 0]] * 2
    y = pvq_cuda.search(torch.tensor([[0.0, -3.0, 0.0, 0.0]]), 9)
    assert y.tolist() == [[0, -9, 0, 0]]
    tiny = torch.full((1, 8), 1e-40)  # subnormal
    assert int(pvq_cuda.search(tiny, 16).long().abs().sum()) == 16
    big = torch.tensor([[3e38, -3e38, 1.0, 0.0]])
    assert pvq_cuda.search(big, 4).tolist() == [[2, -2, 0, 0]]


def test_search_scale_invariant_and_shapes():
    x = torch.randn(3, 7, 16)
    y = pvq_cuda.search(x, 12)
    assert torch.equal(pvq_cuda.search(x * 2.0**10, 12), y)  # power-of-two scaling is exact
    assert torch.equal(pvq_cuda.search(x.transpose(0, 1), 12), y.transpose(0, 1))
    assert pvq_cuda.search(x[:0], 12).shape == (0, 7, 16)
