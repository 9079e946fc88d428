"""Bad input gets a clear exception naming the argument, from the wrappers and the raw ops alike."""

import pytest
import torch

import pvq_cuda

ops = torch.ops.pvq_cuda


def _both(fn_wrapper, fn_op, exc, match):
    with pytest.raises(exc, match=match):
        fn_wrapper()
    with pytest.raises(exc, match=match):
        fn_op()


def test_wrong_dtype(device):
    x = torch.randn(4, 8, device=device)
    _both(lambda: pvq_cuda.search(x.double(), 4), lambda: ops.search(x.double(), 4), TypeError, "x must .*float")
    _both(lambda: pvq_cuda.search(x.long(), 4), lambda: ops.search(x.long(), 4), TypeError, "x must")
    y = pvq_cuda.search(x, 4)
    _both(lambda: pvq_cuda.encode(y.float(), 4), lambda: ops.encode(y.float(), 4), TypeError, "pulses must")
    i = pvq_cuda.encode(y, 4)
    with pytest.raises(TypeError, match="index must"):
        pvq_cuda.decode(i.float(), 8, 4)
    with pytest.raises(TypeError, match="index must be int64"):
        ops.decode(i.int(), 8, 4)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        pvq_cuda.search([[1.0] * 8], 4)


@pytest.mark.parametrize("D", [0, 3, 5, 12, 64])
def test_unsupported_group_size(D, device):
    x = torch.randn(2, D, device=device)
    _both(lambda: pvq_cuda.search(x, 4), lambda: ops.search(x, 4), ValueError, "D must be one of")
    p = torch.zeros(2, D, dtype=torch.int8, device=device)
    _both(lambda: pvq_cuda.encode(p, 4), lambda: ops.encode(p, 4), ValueError, "D must be one of")
    i = torch.zeros(2, dtype=torch.int64, device=device)
    _both(lambda: pvq_cuda.decode(i, D, 4), lambda: ops.decode(i, D, 4), ValueError, "D must be one of")


@pytest.mark.parametrize("D,K,match", [(8, 0, "K must be"), (8, 128, "K must be"), (8, -3, "K must be"),
                                       (16, 57, "63"), (32, 22, "63")])
def test_k_out_of_range(D, K, match, device):
    x = torch.randn(2, D, device=device)
    _both(lambda: pvq_cuda.search(x, K), lambda: ops.search(x, K), ValueError, match)
    i = torch.zeros(2, dtype=torch.int64, device=device)
    _both(lambda: pvq_cuda.decode(i, D, K), lambda: ops.decode(i, D, K), ValueError, match)


def test_wrong_shape(device):
    s = torch.tensor(1.0, device=device)
    _both(lambda: pvq_cuda.search(s, 4), lambda: ops.search(s, 4), ValueError, "shape \\[..., D\\]")
    p = torch.tensor(1, dtype=torch.int8, device=device)
    _both(lambda: pvq_cuda.encode(p, 1), lambda: ops.encode(p, 1), ValueError, "shape \\[..., D\\]")


@pytest.mark.parametrize("bad", [-1, -(2**63), "V", 2**62])
def test_index_out_of_range(bad, device):
    V = pvq_cuda.pyramid_size(8, 16)
    i = torch.randint(0, V, (5, 7), device=device)
    i[3, 2] = V if bad == "V" else bad
    _both(lambda: pvq_cuda.decode(i, 8, 16), lambda: ops.decode(i, 8, 16), ValueError, "element 23 .*must be in|must be in.*element 23")


def test_index_out_of_range_large_D(device):
    V = pvq_cuda.pyramid_size(32, 21)
    i = torch.tensor([0, V, V - 1], device=device)
    with pytest.raises(ValueError, match=f"element 1 \\(flattened\\) is {V}"):
        pvq_cuda.decode(i, 32, 21)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nonfinite_x(value, dtype, device):
    x = torch.randn(6, 8, device=device, dtype=dtype)
    x[4, 5] = value
    _both(lambda: pvq_cuda.search(x, 16), lambda: ops.search(x, 16), ValueError, "group 4 .*NaN or Inf")


def test_pulses_with_wrong_k(device):
    y = pvq_cuda.search(torch.randn(9, 8, device=device), 16)
    y[6, 0] += 1 if y[6, 0] >= 0 else -1
    _both(lambda: pvq_cuda.encode(y, 16), lambda: ops.encode(y, 16), ValueError, "row 6 .* sum \\|y\\| = 17")
    _both(lambda: pvq_cuda.encode(y, 15), lambda: ops.encode(y, 15), ValueError, "row 0 ")


def test_pulses_that_would_wrap_in_int8(device):
    y = torch.zeros(3, 4, dtype=torch.int64, device=device)
    y[:, 0] = 4
    y[1, 1] = 256  # 256 wraps to 0 in int8: must be caught before narrowing
    y[1, 0] = 4
    with pytest.raises(ValueError, match="row 1 "):
        pvq_cuda.encode(y, 4)
    y8 = torch.zeros(2, 2, dtype=torch.int8, device=device)
    y8[0] = torch.tensor([-128, 1])
    y8[1] = torch.tensor([127, 0])
    with pytest.raises(ValueError, match="row 0 "):
        pvq_cuda.encode(y8, 127)


def test_unsupported_device_or_layout():
    with pytest.raises(ValueError, match="dense"):
        pvq_cuda.decode(torch.zeros(3, dtype=torch.int64).to_sparse(), 8, 4)
