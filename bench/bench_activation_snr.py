"""Signal-to-noise ratio of the activation coders (PVQ presets and INT baselines) on a model's real
linear inputs, in each layer's rotated basis, counted three ways.

Why three: a few "massive activation" tokens (the first token of a sequence, in a few down_proj
inputs) have norms 50-500x their tensor's median and hold about half of all activation energy. One
SNR over every value together is therefore mostly the SNR of those few tokens, and their rotated
vectors are nearly flat (the Hadamard transform of an almost one-hot vector), which per-token INT
quantizes almost exactly while PVQ's error stays relative to each token's norm. So the report gives

- the pooled SNR (all signal / all error),
- the pooled SNR without the massive tokens (norm > ``--massive`` x their tensor's median),
- the mean and 10th percentile of the per-token SNR in dB (every token weighs the same).

The inputs are those of every q/o/up/down projection (k/v and gate see the same inputs as q and up)
on held-out tokens of one evaluation text, rotated as a PVQ layer of that width rotates them
(``rotation_signs(n, 0)``); bits per activation are weighted by each input's size.

    python bench/bench_activation_snr.py --out bench/results/activation-snr-cpu-<date>.md
"""

from __future__ import annotations

import argparse
import datetime

import torch

from bench_common import emit, git_commit
from pvq_cuda.apps.corpus import tokenize
from pvq_cuda.apps.domains import read_domain
from pvq_cuda.apps.loading import load_model
from pvq_cuda.format.activation import ACT_PRESETS, code_activations
from pvq_cuda.format.weight import rotation_signs
from pvq_cuda.ops import hadamard_transform
from pvq_cuda.quantization.act_baselines import parse_activation_baseline

INPUTS = ("q_proj", "o_proj", "up_proj", "down_proj")
BASELINES = ("int8-g32", "int8-token", "int6-g64", "int4-g64", "int4-token")


def capture_inputs(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every INPUTS projection's input ``[tokens, n]`` for one forward pass over ``ids``."""
    acts: dict[str, torch.Tensor] = {}
    hooks = [mod.register_forward_pre_hook(
        lambda m, a, name=name: acts.__setitem__(name, a[0].detach().reshape(-1, a[0].shape[-1]).float().clone()))
        for name, mod in model.named_modules() if name.endswith(INPUTS)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return acts


def coder_stats(acts: dict[str, torch.Tensor], coder, massive: float) -> dict:
    signal = error = kept_signal = kept_error = bits = values = 0.0
    per_token = []
    massive_tokens = 0
    for x in acts.values():
        n = x.shape[-1]
        signs = rotation_signs(n, 0)
        xr = hadamard_transform(x, signs)
        if isinstance(coder, str):
            coded = code_activations(x, ACT_PRESETS[coder], signs)
            xq, bpa = coded.dequantize(), coded.bits_per_activation()
        else:
            xq, bpa = coder.quantize(xr), coder.bits_per_activation(n)
        p = xr.double().square().sum(-1)
        e = (xq - xr).double().square().sum(-1)
        keep = p <= massive**2 * p.median()
        massive_tokens += int((~keep).sum())
        signal, error = signal + p.sum().item(), error + e.sum().item()
        kept_signal, kept_error = kept_signal + p[keep].sum().item(), kept_error + e[keep].sum().item()
        per_token.append(10 * torch.log10(p / e.clamp_min(1e-300)))
        bits, values = bits + bpa * x.numel(), values + x.numel()
    db = torch.cat(per_token)
    return {"bpa": bits / values, "pooled": 10 * torch.log10(torch.tensor(signal / error)).item(),
            "pooled_kept": 10 * torch.log10(torch.tensor(kept_signal / kept_error)).item(),
            "mean": db.mean().item(), "p10": db.quantile(0.1).item(), "massive": massive_tokens,
            "massive_share": 1 - kept_signal / signal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="python-docs", help="evaluation text (default python-docs)")
    parser.add_argument("--tokens", type=int, default=1024, help="held-out tokens, in windows of 512 (default 1024)")
    parser.add_argument("--massive", type=float, default=10.0,
                        help="a token is massive when its norm exceeds this multiple of its tensor's median "
                             "(default 10)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.tokens < 512 or args.tokens % 512:
        parser.error(f"--tokens must be a positive multiple of 512, got {args.tokens}")
    lm = load_model(quiet=True)
    text, about = read_domain(args.domain)
    ids = tokenize(lm.tokenizer, text)
    ids = ids[int(0.9 * len(ids)):][:args.tokens]
    if ids.numel() < args.tokens:
        parser.error(f"--tokens: the held-out part of {args.domain} has only {ids.numel()} tokens")
    acts = capture_inputs(lm.model, ids.view(-1, 512))
    rows = [(name, coder_stats(acts, name, args.massive)) for name in ACT_PRESETS]
    rows += [(parse_activation_baseline(b).label, coder_stats(acts, parse_activation_baseline(b), args.massive))
             for b in BASELINES]
    rows.sort(key=lambda r: -r[1]["bpa"])
    share = rows[0][1]
    lines = [f"# Activation coders' SNR on {lm.name}'s linear inputs, CPU, {datetime.date.today()}, "
             f"commit {git_commit()}", "",
             f"Inputs of every {'/'.join(p.removesuffix('_proj') for p in INPUTS)} projection "
             f"({len(acts)} tensors) over {args.tokens} held-out tokens of {about}, in the rotated basis. "
             f"Massive tokens: norm > {args.massive:g}x their tensor's median; {share['massive']} of "
             f"{len(acts) * args.tokens} token rows, holding {100 * share['massive_share']:.0f} % of the "
             "activation energy. Reproduce: `python bench/bench_activation_snr.py`.", "",
             "| coder | bits per activation | pooled SNR dB | pooled, massive tokens left out | per-token SNR dB, mean "
             "| per-token, 10th percentile |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {name} | {s['bpa']:.2f} | {s['pooled']:.2f} | {s['pooled_kept']:.2f} | {s['mean']:.2f} | "
              f"{s['p10']:.2f} |" for name, s in rows]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
