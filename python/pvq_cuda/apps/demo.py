"""The demo job: PVQ a random Gaussian matrix and compare it with INT3/INT4 round-to-nearest.

Runs the library's own path (rotation, search, index coding, packing, dequantization) and counts
every stored bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..format.config import PRESETS
from ..quantization.baselines import rtn_quantize
from ..quantization.quantize import quantize_weight


@dataclass
class DemoRow:
    method: str
    bpw: float
    sqnr_db: float
    seconds: float


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    w, w_hat = w.double(), w_hat.double()
    return float(10 * torch.log10(w.square().sum() / (w - w_hat).square().sum()))


def run_demo(rows: int = 4096, cols: int = 4096, seed: int = 0) -> list[DemoRow]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    out, seen = [], set()
    for name, config in PRESETS.items():
        if config in seen:  # an alias (pvq16-3.25 is pvq-3.25)
            continue
        seen.add(config)
        t0 = time.perf_counter()
        q = quantize_weight(w, config)
        w_hat = q.dequantize()
        out.append(DemoRow(f"{name} (D={config.D}, K={config.K}, {config.scale_bits}-bit gain)", q.bpw,
                           sqnr_db(w, w_hat), time.perf_counter() - t0))
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
