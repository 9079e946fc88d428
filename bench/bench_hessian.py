"""hessian_accumulate_ against torch ``H.addmm_(x.float().T, x.float())`` (TF32 off), same run.

Reports the median time of repeated runs, the speedup, and both results' relative Frobenius
error against an fp64 reference.

    python bench/bench_hessian.py                         # CUDA if present: n=4096, 16k bf16 tokens
    python bench/bench_hessian.py --device cpu --n 1024 --tokens 4096
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

import pvq_cuda
from bench_common import append_json, emit, git_commit


def _median(fn, device: str, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    cuda = torch.cuda.is_available() and pvq_cuda.cuda_built()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if cuda else "cpu")
    parser.add_argument("--n", type=int, nargs="+")
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", help="also write the report (markdown) to this file")
    parser.add_argument("--json", help="append the rows as one JSON line to this file")
    args = parser.parse_args()
    device = args.device
    sizes = args.n or ([1024, 2048, 4096, 8192] if device == "cuda" else [576, 1024])
    tokens = args.tokens or (16384 if device == "cuda" else 4096)
    dtype = getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    commit = git_commit()
    lines = [f"# hessian_accumulate_ vs torch addmm_ (fp32, TF32 off) on {name}, {datetime.date.today()}, "
             f"commit {commit}, {tokens} {args.dtype} tokens, median of {args.repeats}", "",
             "| n | pvq ms | torch ms | speedup | pvq rel. error | torch rel. error |", "|---|---|---|---|---|---|"]
    records = []
    for n in sizes:
        x = torch.randn(tokens, n, device=device).to(dtype)
        H = torch.zeros(n, n, device=device)
        t_pvq = _median(lambda: pvq_cuda.hessian_accumulate_(H.zero_(), x), device, args.repeats)
        Hp = H.clone()
        t_torch = _median(lambda: H.zero_().addmm_(x.float().T, x.float()), device, args.repeats)
        Ht = H.clone()
        ref = x.double().T @ x.double()
        err = lambda A: float((A.double() - ref).norm() / ref.norm())  # noqa: E731
        lines.append(f"| {n} | {t_pvq * 1e3:.2f} | {t_torch * 1e3:.2f} | {t_torch / t_pvq:.2f}x | {err(Hp):.1e} "
                     f"| {err(Ht):.1e} |")
        print(lines[-1], flush=True)
        records.append({"n": n, "tokens": tokens, "dtype": args.dtype, "pvq_ms": t_pvq * 1e3, "torch_ms": t_torch * 1e3,
                        "speedup": t_torch / t_pvq, "pvq_rel_error": err(Hp), "torch_rel_error": err(Ht)})
    emit(lines, args.out)
    append_json(args.json, {"bench": "hessian", "device": name, "commit": commit, "rows": records})


if __name__ == "__main__":
    main()
