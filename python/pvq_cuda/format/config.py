"""PVQConfig: how a linear layer's weight is quantized, and the named presets (paper.md §5)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..ops import check_limits, index_bits

MAX_CODE_BITS = 64  # index + gain code of one group: the packed kernels read at most 64 bits a group


@dataclass(frozen=True)
class PVQConfig:
    """Quantization settings of one layer.

    Attributes:
        D: group size (weights per pyramid vector): 1, 2, 4, 8, 16 or 32.
        K: pulses per group (the pyramid P(D, K)).
        scale_bits: bits of the per-group gain code (b_s in paper.md §4), 0..8.
        rotate: apply the randomized Hadamard rotation before quantizing (recommended).
        seed: seed of the rotation's random signs (stored with the layer).
    """

    D: int = 16
    K: int = 30
    scale_bits: int = 2
    rotate: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_limits(self.D, self.K, "PVQConfig")
        if isinstance(self.scale_bits, bool) or not isinstance(self.scale_bits, int) or not 0 <= self.scale_bits <= 8:
            raise ValueError(f"PVQConfig: scale_bits must be an int in [0, 8], got {self.scale_bits!r}")
        if self.code_bits > MAX_CODE_BITS:
            raise ValueError(
                f"PVQConfig: index bits + scale_bits must be <= {MAX_CODE_BITS}, got "
                f"{index_bits(self.D, self.K)} + {self.scale_bits} for D={self.D}, K={self.K}"
            )
        if not isinstance(self.rotate, bool):
            raise ValueError(f"PVQConfig: rotate must be a bool, got {self.rotate!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"PVQConfig: seed must be an int in [0, 2**63), got {self.seed!r}")

    @property
    def index_bits(self) -> int:
        return index_bits(self.D, self.K)

    @property
    def code_bits(self) -> int:
        """Stored bits per group: index plus gain code."""
        return index_bits(self.D, self.K) + self.scale_bits

    @property
    def code_bpw(self) -> float:
        """Bits per weight of the group codes alone (row scales and tables excluded)."""
        return self.code_bits / self.D

    @classmethod
    def preset(cls, name: str, **overrides) -> "PVQConfig":
        """A named preset (see PRESETS), optionally with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"PVQConfig.preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**asdict(PRESETS[name]), **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


# Measured choices (README "Presets"): at a fixed rate, D=16 beats D=8 under Hessian-aware
# quantization (SmolLM2 held-out perplexity 1.146x against 1.199x fp32 at 3.25 bpw, 1.92x against
# 2.36x at 2.25), and at 4.25 bpw 4 gain bits with K=29 beat 2 gain bits with K=36 (23.0 against
# 20.1 dB on Gaussian rows; 1.043x against 1.104x). D=16 cannot reach 4.25 bpw within 64 code
# bits. The D=8 points (pvq8-*) keep every index below 2^32 (24-30 bits), which a decoder can split
# in 32-bit arithmetic; D=16's top node needs 64 (50 bits at pvq-3.25).
PRESETS: dict[str, PVQConfig] = {
    "pvq-2.25": PVQConfig(D=16, K=14, scale_bits=1),
    "pvq-3.25": PVQConfig(D=16, K=30, scale_bits=2),
    "pvq-4.25": PVQConfig(D=8, K=29, scale_bits=4),
    "pvq16-3.25": PVQConfig(D=16, K=30, scale_bits=2),
    "pvq8-2.25": PVQConfig(D=8, K=7, scale_bits=1),
    "pvq8-3.25": PVQConfig(D=8, K=16, scale_bits=2),
}
DEFAULT_PRESET = "pvq-3.25"
