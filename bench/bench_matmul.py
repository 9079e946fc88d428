"""pvq_matmul against dense matmul: µs, effective GB/s and speedup, per batch size and layer shape.

CUDA: x @ W^T through pvq_matmul (rotation included) against cuBLAS fp16 (torch.matmul) in the
same run. Weight buffers rotate over copies totalling >= 4x the 50 MB L2, so every call streams
its weight from HBM; each timing is the median of repeated runs of a burst of calls between two
CUDA events (no host sync inside a burst, as in inference).
CPU: the same against torch fp32 ``x @ W.T``, wall clock with the default threads.

    python bench/bench_matmul.py                       # CUDA if present, else CPU (small grid)
    python bench/bench_matmul.py --device cpu --shapes 4096x4096 --batches 1
Writes bench/results/matmul-<device>-<date>.{md,json} (and .png when matplotlib is present).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch

import pvq_cuda
from bench_common import git_commit

SHAPES = ["4096x4096", "4096x14336", "14336x4096", "8192x8192", "8192x28672"]  # in_features x out_features
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128]
PEAK_GBPS = {"H100": 3350, "H200": 4800, "A100": 2039, "L40S": 864, "A10": 600}  # spec-sheet HBM/GDDR
L2_ROTATE_BYTES = 200 * 2**20


def _peak(name: str) -> float | None:
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)


def _time_cuda(fn, n_buffers: int, repeats: int) -> float:
    burst = max(n_buffers, 10)
    for i in range(n_buffers):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(burst):
            fn(i % n_buffers)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / burst)
    return statistics.median(times)


def _time_cpu(fn, repeats: int) -> float:
    fn(0)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(0)
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def run(device: str, shapes: list[str], batches: list[int], preset: str, repeats: int) -> list[dict]:
    config = pvq_cuda.PVQConfig.preset(preset)
    dense_dtype = torch.float16 if device == "cuda" else torch.float32
    rows = []
    for shape in shapes:
        k_in, n_out = map(int, shape.split("x"))
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(n_out, k_in, generator=gen) / k_in**0.5
        q = pvq_cuda.quantize_weight(w.to(device), config)
        pvq_bytes = q.codes.numel() * 4 + q.row_scale.numel() * 2
        dense_bytes = n_out * k_in * dense_dtype.itemsize
        if device == "cuda":
            n_pvq = max(1, -(-L2_ROTATE_BYTES // pvq_bytes))
            n_dense = max(1, -(-L2_ROTATE_BYTES // dense_bytes))
            pvq_copies = [q] + [pvq_cuda.PVQWeight(q.codes.clone(), q.row_scale.clone(), q.levels.clone(), n_out, k_in,
                                                   config, validate=False) for _ in range(n_pvq - 1)]
            dense_copies = [w.to(device, dense_dtype) for _ in range(n_dense)]
        else:
            pvq_copies, dense_copies = [q], [w]
        del w
        for M in batches:
            x = torch.randn(M, k_in, generator=gen).to(device, dense_dtype)
            if device == "cuda":
                t_pvq = _time_cuda(lambda i: pvq_cuda.pvq_matmul(x, pvq_copies[i]), len(pvq_copies), repeats)
                t_dense = _time_cuda(lambda i: torch.matmul(x, dense_copies[i].T), len(dense_copies), repeats)
            else:
                t_pvq = _time_cpu(lambda i: pvq_cuda.pvq_matmul(x, q), repeats)
                t_dense = _time_cpu(lambda i: x @ dense_copies[0].T, repeats)
            io_bytes = (M * k_in + M * n_out) * dense_dtype.itemsize
            rows.append({"shape": shape, "batch": M, "pvq_us": t_pvq, "dense_us": t_dense,
                         "pvq_gbps": (pvq_bytes + io_bytes) / t_pvq / 1e3,
                         "dense_gbps": (dense_bytes + io_bytes) / t_dense / 1e3,
                         "speedup": t_dense / t_pvq})
            print(f"{shape:>11} M={M:<4} pvq {t_pvq:9.1f} us  dense {t_dense:9.1f} us  x{t_dense / t_pvq:5.2f}", flush=True)
        del pvq_copies, dense_copies
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def report(rows: list[dict], device_name: str, device: str, preset: str, header: str) -> str:
    peak = _peak(device_name) if device == "cuda" else None
    dense = "cuBLAS fp16" if device == "cuda" else "torch fp32"
    lines = [header, "", f"| in x out | batch | pvq µs | {dense} µs | speedup | pvq GB/s | {dense} GB/s |"
             + (" pvq % of peak |" if peak else ""), "|---|---|---|---|---|---|---|" + ("---|" if peak else "")]
    for r in rows:
        line = (f"| {r['shape']} | {r['batch']} | {r['pvq_us']:.1f} | {r['dense_us']:.1f} | {r['speedup']:.2f}x "
                f"| {r['pvq_gbps']:.3g} | {r['dense_gbps']:.3g} |")
        if peak:
            line += f" {100 * r['pvq_gbps'] / peak:.0f} % |"
        lines.append(line)
    if peak:
        lines += ["", f"Peak bandwidth used for %: {peak} GB/s (spec sheet of {device_name})."]
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for shape in dict.fromkeys(r["shape"] for r in rows):
        pts = [(r["batch"], r["speedup"]) for r in rows if r["shape"] == shape]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=shape)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (rows of x)")
    ax.set_ylabel("speedup over dense")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"],
                        default="cuda" if torch.cuda.is_available() and pvq_cuda.cuda_built() else "cpu")
    parser.add_argument("--shapes", nargs="+")
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument("--preset", default="pvq-3.25")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--outdir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    cpu = args.device == "cpu"
    shapes = args.shapes or (["4096x4096", "4096x14336"] if cpu else SHAPES)
    batches = args.batches or ([1, 4, 16] if cpu else BATCHES)
    name = torch.cuda.get_device_name() if not cpu else "CPU"
    commit = git_commit()
    date = datetime.date.today().isoformat()
    header = (f"# pvq_matmul ({args.preset}) vs dense on {name}, {date}, commit {commit}, "
              f"torch {torch.__version__}, threads {torch.get_num_threads()}, median of {args.repeats}")
    rows = run(args.device, shapes, batches, args.preset, args.repeats)
    text = report(rows, name, args.device, args.preset, header)
    print(text)
    os.makedirs(args.outdir, exist_ok=True)
    stem = os.path.join(args.outdir, f"matmul-{name.replace(' ', '_')}-{date}")
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    with open(stem + ".json", "w") as f:
        json.dump({"device": name, "date": date, "commit": commit, "preset": args.preset, "rows": rows}, f, indent=1)
    if plot(rows, stem + ".png", header.removeprefix("# ")):
        print(f"plot: {stem}.png")


if __name__ == "__main__":
    main()
