"""The rotation op: randomized Hadamard transform along rows (paper.md §6), with its autograd."""

from __future__ import annotations

import torch

from .checks import check_float_input, check_last_dim, check_tensor

_SIGN_DTYPES = (torch.float32, torch.int8)

# Hadamard sizes n = m * 2^k: the odd part of n picks m (csrc/hadamard/hadamard_matrix.h).
HADAMARD_BASES = (1, 12, 20, 28, 36, 52, 60)
HADAMARD_MAX_N = 32768
_BASE_OF_ODD_PART = {m >> (m & -m).bit_length() - 1: m for m in HADAMARD_BASES}


def hadamard_split(n: int) -> tuple[int, int] | None:
    """``(m, k)`` with ``n = m * 2**k`` for the Hadamard size n, or None when n is not supported."""
    if not 1 <= n <= HADAMARD_MAX_N:
        return None
    odd = n >> ((n & -n).bit_length() - 1)
    m = _BASE_OF_ODD_PART.get(odd)
    if m is None or n % m:
        return None
    return m, (n // m).bit_length() - 1


def _check_hadamard_args(x, signs) -> None:
    op = "pvq_cuda.hadamard_transform"
    check_float_input(op, "x", x)
    n = check_last_dim(op, "x", x, "n")
    if hadamard_split(n) is None:
        raise ValueError(
            f"{op}: the last dimension n of x must be m * 2^k with m in {{1, 12, 20, 28, 36, 52, 60}}, k >= 0 "
            f"and n <= {HADAMARD_MAX_N} (e.g. 4096, 576 = 36*16, 1536 = 12*128, 40 = 20*2), got n={n}"
        )
    if signs is None:
        return
    if not isinstance(signs, torch.Tensor):
        raise TypeError(f"{op}: signs must be a torch.Tensor or None, got {type(signs).__name__}")
    check_tensor(op, "signs", signs, _SIGN_DTYPES)
    if signs.dim() != 1 or signs.shape[0] != n:
        raise ValueError(
            f"{op}: signs must have shape [n] = [{n}] (one ±1 per element of the last dimension of x), "
            f"got {list(signs.shape)}"
        )
    if signs.device != x.device:
        raise ValueError(f"{op}: signs must be on the same device as x ({x.device}), got {signs.device}")


def hadamard_transform(x: torch.Tensor, signs: torch.Tensor | None = None) -> torch.Tensor:
    """Randomized Hadamard rotation along the last dimension (paper.md §6).

    ``y = H_n · diag(signs) · x / sqrt(n)`` for every row ``x[..., :]``, where ``n = m * 2^k`` and
    ``H_n = H_m ⊗ H_{2^k}``: ``H_{2^k}`` is the Sylvester matrix (``(-1)^popcount(b & b')``) and
    ``H_m`` the symmetric Paley-II Hadamard matrix of order m (m = 1 for powers of two). Element
    ``i = a * 2^k + b`` of a row is coordinate ``(a, b)``. The matrix is orthogonal after scaling and
    symmetric, so without signs the transform is its own inverse; with signs the inverse is
    ``signs * hadamard_transform(y)``.

    Args:
        x: float32, float16 or bfloat16 tensor (float64 on the CPU) of shape ``[..., n]``, any strides,
            leading dims may be empty. Supported n: ``m * 2^k <= 32768`` with m in (1, 12, 20, 28, 36, 52, 60), e.g. 4096,
            576 = 36*16, 1536 = 12*128, 14336 = 28*512.
        signs: optional ``[n]`` tensor on x's device, float32 or int8, every entry +1 or -1 (other
            values are not checked and are applied as plain multipliers).

    Returns:
        A contiguous tensor of x's shape and dtype. The arithmetic is fp32 (fp64 for float64), rounded
        once to x's dtype.
        Differentiable in x (the gradient is ``signs * hadamard_transform(grad)``), not in signs.
    """
    _check_hadamard_args(x, signs)
    return torch.ops.pvq_cuda.hadamard_transform.default(x, signs)


@torch.library.register_fake("pvq_cuda::hadamard_transform")
def _hadamard_transform_fake(x, signs=None):
    _check_hadamard_args(x, signs)
    return x.new_empty(x.shape)


def _hadamard_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _hadamard_backward(ctx, grad):
    # y = R x with R = H·diag(s)/sqrt(n) orthogonal and H symmetric: dL/dx = Rᵀ g = s * T(g).
    (signs,) = ctx.saved_tensors
    grad_x = torch.ops.pvq_cuda.hadamard_transform.default(grad, None)
    if signs is not None:
        grad_x = grad_x * signs.to(grad_x.dtype)
    return grad_x, None


torch.library.register_autograd(
    "pvq_cuda::hadamard_transform", _hadamard_backward, setup_context=_hadamard_setup_context
)
