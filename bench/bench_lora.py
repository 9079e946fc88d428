"""LoRA on a PVQ model: a few AdamW steps of PEFT LoRA on calibration text, and what they do to the
held-out perplexity of the calibration domain and of the other domains (issue 16's README example).

    python bench/bench_lora.py [--model DIR] [--preset pvq-3.25] [--steps 40] [--out FILE.md]

Without --model, the default model (SmolLM2-135M-Instruct) is quantized data-free at --preset in
memory first (seconds; a Hessian-aware checkpoint from `pvq-cuda quantize` can be given instead).
Training windows come from the calibration domain's first 90 % of tokens, evaluation windows from
each domain's held-out last 10 %, as everywhere else in pvq_cuda. On CPU the PVQ layers run with
their decoded-weight cache (dense GEMMs on the decoded weights; gradients flow to the input the
same way), which is what `perplexity` does too.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from bench_common import emit, git_commit

import pvq_cuda
from pvq_cuda.apps.corpus import leading_bos, make_domain_windows, tokenize
from pvq_cuda.apps.domains import CALIBRATION_DOMAIN, EVALUATION_DOMAINS, read_domain
from pvq_cuda.apps.evaluate import perplexity
from pvq_cuda.apps.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a quantized directory (default: quantize the default model data-free)")
    ap.add_argument("--preset", default="pvq-3.25", help="preset for the data-free quantization without --model")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4, help="windows per step")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--eval-windows", type=int, default=8, help="held-out windows per domain")
    ap.add_argument("--domains", default=",".join(EVALUATION_DOMAINS))
    ap.add_argument("--out")
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    t0 = time.perf_counter()
    loaded = load_model(args.model, quiet=True)
    model, tok = loaded.model, loaded.tokenizer
    if args.model is None:
        pvq_cuda.quantize_model(model, None, args.preset, method="pvq-datafree", progress=False, device="cpu")
        what = f"SmolLM2-135M-Instruct, {args.preset} data-free (quantized in memory)"
    else:
        what = args.model
    setup_s = time.perf_counter() - t0

    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    texts = {d: tokenize(tok, read_domain(d)[0]) for d in dict.fromkeys([CALIBRATION_DOMAIN, *domains])}
    w = make_domain_windows({CALIBRATION_DOMAIN: texts[CALIBRATION_DOMAIN]}, {d: texts[d] for d in domains},
                            nsamples=args.steps * args.batch, seqlen=args.seqlen, eval_windows=args.eval_windows,
                            bos_token_id=leading_bos(tok))

    def held_out() -> dict[str, float]:
        model.eval()
        return {d: perplexity(model, w.evaluation[d])["perplexity"] for d in domains}

    before = held_out()
    peft_model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"]))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=args.lr)
    pvq_layers = [m for m in model.modules() if isinstance(m, pvq_cuda.PVQLinear)]
    for m in pvq_layers:
        m.enable_decoded_cache()
    losses, t_train = [], time.perf_counter()
    peft_model.train()
    for step in range(args.steps):
        ids = w.calibration[step * args.batch:(step + 1) * args.batch]
        loss = peft_model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - t_train
    for m in pvq_layers:
        m.disable_decoded_cache()
    after = held_out()

    k = max(1, args.steps // 10)
    lines = [
        f"# LoRA on a PVQ model: {what}",
        "",
        f"Commit {git_commit()}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}. LoRA r={args.rank}, alpha={2 * args.rank}, all seven linears of every "
        f"block ({n_trainable / 1e6:.2f} M trainable parameters), AdamW lr {args.lr}, {args.steps} steps of "
        f"{args.batch} x {args.seqlen} tokens from {CALIBRATION_DOMAIN}'s calibration part; held-out perplexity "
        f"on {args.eval_windows} windows of {args.seqlen} tokens per domain (never trained on).",
        "",
        f"Training loss: mean of the first {k} steps {sum(losses[:k]) / k:.3f}, of the last {k} steps "
        f"{sum(losses[-k:]) / k:.3f}. Training {train_s:.0f} s ({train_s / args.steps:.1f} s a step); "
        f"loading and quantizing {setup_s:.0f} s.",
        "",
        "| domain | perplexity before | after LoRA | ratio |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {d}{' (trained on)' if d == CALIBRATION_DOMAIN else ''} | {before[d]:.3f} | {after[d]:.3f} | "
              f"{after[d] / before[d]:.3f} |" for d in domains]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
