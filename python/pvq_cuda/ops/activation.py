"""The activation ops (paper.md §7): online PVQ coding of activations and the W+A matmul.

``encode_activations`` rotates each token (row) with the layer's randomized Hadamard transform,
codes every group of D with the codec's search and encode, and gives each group a gain code
relative to the token's norm plus one fp16 scale per token (csrc/activation/activation_code.h
defines each step and its rounding). ``wa_matmul`` multiplies such codes with a packed PVQ layer:
per block of ``min(D, act_D)`` columns an integer pulse dot product times the two groups' gains
(on CUDA: the activations decoded, then pvq_matmul's kernels).
"""

from __future__ import annotations

import torch

from .checks import FLOAT_DTYPES, check_last_dim, check_tensor
from .counting import check_limits
from .hadamard import hadamard_split

_SIGN_DTYPES = (torch.float32, torch.int8)


def _check_gain_bits(op: str, gain_bits) -> None:
    if isinstance(gain_bits, bool) or not isinstance(gain_bits, int) or not 0 <= gain_bits <= 8:
        raise ValueError(f"{op}: gain_bits must be an int in [0, 8], got {gain_bits!r}")


def _check_encode_args(x, signs, levels, D, K, gain_bits) -> int:
    op = "pvq_cuda.encode_activations"
    check_tensor(op, "x", x, FLOAT_DTYPES)
    n = check_last_dim(op, "x", x, "n")
    check_limits(D, K, op)
    _check_gain_bits(op, gain_bits)
    if hadamard_split(n) is None:
        raise ValueError(f"{op}: the hidden size n = x.shape[-1] must be a Hadamard size m * 2^k with m in "
                         f"{{1, 12, 20, 28, 36, 52, 60}} and n <= 32768, got n={n}")
    if n % D:
        raise ValueError(f"{op}: the hidden size n = x.shape[-1] must be a multiple of D={D}, got n={n}")
    if signs is not None:
        check_tensor(op, "signs", signs, _SIGN_DTYPES)
        if signs.dim() != 1 or signs.shape[0] != n:
            raise ValueError(f"{op}: signs must have shape [n] = [{n}], got {list(signs.shape)}")
        if signs.device != x.device:
            raise ValueError(f"{op}: signs must be on {x.device}, got {signs.device}")
    check_tensor(op, "levels", levels, (torch.float32,))
    if levels.dim() != 1 or levels.shape[0] != 1 << gain_bits:
        raise ValueError(f"{op}: levels must have shape [{1 << gain_bits}] (2^gain_bits gain levels), got "
                         f"{list(levels.shape)}")
    if levels.device != x.device:
        raise ValueError(f"{op}: levels must be on {x.device}, got {levels.device}")
    return n


def encode_activations(x: torch.Tensor, signs: torch.Tensor | None, levels: torch.Tensor, D: int, K: int,
                       gain_bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PVQ codes of activations ``x [..., n]``, token by token (paper.md §7).

    Each token is rotated, ``x' = H_n · diag(signs) · x / sqrt(n)`` in fp32 (exactly
    ``hadamard_transform(x.float(), signs)``), cut into groups of D, and each group coded as
    ``search(x'_j, K)`` (pulses) and ``encode(pulses, K)`` (index), bit for bit the codec ops on
    ``x'``. Its gain ``<x'_j, y>/|y|`` relative to ``|x'|`` is coded as the nearest of ``levels``
    (nearest by midpoints), and one fp16 scale per token is refit by least squares, so that
    ``x'_j ≈ scale · levels[gain_j] · y_j / |y_j|``.

    Args:
        x: float32, float16 or bfloat16 ``[..., n]``, finite; n a Hadamard size and a multiple of D.
        signs: the rotation's ±1 signs ``[n]`` (float32 or int8), or None for the plain transform.
        levels: float32 ``[2**gain_bits]`` gain levels in increasing order (``format.activation_levels``).
        D, K: group size and pulses (the codec's limits); gain_bits: 0..8.

    Returns:
        ``(pulses, index, gain, scale)``: int8 ``[..., n]`` (rotated basis), int64 ``[..., n/D]``,
        uint8 ``[..., n/D]`` and float16 ``[...]``. NaN/Inf in a token, or a token whose scale
        exceeds fp16's range, raise ValueError naming the token.
    """
    _check_encode_args(x, signs, levels, D, K, gain_bits)
    if levels.device.type == "cpu" and not torch.compiler.is_compiling() and bool((levels[1:] < levels[:-1]).any()):
        raise ValueError("pvq_cuda.encode_activations: levels must be in increasing order (gain codes are found by "
                         "bisection)")
    return torch.ops.pvq_cuda.encode_activations.default(x, signs, levels, D, K, gain_bits)


@torch.library.register_fake("pvq_cuda::encode_activations")
def _encode_activations_fake(x, signs, levels, D, K, gain_bits):
    n = _check_encode_args(x, signs, levels, D, K, gain_bits)
    lead = x.shape[:-1]
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*lead, n // D), dtype=torch.int64),
            x.new_empty((*lead, n // D), dtype=torch.uint8), x.new_empty(lead, dtype=torch.float16))


def _check_wa_args(pulses, gain, scale, act_levels, act_D, act_K, in_features) -> None:
    op = "pvq_cuda.wa_matmul"
    check_tensor(op, "pulses", pulses, (torch.int8,))
    n = check_last_dim(op, "pulses", pulses, "in_features")
    if in_features is not None and n != in_features:
        raise ValueError(f"{op}: pulses must have shape [..., {in_features}] (the layer's in_features), got "
                         f"{list(pulses.shape)}")
    check_limits(act_D, act_K, op)
    if n % act_D:
        raise ValueError(f"{op}: in_features ({n}) must be a multiple of act_D={act_D}")
    check_tensor(op, "gain", gain, (torch.uint8,))
    if tuple(gain.shape) != (*pulses.shape[:-1], n // act_D):
        raise ValueError(f"{op}: gain must have shape {[*pulses.shape[:-1], n // act_D]} (one code per group of "
                         f"act_D={act_D}), got {list(gain.shape)}")
    check_tensor(op, "scale", scale, (torch.float16,))
    if tuple(scale.shape) != tuple(pulses.shape[:-1]):
        raise ValueError(f"{op}: scale must have shape {list(pulses.shape[:-1])} (one per token), got "
                         f"{list(scale.shape)}")
    check_tensor(op, "act_levels", act_levels, (torch.float32,))
    count = act_levels.shape[0] if act_levels.dim() == 1 else 0
    if act_levels.dim() != 1 or not 1 <= count <= 256 or count & (count - 1):
        raise ValueError(f"{op}: act_levels must have shape [2^gain_bits], gain_bits in [0, 8], got "
                         f"{list(act_levels.shape)}")
    for name, t in (("gain", gain), ("scale", scale), ("act_levels", act_levels)):
        if t.device != pulses.device:
            raise ValueError(f"{op}: {name} must be on {pulses.device}, got {t.device}")


def _in_features(codes, row_scale, D, K, scale_bits) -> int | None:
    """The in_features a packed layer's codes hold (None when they do not fit whole groups: the
    kernel's own check names that)."""
    from .counting import index_bits

    check_limits(D, K, "pvq_cuda.wa_matmul")
    if not isinstance(codes, torch.Tensor) or not isinstance(row_scale, torch.Tensor) or row_scale.dim() != 1:
        return None
    per_group = ((row_scale.shape[0] + 31) // 32) * (index_bits(D, K) + scale_bits)
    return codes.numel() // per_group * D if per_group and codes.numel() % per_group == 0 else None


def wa_matmul(pulses: torch.Tensor, gain: torch.Tensor, scale: torch.Tensor, act_levels: torch.Tensor,
              codes: torch.Tensor, row_scale: torch.Tensor, levels: torch.Tensor, bias: torch.Tensor | None,
              out_features: int, D: int, K: int, scale_bits: int, act_D: int, act_K: int) -> torch.Tensor:
    """``x̂' @ Ŵ'ᵀ + bias`` of coded activations (from :func:`encode_activations`, in the rotated
    basis) and a packed PVQ layer (its codes, row scales and levels), float32 ``[..., out_features]``.

    On the CPU, per block of ``d = min(D, act_D)`` columns the product is the exact integer dot
    product of the two pulse vectors times the float factors ``(scale·act_level/|y_x|)·(level/|y_w|)``,
    summed over the blocks in order and times the row scale (paper.md §7). On CUDA the activations
    are decoded to float32 ``x̂'`` (the same factors, bit for bit) and multiplied by
    :func:`pvq_matmul`'s kernels: the same product within the float32 bound of the tests
    (``csrc/activation/decode.cu`` says why). Pulses whose groups do not sum to act_K, or gain codes
    past act_levels, raise ValueError (on CUDA one synchronization checks them, skipped during
    CUDA-graph capture, where such groups count as zeros); corrupt weight codes raise on the CPU and
    decode to zero weights on CUDA, as in :func:`pvq_matmul`.
    """
    _check_wa_args(pulses, gain, scale, act_levels, act_D, act_K, _in_features(codes, row_scale, D, K, scale_bits))
    return torch.ops.pvq_cuda.wa_matmul.default(pulses, gain, scale, act_levels, codes, row_scale, levels, bias,
                                                out_features, D, K, scale_bits, act_D, act_K)


@torch.library.register_fake("pvq_cuda::wa_matmul")
def _wa_matmul_fake(pulses, gain, scale, act_levels, codes, row_scale, levels, bias, out_features, D, K, scale_bits,
                    act_D, act_K):
    check_limits(D, K, "pvq_cuda.wa_matmul")
    _check_wa_args(pulses, gain, scale, act_levels, act_D, act_K, _in_features(codes, row_scale, D, K, scale_bits))
    return pulses.new_empty((*pulses.shape[:-1], out_features), dtype=torch.float32)
