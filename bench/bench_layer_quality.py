"""Quality of one synthetic layer under the Hessian metric: PVQ (data-free, Hessian-aware) against
RTN and GPTQ (plain and Hadamard-rotated) at matching rates, all counted in bits per weight.

The layer: W [256, 512] N(0,1) with 4 outlier input columns (x12); inputs X = Z·A with per-column
scales 0.2..3 and a random mixing A (correlated, uneven), H = 2/N XᵀX damped by 0.01. The loss is
tr((W−Ŵ) H (W−Ŵ)ᵀ) / tr(W H Wᵀ), the relative output error on the calibration inputs.

    python bench/bench_layer_quality.py --out bench/results/layer_quality.md
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch

import pvq_cuda
from pvq_cuda import baselines
from pvq_cuda.quantization.error_feedback import hessian_loss
from pvq_cuda.quantization.hessian import damp_hessian
from bench_common import emit, git_commit


def synthetic_layer(n: int = 512, rows: int = 256, tokens: int = 8192, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=gen) / n**0.5 + 0.1 * torch.eye(n)
    X = (torch.randn(tokens, n, generator=gen) * torch.linspace(0.2, 3, n)) @ mix
    W = torch.randn(rows, n, generator=gen)
    W[:, :4] *= 12
    return W, damp_hessian(2 / tokens * X.T @ X, 0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    args = parser.parse_args()
    W, H = synthetic_layer()
    rows = []

    def add(name, fn):
        t0 = time.perf_counter()
        w_hat, bpw = fn()
        rows.append((name, bpw, hessian_loss(W, w_hat, H), time.perf_counter() - t0))
        print(f"{name:<40} {bpw:6.3f} bpw  loss {rows[-1][2]:.5f}", flush=True)

    for bits, preset in ((2, "pvq-2.25"), (3, "pvq-3.25"), (4, "pvq-4.25")):
        add(f"RTN INT{bits} g128", lambda: baselines.rtn_quantize(W, bits))
        add(f"GPTQ INT{bits} g128", lambda: baselines.gptq_quantize(W, H, bits))
        add(f"GPTQ INT{bits} g128 rotated, act-order",
            lambda: baselines.gptq_quantize(W, H, bits, rotate=True, act_order=True))
        cfg = pvq_cuda.PVQConfig.preset(preset)
        for label, kwargs in (("data-free", None), ("Hessian-aware", {}),
                              ("Hessian-aware, act-order, metric search", {"act_order": True, "metric_search": True})):
            def run(kwargs=kwargs):
                q = pvq_cuda.quantize_weight(W, cfg) if kwargs is None else pvq_cuda.quantize_weight(W, cfg, H, **kwargs)
                return q.dequantize(), q.bpw
            add(f"{preset} {label}", run)
    commit = git_commit()
    lines = [f"# Synthetic layer quality ({datetime.date.today()}, commit {commit}, CPU)", "",
             "Relative Hessian-weighted error tr((W-Ŵ)H(W-Ŵ)ᵀ)/tr(WHWᵀ); see bench/bench_layer_quality.py.", "",
             "| method | bpw | loss | seconds |", "|---|---|---|---|"]
    lines += [f"| {n} | {b:.3f} | {loss:.5f} | {t:.2f} |" for n, b, loss, t in rows]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
