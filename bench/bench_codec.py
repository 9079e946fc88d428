"""Throughput of the PVQ codec ops (decode, encode, search) in weights per second, and of the
online activation encoder (encode_activations: rotate, search, index, gain per token) in tokens
per second at hidden sizes 4096 and 8192, with the W+A matmul (wa_matmul) beside it.

CPU: one thread, timed by thread CPU time (these machines are shared and noisy), median of
repeated runs. CUDA: CUDA events, median of repeated runs, with the decode/encode bandwidth bound
from a device-to-device copy measured in the same run (bytes read + written at copy speed).

    python bench/bench_codec.py                 # CPU, and CUDA when present
    python bench/bench_codec.py --device cuda --out bench/results/codec.md
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

CONFIGS = [(8, 6), (8, 16), (8, 36), (16, 30), (32, 21), (4, 11)]


def _median_cpu(fn, repeats: int) -> float:
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


def _copy_bandwidth(nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.int32, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / _median_cuda(lambda: dst.copy_(src), repeats)


def bench(device: str, groups: int, repeats: int, records: list[dict]) -> list[str]:
    """The report's lines; one dict per configuration is appended to ``records``."""
    timer = _median_cuda if device == "cuda" else _median_cpu
    rows = []
    copy_bw = _copy_bandwidth(groups * 16, repeats) if device == "cuda" else None
    if copy_bw:
        rows.append(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (the bandwidth bound below)")
    header = f"| D | K | index bits | decode Mw/s | encode Mw/s | search Mw/s |" + (" decode % of bound |" if copy_bw else "")
    rows += [header, "|" + "---|" * (header.count("|") - 1)]
    gen = torch.Generator().manual_seed(0)
    for D, K in CONFIGS:
        V = pvq_cuda.pyramid_size(D, K)
        n = groups * 8 // D  # the same number of weights for every D
        x = torch.randn(n, D, generator=gen).to(device)
        y = pvq_cuda.search(x, K)
        index = pvq_cuda.encode(y, K)
        t_dec = timer(lambda: pvq_cuda.decode(index, D, K), repeats)
        t_enc = timer(lambda: pvq_cuda.encode(y, K), repeats)
        t_srch = timer(lambda: pvq_cuda.search(x, K), max(3, repeats // 3))
        w = n * D
        line = (f"| {D} | {K} | {pvq_cuda.index_bits(D, K)} | {w / t_dec / 1e6:,.0f} | {w / t_enc / 1e6:,.0f} "
                f"| {w / t_srch / 1e6:,.0f} |")
        if copy_bw:
            line += f" {100 * (n * (8 + D) / t_dec) / copy_bw:.0f} % |"
        rows.append(line)
        records.append({"device": device, "D": D, "K": K, "decode_mws": w / t_dec / 1e6, "encode_mws": w / t_enc / 1e6,
                        "search_mws": w / t_srch / 1e6, "copy_gbps": copy_bw / 1e9 if copy_bw else None,
                        "decode_of_bound": (n * (8 + D) / t_dec) / copy_bw if copy_bw else None})
        assert V > 0
    return rows


ACT_HIDDEN = (4096, 8192)


def bench_activations(device: str, tokens: int, repeats: int, records: list[dict], hidden=ACT_HIDDEN,
                      out_features: int = 1024) -> list[str]:
    """encode_activations in tokens/s for each activation preset at each hidden size n (default
    4096 and 8192), and wa_matmul (pvq-4.25 weights, out_features x n, its weight decode included:
    the rate per multiply-add does not depend on out_features, and a smaller weight quantizes in
    seconds) in multiply-adds per second on the same tokens, beside the fp32 matmul of the same
    tokens with the dense decoded weight."""
    from pvq_cuda.format.activation import ACT_PRESETS, activation_levels
    from pvq_cuda.format.weight import rotation_signs

    def has_kernel(op) -> bool:
        return device != "cuda" or op.default.has_kernel_for_dispatch_key("CUDA")

    if not has_kernel(torch.ops.pvq_cuda.encode_activations):
        return ["encode_activations has no CUDA kernel in this build: not measured on CUDA", ""]
    with_matmul = has_kernel(torch.ops.pvq_cuda.wa_matmul)  # a CPU-only build: its columns say so
    timer = _median_cuda if device == "cuda" else _median_cpu
    header = "| hidden n | preset | D | K | gain bits | bits/activation | encode tokens/s | M activations/s |" \
             " wa_matmul G multiply-adds/s | fp32 x @ W.T G multiply-adds/s |"
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    gen = torch.Generator().manual_seed(1)
    for n in hidden:
        x = torch.randn(tokens, n, generator=gen).to(device)
        signs = rotation_signs(n, 0).to(device)
        weight = pvq_cuda.quantize_weight(torch.randn(out_features, n, generator=gen),
                                          pvq_cuda.PVQConfig.preset("pvq-4.25"))
        weight = weight.to(device)
        wc = weight.config
        dense = weight.dequantize(rotated=True)
        t_dense = timer(lambda: x @ dense.T, max(3, repeats // 3))
        for name, cfg in ACT_PRESETS.items():
            levels = activation_levels(cfg, n).to(device)
            args = (x, signs, levels, cfg.D, cfg.K, cfg.gain_bits)
            t_enc = timer(lambda: pvq_cuda.ops.encode_activations(*args), repeats)
            p, _, g, sc = pvq_cuda.ops.encode_activations(*args)
            mm = (p, g, sc, levels, weight.codes, weight.row_scale, weight.levels, None, out_features, wc.D, wc.K,
                  wc.scale_bits, cfg.D, cfg.K)
            t_mm = timer(lambda: pvq_cuda.ops.wa_matmul(*mm), max(3, repeats // 3)) if with_matmul else None
            gmacs = None if t_mm is None else tokens * n * out_features / t_mm / 1e9
            rows.append(f"| {n} | {name} | {cfg.D} | {cfg.K} | {cfg.gain_bits} | {cfg.bits_per_activation(n):.3f} | "
                        f"{tokens / t_enc:,.0f} | {tokens * n / t_enc / 1e6:,.1f} | "
                        f"{'no CUDA kernel' if gmacs is None else f'{gmacs:.2f}'} | "
                        f"{tokens * n * out_features / t_dense / 1e9:.2f} |")
            records.append({"device": device, "op": "encode_activations", "n": n, "preset": name,
                            "tokens_per_s": tokens / t_enc, "wa_matmul_gmacs": gmacs, "tokens": tokens})
    return rows + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--cpu-groups", type=int, default=1 << 20)
    parser.add_argument("--cuda-groups", type=int, default=1 << 25)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--act-tokens", type=int, default=256, help="tokens per encode_activations call (CPU)")
    parser.add_argument("--act-cuda-tokens", type=int, default=16384, help="tokens per call on CUDA")
    parser.add_argument("--act-hidden", type=lambda v: [int(n) for n in v.split(",")], default=list(ACT_HIDDEN),
                        help="comma-separated hidden sizes for the activation encoder (default 4096,8192)")
    parser.add_argument("--act-out-features", type=int, default=1024,
                        help="rows of the wa_matmul weight (default 1024)")
    parser.add_argument("--skip-codec", action="store_true", help="only the activation encoder")
    parser.add_argument("--out", help="also write the report (markdown) to this file")
    parser.add_argument("--json", help="append the rows as one JSON line to this file")
    args = parser.parse_args()
    records: list[dict] = []

    commit = git_commit()
    report = [f"# bench_codec ({datetime.date.today()}, commit {commit}, torch {torch.__version__})", ""]
    if args.device in ("cpu", "all"):
        torch.set_num_threads(1)
        report += [f"## CPU, 1 thread: {platform.processor() or platform.machine()}; "
                   f"{args.cpu_groups * 8:,} weights per call, median of {args.repeats} (thread CPU time)", ""]
        if not args.skip_codec:
            report += bench("cpu", args.cpu_groups, args.repeats, records) + [""]
        report += [f"### Activation encoder, CPU, 1 thread: {args.act_tokens} tokens per call", ""]
        report += bench_activations("cpu", args.act_tokens, args.repeats, records, args.act_hidden,
                                    args.act_out_features)
    if args.device in ("cuda", "all") and torch.cuda.is_available() and pvq_cuda.cuda_built():
        report += [f"## CUDA: {torch.cuda.get_device_name()}; {args.cuda_groups * 8:,} weights per call, "
                   f"median of {args.repeats} (CUDA events)", ""]
        if not args.skip_codec:
            report += bench("cuda", args.cuda_groups, args.repeats, records) + [""]
        report += [f"### Activation encoder, CUDA: {args.act_cuda_tokens} tokens per call", ""]
        report += bench_activations("cuda", args.act_cuda_tokens, args.repeats, records, args.act_hidden,
                                    args.act_out_features)
    elif args.device == "cuda":
        raise SystemExit("bench_codec: no CUDA device or pvq_cuda built without CUDA")
    emit(report, args.out)
    append_json(args.json, {"bench": "codec", "commit": commit, "rows": records})


if __name__ == "__main__":
    main()
