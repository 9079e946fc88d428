"""The packed-layer ops: fused decode-and-matmul and dequantization of packed PVQ codes.

These faces take the raw buffers of a packed layer (the layout is documented in
csrc/packed/packed_layer.h); :func:`pvq_cuda.pvq_matmul` in the format layer is the public one,
taking a :class:`pvq_cuda.PVQWeight`.
"""

from __future__ import annotations

import torch

from .checks import FLOAT_DTYPES, check_tensor


def matmul_packed(x: torch.Tensor, codes: torch.Tensor, row_scale: torch.Tensor, levels: torch.Tensor,
                  signs: torch.Tensor | None, bias: torch.Tensor | None, out_features: int, D: int, K: int,
                  scale_bits: int) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for the packed weight W held by ``codes``/``row_scale``/``levels``, with
    the input rotated by ``signs`` first (None: an unrotated layer). x: ``[..., in_features]``."""
    check_tensor("pvq_cuda.pvq_matmul", "x", x, FLOAT_DTYPES)
    if bias is not None:
        check_tensor("pvq_cuda.pvq_matmul", "bias", bias, FLOAT_DTYPES)
    return torch.ops.pvq_cuda.pvq_matmul.default(x, codes, row_scale, levels, signs, bias, out_features, D, K,
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
