"""The calibration op: in-place Hessian accumulation H += xᵀx."""

from __future__ import annotations

import torch

from .checks import FLOAT_DTYPES, check_tensor


def hessian_accumulate_(H: torch.Tensor, x: torch.Tensor) -> None:
    """``H += x^T x`` in place, for ``H`` float32 ``[n, n]`` and ``x`` ``[..., n]`` (fp32/fp16/bf16).

    CUDA: tensor cores for 16-bit x, only tiles on and above the diagonal, mirrored; fp64 folding
    keeps the relative error near 1e-7 (fp32 x: an fp64 GEMM). CPU: fp32 BLAS on 1024-token chunks
    over the panels on and above the diagonal, summed in fp64. Unscaled: see HessianCollector for 2/N.
    """
    check_tensor("pvq_cuda.hessian_accumulate_", "H", H, (torch.float32,))
    check_tensor("pvq_cuda.hessian_accumulate_", "x", x, FLOAT_DTYPES)
    torch.ops.pvq_cuda.hessian_accumulate_.default(H, x)


@torch.library.register_fake("pvq_cuda::hessian_accumulate_")
def _hessian_accumulate_fake(H, x):
    return None
