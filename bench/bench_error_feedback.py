"""How long GPTQ's error feedback and the inverse Cholesky factor take on the default model's layer
shapes, each against the route it replaced (paired, interleaved runs; CPU unless --device).

- Inverse Cholesky factor U (H⁻¹ = UᵀU), at n = 576 and 1536: ``inverse_cholesky_upper`` (one
  Cholesky of the reversed H and a triangular inverse by halves) against GPTQ's route (Cholesky,
  ``cholesky_inverse``, a second Cholesky), which the project used until 2026-12-02.
- ``gptq_quantize`` (INT4 and INT3, g128) on one SmolLM2-135M block's seven linears (q 576x576,
  k and v 192x576, o 576x576, gate and up 1536x576, down 576x1536): with the width-1 column loop
  and the new factor (the code as it is) against the any-width block loop at width 1 and GPTQ's
  factor route (the code before). The default job's GPTQ pair runs this 30 times.

H is a synthetic Hessian of correlated inputs (2/T XᵀX, 1 % damping); the work does not depend on
the values. Each line reports the median of ``--repeats`` runs, min and max, and the ratio of the
medians. The two routes agree to float32 rounding; the report shows the largest difference.

    python bench/bench_error_feedback.py --repeats 5 --out bench/results/error-feedback-cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import statistics
import time

import torch

from bench_common import emit, git_commit
from pvq_cuda.quantization import baselines

error_feedback_module = importlib.import_module("pvq_cuda.quantization.error_feedback")

BLOCK_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def gptq_route_factor(H: torch.Tensor) -> torch.Tensor:
    """U with H⁻¹ = UᵀU the way GPTQ forms it: H⁻¹ from a Cholesky factor, then its upper Cholesky."""
    L = torch.linalg.cholesky(H.double())
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def block_loop(W, U, width, quantize_block, *, group=0, start_group=None):
    """``error_feedback`` forced onto the any-width loop (what width 1 ran before)."""
    return error_feedback_module._error_feedback_blocks(W, U.to(W.dtype), width, quantize_block, group, start_group)


def hessian(n: int, device, gen: torch.Generator) -> torch.Tensor:
    X = torch.randn(2048, n, generator=gen) * torch.rand(n, generator=gen) * 2
    X = X @ (torch.eye(n) + torch.randn(n, n, generator=gen) / n**0.5)
    H = 2 / 2048 * X.T @ X
    return (H + 0.01 * H.diagonal().mean() * torch.eye(n)).to(device)


def timed(fn, sync):
    """(seconds, what ``fn`` returned), with the device idle before and after."""
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out")
    args = p.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    where = f"{device.type}, {torch.get_num_threads()} threads"
    lines = [f"# GPTQ error feedback and the inverse Cholesky factor ({where})",
             "", f"commit {git_commit()}, {datetime.date.today()}, median of {args.repeats} interleaved runs "
             "(min-max); new = the code as it is, old = the route it replaced", "",
             "| what | new | old | old ÷ new | largest difference |", "| --- | ---: | ---: | ---: | ---: |"]

    for n in (576, 1536):
        H = hessian(n, device, gen)
        new_t, old_t = [], []
        for _ in range(args.repeats):  # interleaved, so that machine drift hits both alike
            t, U_new = timed(lambda: error_feedback_module.inverse_cholesky_upper(H), sync)
            new_t.append(t)
            t, U_old = timed(lambda: gptq_route_factor(H), sync)
            old_t.append(t)
        diff = float((U_new - U_old).abs().max())
        lines.append(_row(f"inverse Cholesky factor, n = {n} (float64)", new_t, old_t, f"{diff:.1e}", "ms", 1e3))

    data = [(torch.randn(N, n, generator=gen).to(device), hessian(n, device, gen)) for N, n in BLOCK_SHAPES]

    def one_block():
        return [baselines.gptq_quantize(W, H, bits, ragged=True)[0] for W, H in data for bits in (4, 3)]

    new_t, old_t = [], []
    for _ in range(args.repeats):
        t, new_q = timed(one_block, sync)
        new_t.append(t)
        saved = baselines.error_feedback, baselines.inverse_cholesky_upper
        baselines.error_feedback, baselines.inverse_cholesky_upper = block_loop, gptq_route_factor
        try:
            t, old_q = timed(one_block, sync)
            old_t.append(t)
        finally:
            baselines.error_feedback, baselines.inverse_cholesky_upper = saved
    # Rounding-level differences can move a weight across a grid midpoint, and error feedback
    # carries that on: the fraction of weights quantized differently says how often.
    moved = sum(int((a != b).sum()) for a, b in zip(new_q, old_q)) / sum(a.numel() for a in new_q)
    lines.append(_row("gptq_quantize INT4 + INT3 g128, one SmolLM2 block (7 linears)", new_t, old_t,
                      f"{moved:.2%} of weights", "s", 1))
    emit(lines, args.out)


def _row(what: str, new: list[float], old: list[float], diff: str, unit: str, scale: float) -> str:
    mn, mo = statistics.median(new), statistics.median(old)
    return (f"| {what} | {mn * scale:.3g} {unit} ({min(new) * scale:.3g}-{max(new) * scale:.3g}) | "
            f"{mo * scale:.3g} {unit} ({min(old) * scale:.3g}-{max(old) * scale:.3g}) | {mo / mn:.2f} | {diff} |")


if __name__ == "__main__":
    main()
