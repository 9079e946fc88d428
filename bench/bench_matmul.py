"""pvq_matmul against dense matmul: µs, effective GB/s and speedup, per batch size and layer shape.

CUDA: x @ W^T through pvq_matmul (rotation included) against cuBLAS fp16 (torch.matmul) in the
same run, both timed through CUDA graphs: a burst of calls, each on the next of several weight
copies that together hold more than 4x the L2 (so every call streams its weight from HBM), is
captured once and replayed; the time per call is the median over the replays of replay time /
calls per burst. A 1 GiB device-to-device copy is measured once as the practical bandwidth
ceiling (bytes read + written), beside the spec-sheet peak. Before timing, each (shape, batch)
output is checked against the CPU path (pvq_matmul of the same codes on the CPU), its buffer
poisoned with NaN first; a failed check is reported and makes the script exit 1 at the end.
CPU: the same against torch fp32 ``x @ W.T``, wall clock with the default threads; the check is
against the dense reference x @ dequantize(W)^T.

    python bench/bench_matmul.py                       # CUDA if present, else CPU (small grid)
    python bench/bench_matmul.py --device cuda --shapes 4096x4096 8192x8192 --batches 1 16 128
    python bench/bench_matmul.py --device cpu --shapes 4096x4096 --batches 1
Writes bench/results/matmul-<device>-<date>.{md,json} (and .png when matplotlib is present), or
with --out/--json only those files (markdown; one appended JSON line).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

import pvq_cuda
from bench_common import append_json, git_commit

SHAPES = ["4096x4096", "4096x14336", "14336x4096", "8192x8192", "8192x28672"]  # in_features x out_features
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128]
# Spec-sheet HBM/GDDR bandwidth, GB/s; the first name found in the device name wins (H100 PCIe and
# NVL before the SXM part).
PEAK_GBPS = {"H100 PCIe": 2000, "H100 NVL": 3900, "H100": 3350, "H200": 4800, "A100": 2039, "L40S": 864, "A10": 600}
ROTATE_L2_MULTIPLE = 5  # weight copies per timing hold more than 4x the L2 ...
BURST_MIN = 32  # ... and a captured burst makes at least this many calls, whole passes over the copies
COPY_BYTES = 2**30
# Check of the CUDA output against the CPU path: max|y - ref| / max|ref|. Both decode the same
# codes; x, the rotated x and y are rounded to fp16 once each (the tests' bound is 4e-3).
CHECK_TOL = {"cuda": 1e-2, "cpu": 1e-4}


def _peak(name: str) -> float | None:
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)


def _l2_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def _time_cuda_graph(fn, n_buffers: int, repeats: int) -> tuple[float, int]:
    """Median µs per call of ``fn(i)``, i cycling over the buffers, replayed from a CUDA graph."""
    burst = n_buffers * -(-BURST_MIN // n_buffers)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture: handles, workspaces, tables, signs
        for i in range(n_buffers):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in range(burst):
            fn(j % n_buffers)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / burst)
    del graph
    return statistics.median(times), burst


def _time_cuda_eager(fn, n_buffers: int, repeats: int) -> tuple[float, int]:
    """The same burst launched eagerly between two events (no host sync inside a burst)."""
    burst = n_buffers * -(-BURST_MIN // n_buffers)
    for i in range(n_buffers):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for j in range(burst):
            fn(j % n_buffers)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / burst)
    return statistics.median(times), burst


def _time_cuda(fn, n_buffers: int, repeats: int) -> tuple[float, int, str]:
    """CUDA-graph timing; if the capture fails, eager timing (said so in the row and on stderr)
    rather than no number at all."""
    try:
        return (*_time_cuda_graph(fn, n_buffers, repeats), "graph")
    except RuntimeError as e:
        print(f"bench_matmul: CUDA-graph capture failed, timing eagerly: {e}", file=sys.stderr, flush=True)
        torch.cuda.synchronize()
        return (*_time_cuda_eager(fn, n_buffers, repeats), "eager")


def _time_cpu(fn, repeats: int) -> float:
    fn(0)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(0)
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def copy_gbps(repeats: int, nbytes: int = COPY_BYTES) -> float:
    """Device-to-device copy of ``nbytes`` (random data), bytes read + written per second."""
    src = torch.randint(-2**31, 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times) / 1e9


def check_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max|y - ref| / max|ref| (inf when y holds NaN or Inf, e.g. an element never written)."""
    y, ref = y.float().cpu(), ref.float().cpu()
    if not bool(torch.isfinite(y).all()):
        return float("inf")
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _checked_call(x: torch.Tensor, q, q_cpu) -> float:
    """One pvq_matmul on x's device, its output buffer poisoned first, against the reference."""
    if x.is_cuda:
        torch.full((x.shape[0], q.out_features), float("nan"), dtype=x.dtype, device=x.device)  # freed: reused next
        y = pvq_cuda.pvq_matmul(x, q)
        ref = pvq_cuda.pvq_matmul(x.cpu(), q_cpu)
    else:
        y = pvq_cuda.pvq_matmul(x, q)
        ref = x.double() @ q.dequantize().double().T
    return check_error(y, ref)


def run(device: str, shapes: list[str], batches: list[int], preset: str, repeats: int) -> list[dict]:
    config = pvq_cuda.PVQConfig.preset(preset)
    dense_dtype = torch.float16 if device == "cuda" else torch.float32
    rotate_bytes = ROTATE_L2_MULTIPLE * _l2_bytes() if device == "cuda" else 0
    rows = []
    for shape in shapes:
        k_in, n_out = map(int, shape.split("x"))
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(n_out, k_in, generator=gen) / k_in**0.5
        q = pvq_cuda.quantize_weight(w.to(device), config)
        q_cpu = q.to("cpu") if device == "cuda" else q
        pvq_bytes = q.codes.numel() * 4 + q.row_scale.numel() * 2
        dense_bytes = n_out * k_in * dense_dtype.itemsize
        if device == "cuda":
            n_pvq = max(2, -(-rotate_bytes // pvq_bytes))
            n_dense = max(2, -(-rotate_bytes // dense_bytes))
            pvq_copies = [q] + [pvq_cuda.PVQWeight(q.codes.clone(), q.row_scale.clone(), q.levels.clone(), n_out, k_in,
                                                   config, validate=False) for _ in range(n_pvq - 1)]
            dense_copies = [w.to(device, dense_dtype) for _ in range(n_dense)]
        else:
            pvq_copies, dense_copies = [q], [w]
        del w
        for M in batches:
            x = torch.randn(M, k_in, generator=gen).to(device, dense_dtype)
            err = _checked_call(x, q, q_cpu)
            bursts, timing = {}, {}
            if device == "cuda":
                t_pvq, bursts["pvq"], timing["pvq"] = _time_cuda(lambda i: pvq_cuda.pvq_matmul(x, pvq_copies[i]),
                                                                 len(pvq_copies), repeats)
                t_dense, bursts["dense"], timing["dense"] = _time_cuda(lambda i: torch.matmul(x, dense_copies[i].T),
                                                                       len(dense_copies), repeats)
            else:
                t_pvq = _time_cpu(lambda i: pvq_cuda.pvq_matmul(x, q), repeats)
                t_dense = _time_cpu(lambda i: x @ dense_copies[0].T, repeats)
            io_bytes = (M * k_in + M * n_out) * dense_dtype.itemsize
            rows.append({"shape": shape, "batch": M, "pvq_us": t_pvq, "dense_us": t_dense,
                         "pvq_gbps": (pvq_bytes + io_bytes) / t_pvq / 1e3,
                         "dense_gbps": (dense_bytes + io_bytes) / t_dense / 1e3,
                         "speedup": t_dense / t_pvq, "check_error": err, "check_ok": err <= CHECK_TOL[device],
                         "pvq_copies": len(pvq_copies), "dense_copies": len(dense_copies), "bursts": bursts,
                         "timing": timing})
            print(f"{shape:>11} M={M:<4} pvq {t_pvq:9.1f} us  dense {t_dense:9.1f} us  x{t_dense / t_pvq:5.2f}  "
                  f"check {err:.1e}" + "".join(f"  ({k}: {v})" for k, v in timing.items() if v != "graph"), flush=True)
        del pvq_copies, dense_copies
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def report(rows: list[dict], device_name: str, device: str, header: str, copy: float | None) -> str:
    peak = _peak(device_name) if device == "cuda" else None
    dense = "cuBLAS fp16" if device == "cuda" else "torch fp32"
    check = "max err vs CPU path" if device == "cuda" else "max err vs dense ref"
    extra = (" pvq % of peak |" if peak else "") + (" pvq % of copy |" if copy else "")
    lines = [header, "", f"| in x out | batch | pvq µs | {dense} µs | speedup | pvq GB/s | {dense} GB/s |{extra} {check} |",
             "|---|---|---|---|---|---|---|" + "---|" * extra.count("|") + "---|"]
    for r in rows:
        line = (f"| {r['shape']} | {r['batch']} | {r['pvq_us']:.1f} | {r['dense_us']:.1f} | {r['speedup']:.2f}x "
                f"| {r['pvq_gbps']:.3g} | {r['dense_gbps']:.3g} |")
        if peak:
            line += f" {100 * r['pvq_gbps'] / peak:.0f} % |"
        if copy:
            line += f" {100 * r['pvq_gbps'] / copy:.0f} % |"
        line += f" {r['check_error']:.1e}{'' if r['check_ok'] else ' FAILED'} |"
        eager = [k for k, v in r.get("timing", {}).items() if v != "graph"]
        if eager:
            line += f" timed eagerly: {', '.join(eager)} (graph capture failed) |"
        lines.append(line)
    if peak:
        lines += ["", f"Peak bandwidth used for %: {peak} GB/s (spec sheet of {device_name})."]
    if copy:
        lines += [f"Device-to-device copy of {COPY_BYTES >> 20} MiB (bytes read + written, median): {copy:.0f} GB/s, "
                  f"the practical ceiling."]
    if device == "cuda" and rows:
        r = rows[0]
        lines += [f"Timing: CUDA graph replays of {r['bursts'].get('pvq')}-call (pvq) / {r['bursts'].get('dense')}-call "
                  f"(dense) bursts over weight copies of > {ROTATE_L2_MULTIPLE}x the {_l2_bytes() >> 20} MiB L2; "
                  f"GB/s counts the packed codes and row scales (pvq) or the fp16 weight (dense), plus x and y."]
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
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--outdir", help="where matmul-<device>-<date>.{md,json,png} go (default bench/results, "
                                         "or none with --out/--json)")
    parser.add_argument("--out", help="write the markdown report to this file")
    parser.add_argument("--json", help="append the rows as one JSON line to this file")
    args = parser.parse_args()
    cpu = args.device == "cpu"
    shapes = args.shapes or (["4096x4096", "4096x14336"] if cpu else SHAPES)
    batches = args.batches or ([1, 4, 16] if cpu else BATCHES)
    name = torch.cuda.get_device_name() if not cpu else "CPU"
    commit = git_commit()
    date = datetime.date.today().isoformat()
    timing = "CUDA-graph replays" if not cpu else "wall clock"
    header = (f"# pvq_matmul ({args.preset}) vs dense on {name}, {date}, commit {commit}, "
              f"torch {torch.__version__}, threads {torch.get_num_threads()}, median of {args.repeats} ({timing})")
    copy = None if cpu else copy_gbps(args.repeats)
    rows = run(args.device, shapes, batches, args.preset, args.repeats)
    text = report(rows, name, args.device, header, copy)
    print(text)
    record = {"bench": "matmul", "device": name, "date": date, "commit": commit, "preset": args.preset,
              "peak_gbps": _peak(name) if not cpu else None, "copy_gbps": copy, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    append_json(args.json, record)
    outdir = args.outdir or (None if args.out or args.json else os.path.join(os.path.dirname(__file__), "results"))
    if outdir:
        os.makedirs(outdir, exist_ok=True)
        stem = os.path.join(outdir, f"matmul-{name.replace(' ', '_')}-{date}")
        with open(stem + ".md", "w") as f:
            f.write(text + "\n")
        with open(stem + ".json", "w") as f:
            json.dump(record, f, indent=1)
        if plot(rows, stem + ".png", header.removeprefix("# ")):
            print(f"plot: {stem}.png")
    failed = [f"{r['shape']} M={r['batch']}" for r in rows if not r["check_ok"]]
    if failed:
        raise SystemExit(f"bench_matmul: output check FAILED at {', '.join(failed)} (tolerance {CHECK_TOL[args.device]})")


if __name__ == "__main__":
    main()
