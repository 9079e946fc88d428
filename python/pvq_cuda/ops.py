"""Typed Python faces of the pvq_cuda ops, and their shape functions for torch.compile.

Each wrapper calls ``torch.ops.pvq_cuda.<op>.default``; the C++ kernels (CPU always, CUDA when
built) check their arguments again, so calling the ops directly is just as safe.
"""

from __future__ import annotations

import torch

from .counting import check_limits

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)
_SIGN_DTYPES = (torch.float32, torch.int8)

# Hadamard sizes n = m * 2^k: the odd part of n picks m (csrc/hadamard/hadamard_matrix.h).
HADAMARD_BASES = (1, 12, 20, 28, 36, 52, 60)
HADAMARD_MAX_N = 32768
_BASE_OF_ODD_PART = {m >> (m & -m).bit_length() - 1: m for m in HADAMARD_BASES}


def _check_tensor(op: str, name: str, t, dtypes) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype {allowed}; got {str(t.dtype).removeprefix('torch.')}")
    if t.layout != torch.strided:
        raise ValueError(f"{op}: {name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"{op}: {name} must be on a CPU or CUDA device, got {t.device}")
    if t.device.type == "cuda" and not torch.ops.pvq_cuda.decode.default.has_kernel_for_dispatch_key("CUDA"):
        raise RuntimeError(
            f"{op}: {name} is on {t.device}, but this pvq_cuda build has no CUDA kernels "
            "(it was built without a CUDA torch or without nvcc); rebuild with PVQ_WITH_CUDA=ON"
        )


def _check_last_dim(op: str, name: str, t: torch.Tensor, last: str = "D") -> int:
    if t.dim() == 0:
        raise ValueError(f"{op}: {name} must have shape [..., {last}], got a 0-d tensor")
    # D picks the kernel, so a symbolic D is specialized (guarded) rather than traced.
    return int(t.shape[-1])


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
    _check_tensor(op, "x", x, _FLOAT_DTYPES)
    n = _check_last_dim(op, "x", x, "n")
    if hadamard_split(n) is None:
        raise ValueError(
            f"{op}: the last dimension n of x must be m * 2^k with m in {{1, 12, 20, 28, 36, 52, 60}}, k >= 0 "
            f"and n <= {HADAMARD_MAX_N} (e.g. 4096, 576 = 36*16, 1536 = 12*128, 40 = 20*2), got n={n}"
        )
    if signs is None:
        return
    if not isinstance(signs, torch.Tensor):
        raise TypeError(f"{op}: signs must be a torch.Tensor or None, got {type(signs).__name__}")
    _check_tensor(op, "signs", signs, _SIGN_DTYPES)
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
        x: float32, float16 or bfloat16 tensor of shape ``[..., n]``, any strides, leading dims may be
            empty. Supported n: ``m * 2^k <= 32768`` with m in (1, 12, 20, 28, 36, 52, 60), e.g. 4096,
            576 = 36*16, 1536 = 12*128, 14336 = 28*512.
        signs: optional ``[n]`` tensor on x's device, float32 or int8, every entry +1 or -1 (other
            values are not checked and are applied as plain multipliers).

    Returns:
        A contiguous tensor of x's shape and dtype. The arithmetic is fp32, rounded once to x's dtype.
        Differentiable in x (the gradient is ``signs * hadamard_transform(grad)``), not in signs.
    """
    _check_hadamard_args(x, signs)
    return torch.ops.pvq_cuda.hadamard_transform.default(x, signs)


def search(x: torch.Tensor, K: int) -> torch.Tensor:
    """Nearest point of the pyramid P(D, K) in angle to each row of ``x[..., D]``.

    Args:
        x: float32, float16 or bfloat16 tensor of shape ``[..., D]``, D in {1, 2, 4, 8, 16, 32};
            finite values only.
        K: pulses per group, ``1 <= K <= 127`` (and ``ceil(log2 V(D,K)) <= 63``).

    Returns:
        int8 pulses ``y`` of shape ``[..., D]`` with ``sum |y| == K`` per row and the signs of ``x``.
        Greedy placement plus pulse-move refinement; an all-zero row gives ``K`` on its first axis.
    """
    _check_tensor("pvq_cuda.search", "x", x, _FLOAT_DTYPES)
    check_limits(_check_last_dim("pvq_cuda.search", "x", x), K, "pvq_cuda.search")
    return torch.ops.pvq_cuda.search.default(x, K)


def encode(pulses: torch.Tensor, K: int) -> torch.Tensor:
    """Split-order index of each pulse vector (paper.md §2; the on-disk format).

    Args:
        pulses: integer tensor of shape ``[..., D]`` with ``sum |y| == K`` in every row.
        K: pulses per group.

    Returns:
        int64 tensor of shape ``[...]`` with values in ``[0, V(D, K))``.
    """
    _check_tensor("pvq_cuda.encode", "pulses", pulses, _INT_DTYPES)
    check_limits(_check_last_dim("pvq_cuda.encode", "pulses", pulses), K, "pvq_cuda.encode")
    return torch.ops.pvq_cuda.encode.default(pulses, K)


def decode(index: torch.Tensor, D: int, K: int) -> torch.Tensor:
    """Pulse vectors of split-order indices: the inverse of :func:`encode`.

    Args:
        index: int64 (or int32) tensor of any shape, values in ``[0, V(D, K))``.
        D, K: group size and pulses.

    Returns:
        int8 tensor of shape ``[*index.shape, D]``.
    """
    _check_tensor("pvq_cuda.decode", "index", index, (torch.int64, torch.int32))
    check_limits(D, K, "pvq_cuda.decode")
    return torch.ops.pvq_cuda.decode.default(index.long(), D, K)


@torch.library.register_fake("pvq_cuda::search")
def _search_fake(x, K):
    _check_tensor("pvq_cuda.search", "x", x, _FLOAT_DTYPES)
    check_limits(_check_last_dim("pvq_cuda.search", "x", x), K, "pvq_cuda.search")
    return x.new_empty(x.shape, dtype=torch.int8)


@torch.library.register_fake("pvq_cuda::encode")
def _encode_fake(pulses, K):
    _check_tensor("pvq_cuda.encode", "pulses", pulses, _INT_DTYPES)
    check_limits(_check_last_dim("pvq_cuda.encode", "pulses", pulses), K, "pvq_cuda.encode")
    return pulses.new_empty(pulses.shape[:-1], dtype=torch.int64)


@torch.library.register_fake("pvq_cuda::decode")
def _decode_fake(index, D, K):
    _check_tensor("pvq_cuda.decode", "index", index, (torch.int64,))
    check_limits(D, K, "pvq_cuda.decode")
    return index.new_empty((*index.shape, D), dtype=torch.int8)


# ---------------------------------------------------------------------------------------------
# Packed layers (the layout is documented in csrc/packed/packed_layer.h)
# ---------------------------------------------------------------------------------------------

def pvq_matmul(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for a packed PVQ weight, rotation included.

    Args:
        x: float32, float16 or bfloat16 tensor ``[..., in_features]`` on the weight's device.
        weight: a :class:`pvq_cuda.PVQWeight`.
        bias: optional ``[out_features]`` floating tensor.

    Returns:
        ``[..., out_features]`` in x's dtype. Codes are decoded on the fly; the dense weight is never
        materialized (CPU: per 32-row tile; CUDA: in registers).
    """
    from .weight import PVQWeight

    if not isinstance(weight, PVQWeight):
        raise TypeError(f"pvq_cuda.pvq_matmul: weight must be a PVQWeight, got {type(weight).__name__}")
    _check_tensor("pvq_cuda.pvq_matmul", "x", x, _FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] != weight.in_features:
        raise ValueError(f"pvq_cuda.pvq_matmul: x must have shape [..., {weight.in_features}] (the weight's "
                         f"in_features), got {list(x.shape)}")
    if bias is not None:
        _check_tensor("pvq_cuda.pvq_matmul", "bias", bias, _FLOAT_DTYPES)
    c = weight.config
    return torch.ops.pvq_cuda.pvq_matmul.default(
        x, weight.codes, weight.row_scale, weight.levels, weight.signs, bias, weight.out_features, c.D, c.K,
        c.scale_bits,
    )


@torch.library.register_fake("pvq_cuda::pvq_matmul")
def _pvq_matmul_fake(x, codes, row_scale, levels, signs, bias, out_features, D, K, scale_bits):
    torch._check(x.dim() >= 1, lambda: "pvq_cuda.pvq_matmul: x must have shape [..., in_features]")
    torch._check(x.shape[-1] % D == 0, lambda: f"pvq_cuda.pvq_matmul: in_features must be a multiple of D={D}")
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("pvq_cuda::pvq_dequantize")
def _pvq_dequantize_fake(codes, row_scale, levels, out_features, in_features, D, K, scale_bits):
    return codes.new_empty((out_features, in_features), dtype=torch.float32)


@torch.library.register_fake("pvq_cuda::_pack_codes")
def _pack_codes_fake(index, gain, index_bits, scale_bits):
    tiles = (index.shape[0] + 31) // 32
    return index.new_empty((tiles * index.shape[1] * (index_bits + scale_bits),), dtype=torch.int32)


@torch.library.register_fake("pvq_cuda::_unpack_codes")
def _unpack_codes_fake(codes, rows, groups, index_bits, scale_bits):
    return (codes.new_empty((rows, groups), dtype=torch.int64), codes.new_empty((rows, groups), dtype=torch.int64))
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


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------

def hessian_accumulate_(H: torch.Tensor, x: torch.Tensor) -> None:
    """``H += x^T x`` in place, for ``H`` float32 ``[n, n]`` and ``x`` ``[..., n]`` (fp32/fp16/bf16).

    CUDA: tensor cores for 16-bit x, only tiles on and above the diagonal, mirrored; fp64 folding
    keeps the relative error near 1e-7. CPU: fp64 BLAS. Unscaled: see HessianCollector for 2/N.
    """
    _check_tensor("pvq_cuda.hessian_accumulate_", "H", H, (torch.float32,))
    _check_tensor("pvq_cuda.hessian_accumulate_", "x", x, _FLOAT_DTYPES)
    torch.ops.pvq_cuda.hessian_accumulate_.default(H, x)


@torch.library.register_fake("pvq_cuda::hessian_accumulate_")
def _hessian_accumulate_fake(H, x):
    return None
