"""ActivationConfig: how a layer's input activations are PVQ-coded online (paper.md §7), its
presets, and the coded activations with their W+A product.

A token (one row of a linear layer's input, n values) is rotated with the layer's own Hadamard
rotation, cut into groups of D, and each group stored as a pyramid index (``index_bits(D, K)``
bits) and a gain code (``gain_bits``) relative to the token's norm, plus one fp16 scale per token:

    bits per activation = (index_bits + gain_bits) / D + 16 / n

(the gain levels are data-free, Lloyd–Max for the Beta law of a group's energy share, and
recomputed from (D, n, gain_bits): nothing else is stored per token).

Massive tokens. A few tokens (the first of a sequence, in a few layers' inputs) have norms 10–460×
a layer's median and hold ~45 % of all activation energy; nearly one-hot before the rotation, they
are nearly flat after it, where per-token INT is almost exact and PVQ is not
(bench/results/activation-snr-cpu-2026-12-04.md). Such a token's error dominates the layer's output
error, so a token whose norm exceeds ``outlier_ratio`` × the layer's calibration median token norm
gets a second PVQ stage: its residual ``x - x̂`` coded again with the same config. The flag fits the
sign bit of the fp16 per-token scale (scales are positive) and costs nothing; the second stage costs
the full rate on the flagged tokens only (~0.04 % of tokens at ratio 4 on SmolLM2:
``ActivationCodes.bits_per_activation`` counts it).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

from ..ops import check_limits, encode_activations, hadamard_split, hadamard_transform, index_bits
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
        outlier_ratio: a token whose norm exceeds this multiple of the layer's calibration median
            token norm (``PVQLinear.input_norm``) gets a second, residual PVQ stage (the module doc
            says why); None: never. Layers without a calibration norm (data-free) code one stage.
    """

    D: int = 8
    K: int = 29
    gain_bits: int = 4
    outlier_ratio: float | None = 4.0

    def __post_init__(self) -> None:
        check_limits(self.D, self.K, "ActivationConfig")
        if isinstance(self.gain_bits, bool) or not isinstance(self.gain_bits, int) or not 0 <= self.gain_bits <= 8:
            raise ValueError(f"ActivationConfig: gain_bits must be an int in [0, 8], got {self.gain_bits!r}")
        r = self.outlier_ratio
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r)
                              or not r >= 1):
            raise ValueError(f"ActivationConfig: outlier_ratio must be None or a finite number >= 1 (a multiple of "
                             f"the median token norm), got {r!r}")

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

    def bits_per_activation(self, n: int, second_stage_share: float = 0.0) -> float:
        """Bits per activation of tokens of n values, everything counted: (index + gain bits) / D +
        16 / n a stage, times (1 + the share of tokens flagged for a second stage)."""
        return (self.code_bpa + SCALE_BITS_PER_TOKEN / n) * (1 + second_stage_share)

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


def is_input_norm(value) -> bool:
    """Whether ``value`` can be a layer's calibration median token norm: a positive finite number."""
    return (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            and value > 0)


@functools.lru_cache(maxsize=64)
def _levels(D: int, n: int, bits: int) -> torch.Tensor:
    return torch.tensor(beta_gain_levels(D, n, bits, high_rate_start=True), dtype=torch.float32)


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
    """Coded activations ``[..., n]`` (from :func:`code_activations`), in the rotated basis.

    ``outliers`` (int64 ``[m]``) are the flagged tokens, as row numbers of the tokens flattened to
    ``[-1, n]``, and ``residual`` the codes ``[m, n]`` of their second stage (module doc); both
    None when no token is flagged. The tokens are ``x̂' = stage one + stage two`` on those rows.
    """

    pulses: torch.Tensor  # int8 [..., n]
    index: torch.Tensor   # int64 [..., n / D]: the stored code, with gain
    gain: torch.Tensor    # uint8 [..., n / D]
    scale: torch.Tensor   # float16 [...]
    levels: torch.Tensor  # float32 [2**gain_bits]
    config: ActivationConfig
    outliers: torch.Tensor | None = None
    residual: "ActivationCodes | None" = None

    def dequantize(self) -> torch.Tensor:
        """float32 ``x̂' [..., n]``: scale · level[gain] · y / |y| per group (rotated basis), plus
        the second stage on the flagged tokens."""
        D = self.config.D
        y = self.pulses.view(*self.pulses.shape[:-1], -1, D).float()
        factor = self.scale.float().unsqueeze(-1) * self.levels[self.gain.long()] * torch.rsqrt(y.square().sum(-1))
        out = (factor.unsqueeze(-1) * y).view(self.pulses.shape)
        if self.residual is not None:
            out.view(-1, out.shape[-1]).index_add_(0, self.outliers, self.residual.dequantize())
        return out

    @property
    def tokens(self) -> int:
        return self.scale.numel()

    @property
    def outlier_count(self) -> int:
        return 0 if self.outliers is None else self.outliers.numel()

    def bits_per_activation(self) -> float:
        """Bits per activation of these codes: one stage per token, a second on the flagged ones
        (codes made inside torch.compile carry a second stage for every token, zero where not
        flagged, and count it)."""
        return self.config.bits_per_activation(self.pulses.shape[-1], self.outlier_count / max(self.tokens, 1))


def code_activations(x: torch.Tensor, config: ActivationConfig, signs: torch.Tensor | None,
                     levels: torch.Tensor | None = None, input_norm: float | None = None) -> ActivationCodes:
    """PVQ codes of activations ``x [..., n]`` rotated by ``R = H·diag(signs)/sqrt(n)`` (a layer's
    rotation; see :func:`pvq_cuda.ops.encode_activations` for each step).

    ``input_norm``: the layer's calibration median token norm. With it (and
    ``config.outlier_ratio``), every token whose norm exceeds ``outlier_ratio · input_norm`` gets a
    second stage: ``x - Rᵀ x̂'`` (float32) coded the same way (module doc). On CUDA, finding the
    flagged tokens synchronizes once.
    """
    if levels is None:
        levels = activation_levels(config, x.shape[-1]).to(x.device)
    if input_norm is not None and not is_input_norm(input_norm):
        raise ValueError(f"code_activations: input_norm must be None or a positive finite number, got "
                         f"{input_norm!r}")
    pulses, index, gain, scale = encode_activations(x, signs, levels, config.D, config.K, config.gain_bits)
    codes = ActivationCodes(pulses, index, gain, scale, levels, config)
    if input_norm is None or config.outlier_ratio is None:
        return codes
    n = x.shape[-1]
    flat = x.detach().reshape(-1, n)
    flagged = flat.float().norm(dim=-1) > config.outlier_ratio * input_norm
    if torch.compiler.is_compiling():
        # No data-dependent shapes in a graph: every token gets a second stage, zero (scale 0,
        # adding exactly nothing) where it is not flagged. Same values, more work.
        rows = torch.arange(flat.shape[0], device=flat.device)
    else:
        rows = torch.nonzero(flagged).flatten()
        if rows.numel() == 0:
            return codes
    first = codes._replace(pulses=pulses.view(-1, n)[rows], index=index.view(-1, index.shape[-1])[rows],
                           gain=gain.view(-1, gain.shape[-1])[rows], scale=scale.reshape(-1)[rows])
    coded = hadamard_transform(first.dequantize(), None)  # Rᵀ = diag(signs)·H/sqrt(n): H is symmetric
    if signs is not None:
        coded = coded * signs.float()
    rest = (flat[rows].float() - coded) * flagged[rows].unsqueeze(-1)
    residual = code_activations(rest, config, signs, levels)
    return codes._replace(outliers=rows, residual=residual)


def wa_matmul(codes: ActivationCodes, weight: PVQWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x̂' Ŵ'ᵀ + bias`` in float32 ``[..., out_features]``: coded activations times a packed PVQ
    weight, as integer pulse dot products per block times gain products (paper.md §7). The codes
    must come from the weight's own rotation (``weight.signs``)."""
    c, a = weight.config, codes.config
    if codes.pulses.shape[-1] != weight.in_features:
        raise ValueError(f"wa_matmul: the activations have {codes.pulses.shape[-1]} values per token, the weight "
                         f"has in_features={weight.in_features}")
    out = _wa_matmul_op(codes.pulses, codes.gain, codes.scale, codes.levels, weight.codes, weight.row_scale,
                        weight.levels, bias, weight.out_features, c.D, c.K, c.scale_bits, a.D, a.K)
    if codes.residual is not None:
        out.view(-1, out.shape[-1]).index_add_(0, codes.outliers, wa_matmul(codes.residual, weight))
    return out
