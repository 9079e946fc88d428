"""CUDA kernels against the CPU reference, bit for bit, on fresh random inputs (GPU only)."""

import pytest
import torch

import pvq_cuda
from conftest import requires_cuda

pytestmark = requires_cuda

CASES = [(D, K) for D in pvq_cuda.SUPPORTED_D for K in sorted({1, 2, 5, 6, 11, 12, 16, 30, 36, 127, pvq_cuda.max_pulses(D)})
         if K <= pvq_cuda.max_pulses(D)]


@pytest.mark.parametrize("D,K", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_search_matches_cpu(D, K, dtype):
    x = torch.randn(20_000, D, dtype=dtype)
    x[::7] *= torch.rand(x[::7].shape).to(dtype) ** 4  # uneven magnitudes
    x[5] = 0
    assert torch.equal(pvq_cuda.search(x.cuda(), K).cpu(), pvq_cuda.search(x, K))


@pytest.mark.parametrize("D,K", CASES)
def test_decode_and_encode_match_cpu(D, K):
    V = pvq_cuda.pyramid_size(D, K)
    index = torch.randint(0, V, (50_000,), dtype=torch.int64) if V < 2**62 else \
        (torch.rand(50_000, dtype=torch.float64) * float(V)).long().clamp_(0, V - 1)
    index[:2] = torch.tensor([0, V - 1])
    y_cpu = pvq_cuda.decode(index, D, K)
    y_gpu = pvq_cuda.decode(index.cuda(), D, K)
    assert torch.equal(y_gpu.cpu(), y_cpu)
    assert torch.equal(pvq_cuda.encode(y_gpu, K).cpu(), index)


def test_decode_every_leaf_size_path():
    # K = 16 at D=8 puts up to 16 pulses in a 4-leaf: leaves above the shared-memory prefix (k > 11)
    # take the 2+2 split path; make sure many of them occur and agree with the CPU.
    y = pvq_cuda.search(torch.randn(200_000, 8) * torch.tensor([4.0, 3, 2, 1, 0.1, 0.1, 0.1, 0.1]), 16)
    assert (y[:, :4].long().abs().sum(1) > 11).sum() > 1000
    index = pvq_cuda.encode(y, 16)
    assert torch.equal(pvq_cuda.decode(index.cuda(), 8, 16).cpu(), y)


def test_bad_data_errors_match_cpu():
    i = torch.randint(0, pvq_cuda.pyramid_size(8, 16), (1000,))
    i[777] = -5
    with pytest.raises(ValueError, match="element 777"):
        pvq_cuda.decode(i.cuda(), 8, 16)
    x = torch.randn(100, 8, device="cuda")
    x[42, 3] = float("nan")
    with pytest.raises(ValueError, match="group 42"):
        pvq_cuda.search(x, 16)


def test_cuda_graph_capture_and_sentinels():
    V = pvq_cuda.pyramid_size(8, 16)
    index = torch.randint(0, V, (4096,), device="cuda")
    pvq_cuda.decode(index, 8, 16)  # warm up (uploads the tables)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = pvq_cuda.decode(index, 8, 16)
        back = pvq_cuda.encode(y, 16)
    fresh = torch.randint(0, V, (4096,), device="cuda")
    index.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(back, fresh)
    index[10] = V  # bad data during replay: no exception possible, documented sentinels instead
    graph.replay()
    assert torch.all(y[10] == 0) and back[10].item() == -1


def test_other_device_index():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    index = torch.randint(0, 1000, (100,), device="cuda:1")
    assert torch.equal(pvq_cuda.decode(index, 8, 6).cpu(), pvq_cuda.decode(index.cpu(), 8, 6))
