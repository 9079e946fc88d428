"""hessian_accumulate_ against fp64, and HessianCollector."""

import pytest
import torch
from torch import nn

import pvq_cuda
from conftest import requires_cuda
from pvq_cuda.quantization.hessian import HessianCollector, collect_hessians, damp_hessian, rotate_hessian


def _rel_fro(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,tokens", [(1, 5), (70, 16384), (576, 2000), (130, 333), (257, 16384)])
def test_accumulate_against_fp64(dtype, n, tokens, device):
    gen = torch.Generator().manual_seed(n + tokens)
    x = (torch.randn(tokens, n, generator=gen) + 0.5).to(device, dtype)  # non-zero mean: large diagonals
    H0 = torch.randn(n, n, generator=gen)
    H0 = (H0 @ H0.T).to(device)
    H = H0.clone()
    pvq_cuda.hessian_accumulate_(H, x)
    ref = H0.double() + x.double().T @ x.double()
    assert _rel_fro(H, ref) <= 1e-6
    assert torch.equal(H, H.T)


def test_accumulate_shapes_and_errors(device):
    H = torch.zeros(16, 16, device=device)
    pvq_cuda.hessian_accumulate_(H, torch.ones(2, 3, 16, device=device))
    assert torch.all(H == 6)
    pvq_cuda.hessian_accumulate_(H, torch.ones(0, 16, device=device))
    assert torch.all(H == 6)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 16\]"):
        pvq_cuda.hessian_accumulate_(H, torch.ones(4, 15, device=device))
    with pytest.raises(TypeError, match="H must have dtype float32"):
        pvq_cuda.hessian_accumulate_(H.double(), torch.ones(4, 16, device=device))
    with pytest.raises(ValueError, match="square"):
        torch.ops.pvq_cuda.hessian_accumulate_(torch.zeros(4, 5, device=device), torch.ones(2, 5, device=device))
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.pvq_cuda.hessian_accumulate_(torch.zeros(8, 8, device=device).T[:4, :4].T, torch.ones(2, 4, device=device))


def test_opcheck_accumulate(device):
    H = torch.zeros(8, 8, device=device)
    torch.library.opcheck(torch.ops.pvq_cuda.hessian_accumulate_.default, (H, torch.randn(5, 8, device=device)))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        return self.o(self.q(x) * torch.sigmoid(self.k(x)) + self.v(x))


def test_collector_shares_inputs_and_scales():
    torch.manual_seed(0)
    block = _Block()
    xs = [torch.randn(3, 7, 16) for _ in range(4)]
    hc = collect_hessians(block, ["q", "k", "v", "o"], xs, damp=0.0)
    assert hc.shared_with("q") == ["q", "k", "v"] and hc.shared_with("o") == ["o"]
    assert hc.tokens("q") == 84
    X = torch.cat(xs).reshape(-1, 16).double()
    torch.testing.assert_close(hc.hessian("q").double(), 2 / 84 * X.T @ X, rtol=1e-6, atol=1e-7)
    damped = hc.hessian("k", damp=0.1)
    plain = hc.hessian("k")
    torch.testing.assert_close(damped - plain, 0.1 * plain.diagonal().mean() * torch.eye(16))
    with pytest.raises(KeyError):
        hc.hessian("nope")


def test_collector_fed_without_hooks_matches_hooks():
    """hooks=False and add(): the same Hessians and sharing as the hooks give, and a clear error
    for a layer the collector does not hold."""
    torch.manual_seed(0)
    block = _Block()
    xs = [torch.randn(3, 7, 16) for _ in range(4)]
    hooked = collect_hessians(block, ["q", "k", "v"], xs, damp=0.0)
    fed = HessianCollector({"q": block.q, "k": block.k, "v": block.v}, damp=0.0, hooks=False)
    for x in xs:
        block(x)  # no hook: the collector sees nothing
    assert fed.names() == []
    for x in xs:
        fed.new_batch()
        for n in ("q", "k", "v"):
            fed.add(n, x)
    assert fed.shared_with("q") == ["q", "k", "v"] and fed.tokens("v") == hooked.tokens("v")
    assert torch.equal(fed.hessian("q"), hooked.hessian("q"))
    with pytest.raises(KeyError, match="no module named 'o'"):
        fed.add("o", xs[0].clone())


def test_rotate_hessian_matches_dense():
    n = 48
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(n, n, generator=gen, dtype=torch.float64)
    H = (A @ A.T).float()
    signs = pvq_cuda.rotation_signs(n, 5)
    R = pvq_cuda.hadamard_transform(torch.eye(n), signs).T  # columns: R e_i
    torch.testing.assert_close(rotate_hessian(H, signs), R @ H @ R.T, rtol=1e-4, atol=1e-3)
    x = torch.randn(10, n, generator=gen)
    torch.testing.assert_close(pvq_cuda.hadamard_transform(x, signs), x @ R.T, rtol=1e-5, atol=1e-5)


def test_damp_handles_dead_inputs():
    H = torch.zeros(4, 4)
    assert torch.all(damp_hessian(H, 0.01).diagonal() > 0)


@requires_cuda
def test_cuda_accumulate_large_bf16_against_fp64():
    x = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)
    H = torch.zeros(4096, 4096, device="cuda")
    pvq_cuda.hessian_accumulate_(H, x)
    ref = x.double().T @ x.double()
    assert _rel_fro(H, ref) <= 1e-6
