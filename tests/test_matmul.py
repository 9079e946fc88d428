"""pvq_matmul against the dense reference x @ dequantize(W)^T, and PVQLinear."""

import pytest
import torch
from torch import nn

import pvq_cuda
from conftest import HAS_CUDA, requires_cuda
from pvq_cuda import PVQConfig, PVQLinear, quantize_weight

# Tolerances relative to max|reference|: fp32 accumulation differs only in order; 16-bit inputs and
# outputs are rounded once each (and the rotated input once more).
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _check(y, ref, dtype):
    err = (y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)
    assert err <= TOL[dtype], f"relative error {err:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("shape,preset", [((96, 64), "pvq-3.25"), ((40, 576), "pvq-2.25"), ((72, 48), "pvq-4.25"),
                                          ((64, 128), "pvq16-3.25")])
@pytest.mark.parametrize("rotate", [False, True])
def test_matmul_matches_dense_reference(dtype, M, shape, preset, rotate, device):
    N, n = shape
    q = quantize_weight(torch.randn(N, n, generator=torch.Generator().manual_seed(N)).to(device),
                        PVQConfig.preset(preset, rotate=rotate))
    x = torch.randn(M, n, generator=torch.Generator().manual_seed(M)).to(device, dtype)
    bias = torch.randn(N).to(device, dtype)
    ref = x.double() @ q.dequantize().double().T + bias.double()
    _check(pvq_cuda.pvq_matmul(x, q, bias), ref.float(), dtype)
    _check(pvq_cuda.pvq_matmul(x, q), (ref - bias.double()).float(), dtype)


def test_matmul_leading_dims_and_empty(device):
    q = quantize_weight(torch.randn(33, 64).to(device))
    x = torch.randn(2, 3, 64, device=device)
    y = pvq_cuda.pvq_matmul(x, q)
    assert y.shape == (2, 3, 33)
    torch.testing.assert_close(y, pvq_cuda.pvq_matmul(x.reshape(6, 64), q).reshape(2, 3, 33))
    assert pvq_cuda.pvq_matmul(x[:0], q).shape == (0, 3, 33)


def test_matmul_bad_input(device):
    q = quantize_weight(torch.randn(32, 64).to(device))
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 64\]"):
        pvq_cuda.pvq_matmul(torch.randn(3, 48, device=device), q)
    with pytest.raises(TypeError, match="x must have dtype"):
        pvq_cuda.pvq_matmul(torch.randn(3, 64, device=device).long(), q)
    if device == "cuda":  # float64 runs on the CPU only (an exact reference, and gradcheck's dtype)
        with pytest.raises(TypeError, match="x must have dtype float32, float16 or bfloat16 on cuda"):
            pvq_cuda.pvq_matmul(torch.randn(3, 64, device=device).double(), q)
    with pytest.raises(ValueError, match=r"bias must have shape \[32\]"):
        pvq_cuda.pvq_matmul(torch.randn(3, 64, device=device), q, torch.randn(31, device=device))
    with pytest.raises(TypeError, match="weight must be a PVQWeight"):
        pvq_cuda.pvq_matmul(torch.randn(3, 64, device=device), torch.randn(32, 64))
    with pytest.raises(ValueError, match="codes must hold"):
        torch.ops.pvq_cuda.pvq_matmul(torch.randn(3, 64, device=device), q.codes[:-1], q.row_scale, q.levels, None,
                                      None, 32, 8, 16, 2)
    if HAS_CUDA:
        with pytest.raises(ValueError, match="x is on"):
            pvq_cuda.pvq_matmul(torch.randn(3, 64, device="cpu" if device == "cuda" else "cuda"), q)


@pytest.mark.parametrize("M", [3, 20])
def test_opcheck_matmul(device, M):
    q = quantize_weight(torch.randn(40, 64).to(device))
    c = q.config
    args = (torch.randn(M, 64, device=device), q.codes, q.row_scale, q.levels, q.signs, torch.randn(40, device=device),
            40, c.D, c.K, c.scale_bits)
    torch.library.opcheck(torch.ops.pvq_cuda.pvq_matmul.default, args)
    torch.library.opcheck(torch.ops.pvq_cuda.pvq_dequantize.default,
                          (q.codes, q.row_scale, q.levels, 40, 64, c.D, c.K, c.scale_bits))


@pytest.mark.parametrize("M", [1, 20])
def test_corrupt_codes_raise(M):
    """An index >= V(D,K) in raw codes (or codes read with the wrong D/K) raises, never reads out
    of bounds. D=16/K=30 and D=8/K=16 codes of a 40 x 64 layer have the same word count."""
    W = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    q = quantize_weight(W, PVQConfig(D=16, K=30, scale_bits=2))
    index = torch.zeros(40, 8, dtype=torch.long)
    index[7, 3] = pvq_cuda.pyramid_size(8, 16)  # one past the last index
    codes = torch.ops.pvq_cuda._pack_codes.default(index, torch.zeros_like(index), 24, 2)
    with pytest.raises(ValueError, match=r"index >= V\(D=8, K=16\)"):
        torch.ops.pvq_cuda.pvq_matmul(torch.randn(M, 64), codes, q.row_scale, q.levels, None, None, 40, 8, 16, 2)
    with pytest.raises(ValueError, match="corrupt"):
        torch.ops.pvq_cuda.pvq_dequantize(codes, q.row_scale, q.levels, 40, 64, 8, 16, 2)
    with pytest.raises(ValueError, match="corrupt"):  # the D=16 codes read as D=8, K=16
        torch.ops.pvq_cuda.pvq_dequantize(q.codes, q.row_scale, q.levels, 40, 64, 8, 16, 2)


def test_pvq_linear_from_linear_and_state_dict(device):
    lin = nn.Linear(128, 96).to(device)
    layer = PVQLinear.from_linear(lin)
    x = torch.randn(5, 128, device=device)
    ref = x @ layer.weight.dequantize().T + lin.bias.detach()
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4)
    # Quantization error is the data-free PVQ error, not garbage.
    rel = (layer(x) - lin(x)).norm() / lin(x).norm()
    assert rel < 0.25
    fresh = PVQLinear(128, 96, config=layer.config).to(device)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))
    other = PVQLinear(128, 96, config=PVQConfig.preset("pvq-4.25"))
    with pytest.raises((ValueError, RuntimeError)):
        other.load_state_dict(layer.state_dict())


def test_pvq_linear_compile_fullgraph(device):
    layer = PVQLinear.from_linear(nn.Linear(64, 40, bias=False).to(device))
    x = torch.randn(4, 64, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: layer(t).relu() * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x).relu() * 2)


def test_pvq_linear_decoded_cache():
    lin = nn.Linear(64, 32)
    layer = PVQLinear.from_linear(lin)
    x = torch.randn(50, 64)
    fused = layer(x)
    layer.enable_decoded_cache()
    torch.testing.assert_close(layer(x), fused, rtol=1e-4, atol=1e-5)
    layer.disable_decoded_cache()
    assert torch.equal(layer(x), fused)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pvq_linear_cuda_graph(dtype):
    layer = PVQLinear.from_linear(nn.Linear(256, 192).cuda()).to(dtype=dtype)
    x = torch.randn(2, 256, device="cuda", dtype=dtype)
    eager = layer(x)
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer(x)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        out = layer(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@requires_cuda
@pytest.mark.parametrize("M", [1, 7, 16, 33])
def test_cuda_matmul_matches_cpu(M):
    q = quantize_weight(torch.randn(200, 1536, generator=torch.Generator().manual_seed(9)))
    qc = q.to("cuda")
    assert torch.equal(qc.dequantize(rotated=True).cpu(), q.dequantize(rotated=True))
    x = torch.randn(M, 1536)
    torch.testing.assert_close(pvq_cuda.pvq_matmul(x.cuda(), qc).cpu(), pvq_cuda.pvq_matmul(x, q), rtol=1e-4,
                               atol=1e-4)
