"""Do the few massive-activation tokens decide PVQ against INT at 8 bits per activation?

The fp32 model, every decoder linear's input coded (simulated: coded in the layer-width rotated
basis, dequantized, rotated back), KL of the next-token distributions from the uncoded model over
4 held-out windows of 512 tokens of each evaluation text. Each coder runs twice: coding every
token, and leaving the massive tokens (norm > 10x the median token norm of the call) uncoded.
If PVQ trails INT only while those tokens are coded, the gap at 8 bits is theirs
(`bench_activation_snr.py` shows why: their rotated vectors are nearly flat, which per-token INT
codes almost exactly).

    python bench/bench_massive_tokens_kl.py --out bench/results/massive-tokens-kl-cpu-<date>.md
"""

from __future__ import annotations

import argparse
import datetime

import torch

from bench_common import emit, git_commit
from pvq_cuda.apps.corpus import tokenize
from pvq_cuda.apps.domains import EVALUATION_DOMAINS, read_domain
from pvq_cuda.apps.evaluate import mean_standard_error, perplexity
from pvq_cuda.apps.loading import load_model
from pvq_cuda.format.activation import ACT_PRESETS, code_activations
from pvq_cuda.format.weight import rotation_signs
from pvq_cuda.ops import hadamard_transform
from pvq_cuda.quantization.act_baselines import parse_activation_baseline

PAIRS = (("pvq-a8", "int8-token"), ("pvq-a8.5", "int8-g32"))
MASSIVE = 10.0


def coded(x: torch.Tensor, coder: str, keep_massive: bool) -> torch.Tensor:
    """x [tokens, n] after coding with ``coder`` in the rotated basis and rotating back."""
    n = x.shape[-1]
    signs = rotation_signs(n, 0)
    if coder.startswith("pvq"):
        rotated = code_activations(x, ACT_PRESETS[coder], signs).dequantize()
    else:
        rotated = parse_activation_baseline(coder).quantize(hadamard_transform(x, signs))
    out = signs * hadamard_transform(rotated, None)  # R = H diag(s) / sqrt(n) is orthogonal: R^-1 = diag(s) H / sqrt(n)
    if keep_massive:
        norm = x.norm(dim=-1)
        big = norm > MASSIVE * norm.median()
        out[big] = x[big]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    args = parser.parse_args()
    lm = load_model(quiet=True)
    windows = {}
    for name in EVALUATION_DOMAINS:
        ids = tokenize(lm.tokenizer, read_domain(name)[0])
        windows[name] = ids[int(0.9 * len(ids)):][:4 * 512].view(4, 512)
    mode: list = [None]

    def hook(module, inputs):
        if mode[0] is None:
            return None
        x = inputs[0]
        out = coded(x.reshape(-1, x.shape[-1]).float(), *mode[0])
        return (out.view(x.shape).to(x.dtype), *inputs[1:])

    hooks = [m.register_forward_pre_hook(hook) for name, m in lm.model.named_modules()
             if name.startswith("model.layers.") and name.endswith("_proj")]
    try:
        reference = {d: perplexity(lm.model, w, keep_logprobs=True)["logprobs"] for d, w in windows.items()}
        kl = {}
        for pvq, integer in PAIRS:
            for coder in (pvq, integer):
                for keep in (False, True):
                    mode[0] = (coder, keep)
                    kl[coder, keep] = [k for d, w in windows.items()
                                       for k in perplexity(lm.model, w, reference_logprobs=reference[d])["window_kl"]]
    finally:
        for h in hooks:
            h.remove()

    def cell(values):
        m, se = mean_standard_error(values)
        return f"{m * 1e3:.3f} ± {se * 1e3:.3f}"

    lines = [f"# Massive-activation tokens and the 8-bit KL gap, {lm.name}, CPU, {datetime.date.today()}, "
             f"commit {git_commit()}", "",
             "fp32 weights; every decoder linear's input coded in its rotated basis (simulated); KL from the "
             f"uncoded model in 10⁻³ nats per token over 4 x 512 held-out tokens of each of "
             f"{', '.join(EVALUATION_DOMAINS)} (± one standard error over the windows; paired: per-window "
             f"differences). Massive: token norm > {MASSIVE:g}x the median of its call. "
             "Reproduce: `python bench/bench_massive_tokens_kl.py`.", "",
             "| PVQ | INT | massive tokens | KL PVQ | KL INT | PVQ − INT, paired | PVQ / INT |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for pvq, integer in PAIRS:
        for keep in (False, True):
            a, b = kl[pvq, keep], kl[integer, keep]
            lines.append(f"| {pvq} | {integer} | {'left uncoded' if keep else 'coded'} | {cell(a)} | {cell(b)} | "
                         f"{cell([x - y for x, y in zip(a, b)])} | {sum(a) / sum(b):.2f} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
