"""The packed-layer ops: fused decode-and-matmul and dequantization of packed PVQ codes.

These faces take the raw buffers of a packed layer (the layout is documented in
csrc/packed/packed_layer.h); :func:`pvq_cuda.pvq_matmul` in the format layer is the public one,
taking a :class:`pvq_cuda.PVQWeight`.
"""

from __future__ import annotations

import torch

from .checks import check_float_input


def matmul_packed(x: torch.Tensor, codes: torch.Tensor, row_scale: torch.Tensor, levels: torch.Tensor,
                  signs: torch.Tensor | None, bias: torch.Tensor | None, out_features: int, D: int, K: int,
                  scale_bits: int) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for the packed weight W held by ``codes``/``row_scale``/``levels``, with
    the input rotated by ``signs`` first (None: an unrotated layer). x: ``[..., in_features]``."""
    check_float_input("pvq_cuda.pvq_matmul", "x", x)
    if bias is not None:
        check_float_input("pvq_cuda.pvq_matmul", "bias", bias)
    return torch.ops.pvq_cuda.pvq_matmul.default(x, codes, row_scale, levels, signs, bias, out_features, D, K,
                                                 scale_bits)


def matmul_grad_input(grad: torch.Tensor, codes: torch.Tensor, row_scale: torch.Tensor, levels: torch.Tensor,
                      signs: torch.Tensor | None, in_features: int, D: int, K: int, scale_bits: int) -> torch.Tensor:
    """``grad @ W``: the gradient of :func:`matmul_packed` with respect to its input, for
    ``grad`` = dL/dy ``[..., out_features]``, the rotation's inverse included. No whole dense copy
    of W is made: up to 8 rows of grad (CUDA: 4 at D=32) the codes are decoded on the fly; above,
    in row blocks of at most 32 MB (CPU) or row tiles of ~32 M weights for cuBLAS (CUDA)."""
    check_float_input("pvq_cuda.pvq_matmul_grad_input", "grad", grad)
    return torch.ops.pvq_cuda.pvq_matmul_grad_input.default(grad, codes, row_scale, levels, signs, in_features, D, K,
                                                            scale_bits)


def dequantize_packed(codes: torch.Tensor, row_scale: torch.Tensor, levels: torch.Tensor, out_features: int,
                      in_features: int, D: int, K: int, scale_bits: int) -> torch.Tensor:
    """The float32 weight ``[out_features, in_features]`` of a packed layer, in its rotated basis."""
    return torch.ops.pvq_cuda.pvq_dequantize.default(codes, row_scale, levels, out_features, in_features, D, K,
                                                     scale_bits)


def pack_codes(index: torch.Tensor, gain: torch.Tensor, index_bits: int, scale_bits: int) -> torch.Tensor:
    """Pack int64 ``[rows, groups]`` indices and gain codes into the int32 words of the layout."""
    return torch.ops.pvq_cuda._pack_codes.default(index, gain, index_bits, scale_bits)


def unpack_codes(codes: torch.Tensor, rows: int, groups: int, index_bits: int,
                 scale_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`pack_codes`: (index, gain code), int64 ``[rows, groups]`` each."""
    return torch.ops.pvq_cuda._unpack_codes.default(codes, rows, groups, index_bits, scale_bits)


@torch.library.register_fake("pvq_cuda::pvq_matmul")
def _pvq_matmul_fake(x, codes, row_scale, levels, signs, bias, out_features, D, K, scale_bits):
    torch._check(x.dim() >= 1, lambda: "pvq_cuda.pvq_matmul: x must have shape [..., in_features]")
    torch._check(x.shape[-1] % D == 0, lambda: f"pvq_cuda.pvq_matmul: in_features must be a multiple of D={D}")
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("pvq_cuda::pvq_matmul_grad_input")
def _pvq_matmul_grad_input_fake(grad, codes, row_scale, levels, signs, in_features, D, K, scale_bits):
    torch._check(grad.dim() >= 1, lambda: "pvq_cuda.pvq_matmul_grad_input: grad must have shape [..., out_features]")
    return grad.new_empty((*grad.shape[:-1], in_features))


def _pvq_matmul_setup_context(ctx, inputs, output):
    x, codes, row_scale, levels, signs, bias, out_features, D, K, scale_bits = inputs
    ctx.save_for_backward(codes, row_scale, levels, signs)
    ctx.layer = (x.shape[-1], D, K, scale_bits)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _pvq_matmul_backward(ctx, grad):
    # y = (x R^T) W'^T + b, so dL/dx = (grad W') R, made by pvq_matmul_grad_input without a dense W,
    # and dL/db = grad summed over the leading dimensions. Codes, scales and levels get no gradient.
    codes, row_scale, levels, signs = ctx.saved_tensors
    in_features, D, K, scale_bits = ctx.layer
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.pvq_cuda.pvq_matmul_grad_input.default(grad, codes, row_scale, levels, signs, in_features,
                                                                  D, K, scale_bits)
    if ctx.needs_input_grad[5]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, grad_bias, None, None, None, None


torch.library.register_autograd("pvq_cuda::pvq_matmul", _pvq_matmul_backward, setup_context=_pvq_matmul_setup_context)


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
