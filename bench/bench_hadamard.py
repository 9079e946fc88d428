"""Speed of hadamard_transform against a copy of the same tensor (torch.clone).

The transform reads and writes each element once, so a clone (which also allocates its output) is
its bound; the ratio column is transform time / clone time (1.0 = copy speed).

CPU: one thread, timed by thread CPU time (these machines are shared and noisy), median of
repeated runs, tensors of about --cpu-mb MB. CUDA: CUDA events, median of repeated runs, tensors
of about --cuda-mb MB (larger than L2, so both sides stream from DRAM).

    python bench/bench_hadamard.py                      # CPU, and CUDA when present
    python bench/bench_hadamard.py --device cuda --out bench/results/hadamard.md
    python bench/bench_hadamard.py --device cuda --sizes 4096 14336 --json results.json
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

import pvq_cuda
from bench_common import append_json, emit, git_commit

SIZES = [256, 512, 576, 1024, 1536, 2048, 4096, 8192, 14336, 16384]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _median_cpu(fn, repeats: int) -> float:
    for _ in range(3):  # settle glibc's mmap threshold, so later clones reuse pages instead of faulting
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return statistics.median(times)


def _median_cuda(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def bench(device: str, megabytes: float, repeats: int, sizes: list[int], dtypes: list[torch.dtype],
          records: list[dict]) -> list[str]:
    """The report's table; one dict per row is appended to ``records``."""
    timer = _median_cuda if device == "cuda" else _median_cpu
    rows = [
        "| dtype | shape | clone µs | transform µs | with signs µs | transform GB/s | ratio to clone |",
        "|---|---|---|---|---|---|---|",
    ]
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        elem = torch.finfo(dtype).bits // 8
        for n in sizes:
            batch = max(1, int(megabytes * 2**20) // (n * elem))
            x = torch.randn(batch, n, generator=gen).to(dtype).to(device)
            signs = (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(torch.float32).to(device)
            t_copy = timer(lambda: torch.clone(x), repeats)
            t_had = timer(lambda: pvq_cuda.hadamard_transform(x), repeats)
            t_signs = timer(lambda: pvq_cuda.hadamard_transform(x, signs), repeats)
            nbytes = 2 * x.numel() * elem  # read + write
            rows.append(
                f"| {str(dtype).removeprefix('torch.')} | {batch}×{n} | {t_copy * 1e6:,.0f} | {t_had * 1e6:,.0f} "
                f"| {t_signs * 1e6:,.0f} | {nbytes / t_had / 1e9:,.1f} | {t_had / t_copy:.2f} |"
            )
            records.append({"device": device, "dtype": str(dtype).removeprefix("torch."), "n": n, "rows": batch,
                            "clone_us": t_copy * 1e6, "transform_us": t_had * 1e6, "signs_us": t_signs * 1e6,
                            "gbps": nbytes / t_had / 1e9, "ratio": t_had / t_copy,
                            "ratio_signs": t_signs / t_copy})
            del x
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--cpu-mb", type=float, default=8.0, help="tensor size on the CPU, MB")
    parser.add_argument("--cuda-mb", type=float, default=128.0, help="tensor size on CUDA, MB (64-256)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="row lengths n")
    parser.add_argument("--dtypes", nargs="+", default=[str(d).removeprefix("torch.") for d in DTYPES])
    parser.add_argument("--out", help="also write the report (markdown) to this file")
    parser.add_argument("--json", help="append the rows as one JSON line to this file")
    args = parser.parse_args()
    dtypes = [getattr(torch, d) for d in args.dtypes]
    records: list[dict] = []

    commit = git_commit()
    report = [f"# bench_hadamard ({datetime.date.today()}, commit {commit}, torch {torch.__version__})", ""]
    if args.device in ("cpu", "all"):
        torch.set_num_threads(1)
        report += [f"## CPU, 1 thread: {platform.processor() or platform.machine()}; ~{args.cpu_mb:g} MB per tensor, "
                   f"median of {args.repeats} (thread CPU time)", ""]
        report += bench("cpu", args.cpu_mb, args.repeats, args.sizes, dtypes, records) + [""]
    if args.device in ("cuda", "all") and torch.cuda.is_available() and pvq_cuda.cuda_built():
        report += [f"## CUDA: {torch.cuda.get_device_name()}; ~{args.cuda_mb:g} MB per tensor, "
                   f"median of {args.repeats} (CUDA events)", ""]
        report += bench("cuda", args.cuda_mb, args.repeats, args.sizes, dtypes, records) + [""]
    elif args.device == "cuda":
        raise SystemExit("bench_hadamard: no CUDA device or pvq_cuda built without CUDA")
    emit(report, args.out)
    append_json(args.json, {"bench": "hadamard", "commit": commit, "repeats": args.repeats, "rows": records})


if __name__ == "__main__":
    main()
