"""PVQWeight: the packed quantized weight of one linear layer, and its rotation signs."""

from __future__ import annotations

import numpy as np
import torch

from ..ops import dequantize_packed, hadamard_transform, matmul_packed, pyramid_size, unpack_codes
from ..ops.checks import check_float_input
from .config import PVQConfig
from .container import register_serializable

# The version of the packed layout (csrc/packed/packed_layer.h): PVQWeight.format_version and the
# checkpoint's quantization_config.format_version. The file container has its own FORMAT_VERSION.
LAYOUT_VERSION = 1
TILE_ROWS = 32  # rows per tile of the packed layout (csrc/packed/packed_layer.h)


def rotation_signs(n: int, seed: int) -> torch.Tensor:
    """The rotation's random ±1 diagonal S (float32 [n]) for a seed: splitmix64 of (seed, i).

    Defined here, bit by bit, so that a stored seed means the same rotation on every platform and
    torch version (torch's generators make no such promise).
    """
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (np.arange(n, dtype=np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy(np.where(z >> np.uint64(63), -1.0, 1.0).astype(np.float32))


def stored_bits(config: PVQConfig, out_features: int, in_features: int) -> int:
    """Every bit a layer of this shape stores under ``config``: the group codes of whole 32-row
    tiles, an fp16 scale per row, the fp32 level table and the 64-bit rotation seed."""
    tiles = -(-out_features // TILE_ROWS)
    codes = tiles * TILE_ROWS * (in_features // config.D) * config.code_bits
    return codes + 16 * out_features + 32 * (1 << config.scale_bits) + (64 if config.rotate else 0)


class PVQWeight:
    """A linear layer's weight ``[out_features, in_features]``, PVQ-coded and packed.

    Attributes:
        codes: int32 words in the tile-interleaved layout of csrc/packed/packed_layer.h.
        row_scale: float16 ``[out_features]``, each rotated row's norm refit by least squares.
        levels: float32 ``[2**scale_bits]`` gain levels (stored, so decoders never recompute them).
        out_features, in_features: the dense shape.
        config: the :class:`PVQConfig` (D, K, scale_bits, rotation and its seed).
        format_version: layout version (1).
    """

    def __init__(self, codes: torch.Tensor, row_scale: torch.Tensor, levels: torch.Tensor, out_features: int,
                 in_features: int, config: PVQConfig, format_version: int = LAYOUT_VERSION, *,
                 validate: bool = True, signs: torch.Tensor | None = None) -> None:
        if not isinstance(config, PVQConfig):
            raise TypeError(f"PVQWeight: config must be a PVQConfig, got {type(config).__name__}")
        if format_version != LAYOUT_VERSION:
            raise ValueError(f"PVQWeight: format_version {format_version} is not supported (this pvq_cuda reads "
                             f"version {LAYOUT_VERSION})")
        self.codes, self.row_scale, self.levels = codes, row_scale, levels
        self.out_features, self.in_features = int(out_features), int(in_features)
        self.config, self.format_version = config, format_version
        self._signs = signs  # optional precomputed rotation_signs(in_features, seed), e.g. a layer's buffer
        if validate:
            self._validate()

    # -- structure ------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def groups_per_row(self) -> int:
        return self.in_features // self.config.D

    @property
    def signs(self) -> torch.Tensor | None:
        """The rotation's ±1 signs on the weight's device, or None for an unrotated layer."""
        if not self.config.rotate:
            return None
        if self._signs is None or self._signs.device != self.device:
            self._signs = rotation_signs(self.in_features, self.config.seed).to(self.device)
        return self._signs

    @property
    def bpw(self) -> float:
        """Bits per weight over everything stored: codes (with tile padding), row scales, levels, seed."""
        return stored_bits(self.config, self.out_features, self.in_features) / (self.out_features * self.in_features)

    def _validate(self) -> None:
        c, n, N = self.config, self.in_features, self.out_features
        if N < 1 or n < 1 or n % c.D:
            raise ValueError(f"PVQWeight: shape ({N}, {n}) must be positive with in_features a multiple of D={c.D}")
        tiles = -(-N // TILE_ROWS)
        expect = {"codes": ((tiles * (n // c.D) * c.code_bits,), torch.int32),
                  "row_scale": ((N,), torch.float16),
                  "levels": ((1 << c.scale_bits,), torch.float32)}
        for name, (shape, dtype) in expect.items():
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"PVQWeight: {name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"PVQWeight: {name} must be {dtype} of shape {list(shape)}, "
                                 f"got {t.dtype} of shape {list(t.shape)}")
            if t.device != self.codes.device:
                raise ValueError(f"PVQWeight: {name} is on {t.device} but codes are on {self.codes.device}")
        if not torch.isfinite(self.row_scale).all() or (self.row_scale < 0).any():
            raise ValueError("PVQWeight: row_scale must be finite and >= 0")
        if not torch.isfinite(self.levels).all():
            raise ValueError("PVQWeight: levels must be finite")
        index, _ = self.unpack()
        V = pyramid_size(c.D, c.K)
        if (index >= V).any():
            row, col = (index >= V).nonzero()[0].tolist()
            raise ValueError(f"PVQWeight: code of row {row}, group {col} holds index {int(index[row, col])} "
                             f">= V({c.D},{c.K}) = {V}: corrupt codes")

    # -- decoding -------------------------------------------------------------------------------
    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, gain code) of every group, int64 ``[out_features, in_features / D]`` each."""
        c = self.config
        index, gain = unpack_codes(self.codes.cpu(), self.out_features, self.groups_per_row, c.index_bits,
                                   c.scale_bits)
        return index.to(self.device), gain.to(self.device)

    def dequantize(self, rotated: bool = False) -> torch.Tensor:
        """The float32 weight ``[out_features, in_features]`` in the original basis.

        With ``rotated=True``: in the rotated basis the codes live in (``W R^T``).
        """
        c = self.config
        w = dequantize_packed(self.codes, self.row_scale, self.levels, self.out_features, self.in_features, c.D, c.K,
                              c.scale_bits)
        if rotated or not c.rotate:
            return w
        # W' = W R^T with R = H S / sqrt(n) and H symmetric, so W = W' R = (H W'^T)^T S / sqrt(n).
        return hadamard_transform(w) * self.signs

    # -- movement and persistence ---------------------------------------------------------------
    def to(self, device) -> "PVQWeight":
        return PVQWeight(self.codes.to(device), self.row_scale.to(device), self.levels.to(device),
                         self.out_features, self.in_features, self.config, self.format_version, validate=False)

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        info = {"format_version": self.format_version, "out_features": self.out_features,
                "in_features": self.in_features, "config": self.config.to_dict()}
        return {"codes": self.codes, "row_scale": self.row_scale, "levels": self.levels}, info

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], info: dict) -> "PVQWeight":
        try:
            config = PVQConfig(**info["config"])
            return cls(tensors["codes"], tensors["row_scale"], tensors["levels"], int(info["out_features"]),
                       int(info["in_features"]), config, int(info["format_version"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"PVQWeight: incomplete or malformed state: {e!r}") from e

    def __repr__(self) -> str:
        c = self.config
        return (f"PVQWeight({self.out_features}x{self.in_features}, D={c.D}, K={c.K}, scale_bits={c.scale_bits}, "
                f"rotate={c.rotate}, bpw={self.bpw:.4f}, device={self.device})")


register_serializable("PVQWeight", PVQWeight)


def pvq_matmul(x: torch.Tensor, weight: PVQWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for a packed PVQ weight, rotation included.

    Args:
        x: float32, float16 or bfloat16 tensor ``[..., in_features]`` on the weight's device (float64
            on the CPU, computed in double).
        weight: a :class:`pvq_cuda.PVQWeight`.
        bias: optional ``[out_features]`` floating tensor.

    Returns:
        ``[..., out_features]`` in x's dtype. Codes are decoded on the fly; the dense weight is never
        materialized (CPU: per 32-row tile; CUDA: in registers). Differentiable in x (and bias): the
        input gradient ``grad @ W`` (``pvq_matmul_grad_input``) never materializes it whole either
        (decoded on the fly up to 8 rows of grad, bounded row blocks or tiles of ~32 M weights above).
    """
    if not isinstance(weight, PVQWeight):
        raise TypeError(f"pvq_cuda.pvq_matmul: weight must be a PVQWeight, got {type(weight).__name__}")
    check_float_input("pvq_cuda.pvq_matmul", "x", x)
    if x.dim() == 0 or x.shape[-1] != weight.in_features:
        raise ValueError(f"pvq_cuda.pvq_matmul: x must have shape [..., {weight.in_features}] (the weight's "
                         f"in_features), got {list(x.shape)}")
    c = weight.config
    return matmul_packed(x, weight.codes, weight.row_scale, weight.levels, weight.signs, bias, weight.out_features,
                         c.D, c.K, c.scale_bits)
