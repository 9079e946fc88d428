"""ActivationConfig: how a layer's input activations are PVQ-coded online (paper.md §7), its
presets, and the coded activations with their W+A product.

A token (one row of a linear layer's input, n values) is rotated with the layer's own Hadamard
rotation, cut into groups of D, and each group stored as a pyramid index (``index_bits(D, K)``
bits) and a gain code (``gain_bits``) relative to the token's norm, plus one fp16 scale per token:

    bits per activation = (index_bits + gain_bits) / D + 16 / n

(the gain levels are data-free, Lloyd–Max for the Beta law of a group's energy share, and
recomputed from (D, n, gain_bits): nothing else is stored per token).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

from ..ops import check_limits, encode_activations, hadamard_split, index_bits
from ..ops import wa_matmul as _wa_matmul_op
from .gain import beta_gain_levels
from .weight import PVQWeight

SCALE_BITS_PER_TOKEN = 16  # the fp16 per-token scale


@dataclass(frozen=True)
class ActivationConfig:
    """Online PVQ coding of a layer's input activations.

    Attributes:
        D: activations per group (1, 2, 4, 8, 16 or 32).
        K: pulses per group (the pyramid P(D, K); the codec's limits, K <= 127 so pulses are int8).
        gain_bits: bits of each group's gain code, 0..8.
    """

    D: int = 8
    K: int = 29
    gain_bits: int = 4

    def __post_init__(self) -> None:
        check_limits(self.D, self.K, "ActivationConfig")
        if isinstance(self.gain_bits, bool) or not isinstance(self.gain_bits, int) or not 0 <= self.gain_bits <= 8:
            raise ValueError(f"ActivationConfig: gain_bits must be an int in [0, 8], got {self.gain_bits!r}")

    @property
    def index_bits(self) -> int:
        return index_bits(self.D, self.K)

    @property
    def code_bits(self) -> int:
        """Bits per group: index plus gain code."""
        return self.index_bits + self.gain_bits

    @property
    def code_bpa(self) -> float:
        """Bits per activation of the group codes alone (the per-token scale excluded)."""
        return self.code_bits / self.D

    def bits_per_activation(self, n: int) -> float:
        """Bits per activation of a token of n values, everything counted: (index + gain bits) / D + 16 / n."""
        return self.code_bpa + SCALE_BITS_PER_TOKEN / n

    @classmethod
    def preset(cls, name: str, **overrides) -> "ActivationConfig":
        """A named preset (see ACT_PRESETS), optionally with fields overridden."""
        if name not in ACT_PRESETS:
            raise ValueError(f"ActivationConfig.preset: unknown preset {name!r}; choose one of "
                             f"{', '.join(ACT_PRESETS)}")
        return cls(**{**asdict(ACT_PRESETS[name]), **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


# Measured choices (README "W+A"): SQNR of rotated SmolLM2 linear inputs (16 layers x 256 tokens)
# and of Gaussian rows, every split of the same bits compared. At 4.25: D=8, K=29 + 4 gain bits
# 22.8 dB (K=32 + 3: 22.4, K=36 + 2: 20.1; D=16, K=56 + 5 is 0.3 dB better but needs 63-bit
# indices); at 6.25: D=8, K=119 + 6 gain bits 34.9 dB (K=127 + 5: 34.1, K=108 + 7: 34.5; D=4 at
# best 34.1). Near 8 bits the int8 pulses (K <= 127) bind: D=8 cannot go past 6.6 bits, D=4 past
# 7.75 + gain bits; D=2, K=127 is the best split left, 7 gain bits (8.0 bits: 42.1 dB) or 8
# (8.5 bits: 44.9 dB). Per-token INT8 of the same rotated inputs gives 43.0 dB at 8.0 bits.
ACT_PRESETS: dict[str, ActivationConfig] = {
    "pvq-a4.25": ActivationConfig(D=8, K=29, gain_bits=4),
    "pvq-a6.25": ActivationConfig(D=8, K=119, gain_bits=6),
    "pvq-a8": ActivationConfig(D=2, K=127, gain_bits=7),
    "pvq-a8.5": ActivationConfig(D=2, K=127, gain_bits=8),
}


def as_activation_config(value, where: str) -> ActivationConfig | None:
    """An ActivationConfig from a config, a preset name or None; TypeError/ValueError naming ``where``."""
    if value is None or isinstance(value, ActivationConfig):
        return value
    if isinstance(value, str):
        if value not in ACT_PRESETS:
            raise ValueError(f"{where}: unknown activation preset {value!r}; choose one of {', '.join(ACT_PRESETS)}")
        return ACT_PRESETS[value]
    raise TypeError(f"{where}: the activation config must be an ActivationConfig, a preset name or None, got "
                    f"{type(value).__name__}")


@functools.lru_cache(maxsize=64)
def _levels(D: int, n: int, bits: int) -> torch.Tensor:
    return torch.tensor(beta_gain_levels(D, n, bits), dtype=torch.float32)


def activation_levels(config: ActivationConfig, n: int) -> torch.Tensor:
    """The gain levels of ``config`` for tokens of n values: float32 ``[2**gain_bits]`` (a copy)."""
    return _levels(config.D, n, config.gain_bits).clone()


def check_activation_shape(config: ActivationConfig, n: int, where: str) -> None:
    """ValueError naming ``where`` unless tokens of n values can be coded with ``config``."""
    if n % config.D:
        raise ValueError(f"{where}: the hidden size n={n} must be a multiple of the activation group size "
                         f"D={config.D}")
    if hadamard_split(n) is None:
        raise ValueError(f"{where}: the hidden size n={n} must be a Hadamard size (m * 2^k, m in 1, 12, 20, 28, "
                         f"36, 52, 60) for the activation rotation")


class ActivationCodes(NamedTuple):
    """Coded activations ``[..., n]`` (from :func:`code_activations`), in the rotated basis."""

    pulses: torch.Tensor  # int8 [..., n]
    index: torch.Tensor   # int64 [..., n / D]: the stored code, with gain
    gain: torch.Tensor    # uint8 [..., n / D]
    scale: torch.Tensor   # float16 [...]
    levels: torch.Tensor  # float32 [2**gain_bits]
    config: ActivationConfig

    def dequantize(self) -> torch.Tensor:
        """float32 ``x̂' [..., n]``: scale · level[gain] · y / |y| per group (rotated basis)."""
        D = self.config.D
        y = self.pulses.view(*self.pulses.shape[:-1], -1, D).float()
        factor = self.scale.float().unsqueeze(-1) * self.levels[self.gain.long()] * torch.rsqrt(y.square().sum(-1))
        return (factor.unsqueeze(-1) * y).view(self.pulses.shape)

    def bits_per_activation(self) -> float:
        return self.config.bits_per_activation(self.pulses.shape[-1])


def code_activations(x: torch.Tensor, config: ActivationConfig, signs: torch.Tensor | None,
                     levels: torch.Tensor | None = None) -> ActivationCodes:
    """PVQ codes of activations ``x [..., n]`` rotated by ``R = H·diag(signs)/sqrt(n)`` (a layer's
    rotation; see :func:`pvq_cuda.ops.encode_activations` for each step)."""
    if levels is None:
        levels = activation_levels(config, x.shape[-1]).to(x.device)
    pulses, index, gain, scale = encode_activations(x, signs, levels, config.D, config.K, config.gain_bits)
    return ActivationCodes(pulses, index, gain, scale, levels, config)


def wa_matmul(codes: ActivationCodes, weight: PVQWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x̂' Ŵ'ᵀ + bias`` in float32 ``[..., out_features]``: coded activations times a packed PVQ
    weight, as integer pulse dot products per block times gain products (paper.md §7). The codes
    must come from the weight's own rotation (``weight.signs``)."""
    c, a = weight.config, codes.config
    if codes.pulses.shape[-1] != weight.in_features:
        raise ValueError(f"wa_matmul: the activations have {codes.pulses.shape[-1]} values per token, the weight "
                         f"has in_features={weight.in_features}")
    return _wa_matmul_op(codes.pulses, codes.gain, codes.scale, codes.levels, weight.codes, weight.row_scale,
                         weight.levels, bias, weight.out_features, c.D, c.K, c.scale_bits, a.D, a.K)
