"""The demo job: PVQ a random Gaussian matrix and compare it with INT3/INT4 round-to-nearest.

Runs the real codec end to end (search -> encode -> decode) and counts every stored bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .counting import index_bits
from .gain import beta_gain_levels
from .ops import decode, encode, search

# (name, D, K, gain bits): the paper's rates (paper.md §5).
DEMO_PRESETS = (
    ("pvq-2.25", 8, 6, 3),
    ("pvq-3.25", 8, 16, 2),
    ("pvq-4.25", 8, 36, 2),
    ("pvq16-3.25", 16, 30, 2),
)


@dataclass
class DemoRow:
    method: str
    bpw: float
    sqnr_db: float
    seconds: float


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    w, w_hat = w.double(), w_hat.double()
    return float(10 * torch.log10(w.square().sum() / (w - w_hat).square().sum()))


def pvq_quantize(w: torch.Tensor, D: int, K: int, gain_bits: int) -> tuple[torch.Tensor, float]:
    """Data-free PVQ of the rows of w (fp32): returns the reconstruction and its bits per weight."""
    rows, n = w.shape
    scale = w.norm(dim=1, keepdim=True).half().float()  # one fp16 scale per row
    groups = w.reshape(rows, n // D, D)
    pulses = decode(encode(search(groups, K), K), D, K).float()  # through the stored index
    direction = pulses / pulses.norm(dim=-1, keepdim=True)
    gain = (groups * direction).sum(-1) / scale  # least-squares gain, relative to the row
    levels = torch.tensor(beta_gain_levels(D, n, gain_bits), dtype=torch.float32)
    code = (gain.unsqueeze(-1) - levels).abs().argmin(-1)
    w_hat = (scale.unsqueeze(-1) * levels[code].unsqueeze(-1) * direction).reshape(rows, n)
    bits = rows * (n // D) * (index_bits(D, K) + gain_bits) + rows * 16 + levels.numel() * 32
    return w_hat, bits / w.numel()


def rtn_quantize(w: torch.Tensor, bits: int, group: int = 128) -> tuple[torch.Tensor, float]:
    """Asymmetric round-to-nearest with an fp16 scale and fp16 minimum per group."""
    rows, n = w.shape
    g = w.reshape(rows, n // group, group)
    lo = g.amin(-1, keepdim=True).half().float()
    step = ((g.amax(-1, keepdim=True) - lo) / (2**bits - 1)).half().float().clamp_min(1e-12)
    q = ((g - lo) / step).round().clamp(0, 2**bits - 1)
    return (q * step + lo).reshape(rows, n), bits + 32 / group


def run_demo(rows: int = 4096, cols: int = 4096, seed: int = 0) -> list[DemoRow]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    out = []
    for name, D, K, gain_bits in DEMO_PRESETS:
        t0 = time.perf_counter()
        w_hat, bpw = pvq_quantize(w, D, K, gain_bits)
        out.append(DemoRow(f"{name} (D={D}, K={K}, {gain_bits}-bit gain)", bpw, sqnr_db(w, w_hat),
                           time.perf_counter() - t0))
    for bits in (3, 4):
        t0 = time.perf_counter()
        w_hat, bpw = rtn_quantize(w, bits)
        out.append(DemoRow(f"INT{bits} RTN, group 128, asymmetric", bpw, sqnr_db(w, w_hat), time.perf_counter() - t0))
    return out


def format_demo(rows: list[DemoRow], shape: tuple[int, int]) -> str:
    lines = [f"Random N(0,1) matrix {shape[0]}x{shape[1]} (Shannon bound: 6.02 dB per bit)",
             f"{'method':<44} {'bpw':>6} {'SQNR dB':>8} {'time s':>7}"]
    lines += [f"{r.method:<44} {r.bpw:>6.3f} {r.sqnr_db:>8.2f} {r.seconds:>7.2f}" for r in rows]
    return "\n".join(lines)
