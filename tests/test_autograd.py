"""Autograd through pvq_matmul with respect to its input (and bias): grad_x = grad @ W, decoded on the
fly by pvq_matmul_grad_input (no dense W is kept), checked by gradcheck in float64 and against
the dequantized weight."""

import pytest
import torch
from torch import nn

import pvq_cuda
from conftest import requires_cuda
from pvq_cuda import PVQConfig, PVQLinear, quantize_weight

PRESETS = ["pvq-3.25", "pvq8-3.25", "pvq-4.25", "pvq-2.25"]


def fused_weight(w) -> torch.Tensor:
    """W in the original basis, float64, built from exactly the float values the fused kernels use:
    level·inv_norm·y in float32, times the row scale in the activations' type, then the rotation."""
    c = w.config
    index, gain = w.unpack()
    y = pvq_cuda.decode(index.cpu(), c.D, c.K).float()
    inv = (1.0 / torch.sqrt((y * y).sum(-1, dtype=torch.float64))).float()
    s1 = w.levels.cpu()[gain.cpu()] * inv
    Wr = (s1[..., None] * y).reshape(w.out_features, -1).double() * w.row_scale.cpu().double()[:, None]
    return pvq_cuda.hadamard_transform(Wr) * w.signs.cpu().double() if c.rotate else Wr


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("shape", [(40, 64), (33, 96)])
@pytest.mark.parametrize("M", [1, 3, 8, 12])
def test_gradcheck_float64(preset, shape, M):
    N, n = shape
    g = torch.Generator().manual_seed(N * M + n)
    w = quantize_weight(torch.randn(N, n, generator=g), PVQConfig.preset(preset))
    x = torch.randn(M, n, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(N, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: pvq_cuda.pvq_matmul(x, w, b), (x, b))
    # Up to 8 rows the fused kernels run, whose forward and backward are exact adjoints of one
    # float64 weight; above, decoded row blocks (one more float rounding of row_scale · level).
    tol = 1e-12 if M <= 8 else 1e-5
    W = fused_weight(w)
    y = pvq_cuda.pvq_matmul(x, w, b)
    torch.testing.assert_close(y, x @ W.T + b, rtol=tol, atol=tol)
    grad = torch.randn(M, N, generator=g, dtype=torch.float64)
    gx, gb = torch.autograd.grad(y, (x, b), grad)
    torch.testing.assert_close(gx, grad @ W, rtol=tol, atol=tol)
    torch.testing.assert_close(gb, grad.sum(0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 5, 24])
def test_input_grad_matches_dequantized(device, dtype, M):
    g = torch.Generator().manual_seed(M)
    w = quantize_weight(torch.randn(72, 128, generator=g).to(device))
    x = torch.randn(2, M, 128, generator=g).to(device, dtype).requires_grad_()
    y = pvq_cuda.pvq_matmul(x, w)
    grad = torch.randn(y.shape, generator=g).to(device, dtype)
    (gx,) = torch.autograd.grad(y, x, grad)
    assert gx.shape == x.shape and gx.dtype == dtype
    want = grad.double() @ w.dequantize().double()
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
    err = (gx.double() - want).norm() / want.norm()
    assert err < tol, err


def test_pvq_linear_trains_what_is_before_it(device):
    """A trainable layer in front of a PVQLinear gets the gradient through it: a few steps lower the loss."""
    torch.manual_seed(0)
    front = nn.Linear(32, 64).to(device)
    pvq = PVQLinear.from_linear(nn.Linear(64, 48).to(device))
    x, target = torch.randn(64, 32, device=device), torch.randn(64, 48, device=device)
    opt = torch.optim.Adam(front.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = nn.functional.mse_loss(pvq(front(x)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert all(not t.requires_grad for t in (pvq.codes, pvq.row_scale, pvq.levels))


@pytest.mark.parametrize("M", [2, 20])
def test_opcheck_grad_input(device, M):
    q = quantize_weight(torch.randn(40, 64).to(device))
    c = q.config
    torch.library.opcheck(torch.ops.pvq_cuda.pvq_matmul_grad_input.default,
                          (torch.randn(M, 40, device=device), q.codes, q.row_scale, q.levels, q.signs, 64, c.D, c.K,
                           c.scale_bits))
    x = torch.randn(M, 64, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.pvq_cuda.pvq_matmul.default,
                          (x, q.codes, q.row_scale, q.levels, q.signs, None, 40, c.D, c.K, c.scale_bits))


def test_grad_input_bad_input():
    q = quantize_weight(torch.randn(40, 64))
    c = q.config
    op = torch.ops.pvq_cuda.pvq_matmul_grad_input
    with pytest.raises(ValueError, match=r"grad must have shape \[\.\.\., 40\]"):
        op(torch.randn(3, 41), q.codes, q.row_scale, q.levels, q.signs, 64, c.D, c.K, c.scale_bits)
    with pytest.raises(TypeError, match="grad must be float32"):
        op(torch.randn(3, 40).long(), q.codes, q.row_scale, q.levels, q.signs, 64, c.D, c.K, c.scale_bits)
    with pytest.raises(ValueError, match="codes must hold"):
        op(torch.randn(3, 40), q.codes[:-1], q.row_scale, q.levels, q.signs, 64, c.D, c.K, c.scale_bits)
    with pytest.raises(ValueError, match=r"signs must have shape \[64\]"):
        op(torch.randn(3, 40), q.codes, q.row_scale, q.levels, q.signs[:-1], 64, c.D, c.K, c.scale_bits)


@requires_cuda
def test_float64_is_cpu_only():
    q = quantize_weight(torch.randn(40, 64, device="cuda"))
    with pytest.raises(TypeError, match="float64 runs on the CPU only"):
        pvq_cuda.pvq_matmul(torch.randn(3, 64, device="cuda", dtype=torch.float64), q)


@pytest.mark.parametrize("M", [3, 40])
def test_activation_checkpointing_and_no_grad_views(device, M):
    """Inputs that are views made under no_grad (what activation checkpointing feeds a layer) go
    through, with and without autograd, fused and blocked; the recomputed gradient is the same."""
    from torch.utils.checkpoint import checkpoint

    w = quantize_weight(torch.randn(40, 64).to(device))
    x = torch.randn(2, M, 64, device=device, requires_grad=True)
    with torch.no_grad():
        view = x.view(2 * M, 64)
    pvq_cuda.pvq_matmul(view, w)
    with torch.no_grad():
        pvq_cuda.pvq_matmul(x, w)
    (plain,) = torch.autograd.grad(pvq_cuda.pvq_matmul(x, w).square().sum(), x)
    (ckpt,) = torch.autograd.grad(checkpoint(lambda t: pvq_cuda.pvq_matmul(t, w).square().sum(), x,
                                             use_reentrant=False), x)
    torch.testing.assert_close(ckpt, plain)



def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


# Norm-relative error of a CUDA gradient against the float64 one: grad, the dense tile and each
# tile's product are rounded to the dtype (2^-11 fp16, 2^-8 bf16 relative), float32 rounds at 2^-24.
CUDA_GRAD_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@requires_cuda
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 4), (9,), (4, 16)])
def test_cuda_input_grad_matches_cpu(preset, dtype, lead):
    """The CUDA gradient against the CPU op's float64 gradient, which test_gradcheck_float64 checks
    with gradcheck: up to 8 rows the fused kernel (decoded in registers), above dequantized tiles
    through cuBLAS, both rotated back on the GPU. One layer, quantized once on the CPU and moved,
    rotated (192 = 12 · 16), an odd row count."""
    g = torch.Generator().manual_seed(sum(lead) + len(preset))
    w = quantize_weight(torch.randn(75, 192, generator=g), PVQConfig.preset(preset))
    x = torch.randn(*lead, 192, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(*lead, 75, generator=g, dtype=torch.float64)
    (want,) = torch.autograd.grad(pvq_cuda.pvq_matmul(x, w), x, grad)
    xc = x.detach().to("cuda", dtype).requires_grad_()
    (got,) = torch.autograd.grad(pvq_cuda.pvq_matmul(xc, w.to("cuda")), xc, grad.to("cuda", dtype))
    assert got.dtype == dtype and got.shape == x.shape and got.device.type == "cuda"
    err = _relative_error(got.cpu(), want)
    assert err < CUDA_GRAD_TOL[dtype], f"{preset} {lead} {dtype}: relative error {err:.2e} against float64 on the CPU"
    # The op called directly (not through autograd) gives the same values.
    c = w.config
    direct = torch.ops.pvq_cuda.pvq_matmul_grad_input(grad.to("cuda", dtype), w.codes.cuda(), w.row_scale.cuda(),
                                                       w.levels.cuda(), w.signs.cuda(), 192, c.D, c.K, c.scale_bits)
    assert torch.equal(direct, got)


@requires_cuda
@pytest.mark.parametrize("dtype,M", [(torch.float32, 24), (torch.bfloat16, 24), (torch.float16, 4)])
def test_cuda_input_grad_large_layer(dtype, M):
    """8224 x 4096 is 33.7 M weights. M=24 takes the tiled path and is above one dense tile (2^25
    weights: 8192 rows here), so the gradient sums two tiles, the second 32 rows; M=4 takes the fused
    kernel, whose 257 tiles are cut into ranges on a big GPU. Against the CPU op in float64 and,
    unrotated, in the same dtype."""
    g = torch.Generator().manual_seed(5)
    w = quantize_weight(torch.randn(8224, 4096, generator=g).cuda(), PVQConfig.preset("pvq-3.25")).to("cpu")
    grad = torch.randn(M, 8224, generator=g, dtype=torch.float64)
    c = w.config
    want = torch.ops.pvq_cuda.pvq_matmul_grad_input(grad, w.codes, w.row_scale, w.levels, w.signs, 4096, c.D, c.K,
                                                    c.scale_bits)
    wc = w.to("cuda")
    got = torch.ops.pvq_cuda.pvq_matmul_grad_input(grad.to("cuda", dtype), wc.codes, wc.row_scale, wc.levels,
                                                    wc.signs, 4096, c.D, c.K, c.scale_bits)
    err = _relative_error(got.cpu(), want)
    assert err < CUDA_GRAD_TOL[dtype], f"{dtype}: relative error {err:.2e} against float64 on the CPU"
    plain = torch.ops.pvq_cuda.pvq_matmul_grad_input(grad.to("cuda", dtype), wc.codes, wc.row_scale, wc.levels, None,
                                                      4096, c.D, c.K, c.scale_bits)
    plain_cpu = torch.ops.pvq_cuda.pvq_matmul_grad_input(grad.to(dtype), w.codes, w.row_scale, w.levels, None, 4096,
                                                          c.D, c.K, c.scale_bits)
    err = _relative_error(plain.cpu(), plain_cpu)
    assert err < CUDA_GRAD_TOL[dtype], f"{dtype} unrotated: relative error {err:.2e} against the CPU op"


@requires_cuda
def test_cuda_input_grad_bad_input():
    """The CUDA kernel runs the CPU op's checks: float64 is refused on the GPU, shapes are named."""
    q = quantize_weight(torch.randn(40, 64, device="cuda"))
    c = q.config
    op = torch.ops.pvq_cuda.pvq_matmul_grad_input
    with pytest.raises(TypeError, match=r"grad must be float32, float16 or bfloat16 \(float64 on CPU\)"):
        op(torch.randn(3, 40, device="cuda", dtype=torch.float64), q.codes, q.row_scale, q.levels, q.signs, 64, c.D,
           c.K, c.scale_bits)
    with pytest.raises(ValueError, match=r"grad must have shape \[\.\.\., 40\]"):
        op(torch.randn(3, 41, device="cuda"), q.codes, q.row_scale, q.levels, q.signs, 64, c.D, c.K, c.scale_bits)
    with pytest.raises(ValueError, match="grad is on cpu but the weight is on cuda"):
        op(torch.randn(3, 40), q.codes, q.row_scale, q.levels, q.signs, 64, c.D, c.K, c.scale_bits)
    assert op(torch.randn(0, 40, device="cuda"), q.codes, q.row_scale, q.levels, q.signs, 64, c.D, c.K,
              c.scale_bits).shape == (0, 64)
