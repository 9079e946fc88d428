"""quantize_model(bpw=R): a config per layer chosen before quantizing, from each layer's weight, the
Hessian of its inputs and the sensitivity of the model's output to its output, all in the
unquantized model (quantization/allocation.py has the prediction and the knapsack).

The statistics only rank configs and layers, so they come from the first calibration windows,
not all of them. On SmolLM2-135M (32 x 512 calibration tokens of the Jargon File) the Hessians
then read 12 windows and F 4: 37-45 s instead of 97 s. The allocations they give at 2.25 and
3.25 bpw have a predicted loss 0.2-0.3 % above the best one under statistics from every window
and F from 8 (bench/bench_allocation_stats.py), and measured 1.942x and 1.143x fp32 out of
domain against that one's 1.896x and 1.152x (README)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections import OrderedDict

import torch
from torch.nn import functional as F

from ..format.config import PVQConfig
from ..layers.decoder import linears
from ..quantization.allocation import Allocation, LayerStats, allocate, candidates, layer_stats
from ..quantization.hessian import HessianCollector
from .calibration import calibration_digest
from .run import Run, block_to
from .stream import Stream

#: quantize_model(bpw=R) takes R in this range (the candidates reach a little beyond it).
BPW_RANGE = (2.0, 4.5)
#: how close to R the mean rate of the quantized linears must come.
BPW_TOLERANCE = 0.01
#: calibration tokens the allocation's Hessians are accumulated over (the first whole windows):
#: at least this many, and at least TOKENS_PER_INPUT per input feature of the widest layer, for
#: a tr(D) that is not dominated by the sample's rank (fewer tokens shrink a wide layer's more).
HESSIAN_TOKENS = 4096
TOKENS_PER_INPUT = 4
#: calibration tokens the output sensitivities are averaged over (the first whole windows): a
#: forward and a backward of the whole model each.
SENSITIVITY_TOKENS = 2048


def check_bpw(bpw, caller: str = "quantize_model") -> None:
    if isinstance(bpw, bool) or not isinstance(bpw, (int, float)) or not BPW_RANGE[0] <= bpw <= BPW_RANGE[1]:
        raise ValueError(f"{caller}: bpw must be a number in [{BPW_RANGE[0]}, {BPW_RANGE[1]}], got {bpw!r}")


def leading_windows(chunks: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    """The first whole windows (rows of the [b, seqlen] ``chunks``, in order) that hold at least
    ``tokens`` tokens, or all of them, still batched as chunks."""
    out, total = [], 0
    for chunk in chunks:
        if total >= tokens:
            break
        part = chunk[:max(1, -(-(tokens - total) // chunk.shape[1]))]
        out.append(part)
        total += part.numel()
    return out


def hessian_tokens(run: Run, names: set[str]) -> int:
    """How many calibration tokens fp_layer_stats reads (HESSIAN_TOKENS, TOKENS_PER_INPUT)."""
    widest = max((m.in_features for n, m in run.model.named_modules() if n in names), default=0)
    return max(HESSIAN_TOKENS, TOKENS_PER_INPUT * widest)


@torch.no_grad()  # it runs before the pipeline's no_grad: with autograd on, each block's outputs
# kept the graph of every block before them (SmolLM2-135M at 32 x 512 tokens: 24 GB by block 30)
def fp_layer_stats(run: Run, names: set[str]) -> dict[str, LayerStats]:
    """LayerStats of the named linears, block by block on the unquantized model's activations of
    the first calibration windows (:func:`hessian_tokens` tokens; one forward per block, the model
    is left as it was). Without calibration data (data-free runs) every Hessian is the identity."""
    stats: dict[str, LayerStats] = {}
    seed = run.config.seed
    if run.chunks is None:
        for i, block in enumerate(run.layers):
            for rel, lin in linears(block).items():
                if f"model.layers.{i}.{rel}" in names:
                    n = lin.in_features
                    stats[f"model.layers.{i}.{rel}"] = layer_stats(lin.weight.detach(), torch.eye(n), seed)
        return stats
    stream = Stream(run, leading_windows(run.chunks, hessian_tokens(run, names)))
    stream.fp_hidden = list(stream.hidden)  # the pass below moves this fp stream, nothing else
    for i, block in enumerate(run.layers):
        prefix = f"model.layers.{i}."
        fp_inputs = stream.fp_pass(i)
        mods = {rel: lin for rel, lin in linears(block).items() if prefix + rel in names}
        hessians: dict[tuple, torch.Tensor] = {}  # q/k/v (gate/up) see one input: one Hessian
        for rel, lin in mods.items():
            xs = fp_inputs[rel]
            key = (xs[0].data_ptr(), tuple(xs[0].shape))
            if key not in hessians:
                hc = HessianCollector({rel: lin}, run.damp, hooks=False)
                for x in xs:
                    hc.new_batch()
                    hc.add(rel, x)
                hessians[key] = hc.hessian(rel)
            stats[prefix + rel] = layer_stats(lin.weight.detach(), hessians[key], seed)
        del fp_inputs, hessians
        block_to(block, run, "cpu")
    return stats


def output_sensitivity(model: torch.nn.Module, names: set[str], chunks: list[torch.Tensor],
                       seed: int = 0) -> dict[str, float]:
    """F per named linear (quantization/allocation.py's module doc): the mean over calibration
    tokens and output channels of (∂ log p(ŷ_t) / ∂y_t)², y_t the layer's output at token t and ŷ_t
    a next token drawn from the model's own distribution (seeded by ``seed``), on the first
    calibration windows (rows of the [b, seqlen] ``chunks``) that hold SENSITIVITY_TOKENS tokens
    or all of them. One window at a time through the whole model, where the model's embeddings
    are (with offload, the host); the parameters get no gradients. The tokens are drawn on the
    host, by inverse CDF (torch.multinomial took 0.65 s a window at a 49k vocabulary), so that a
    seed draws the same ones on every device."""
    mods = {n: m for n, m in model.named_modules() if n in names}
    sums: dict[str, torch.Tensor] = {}  # float64 on the model's device: no host sync inside backward
    dev = model.get_input_embeddings().weight.device
    windows = [w for chunk in leading_windows(chunks, SENSITIVITY_TOKENS) for w in chunk]
    tokens = sum(w.numel() for w in windows)

    def keep_output_gradient(name):
        def add(grad):
            part = grad.double().square().sum()
            sums[name] = sums[name] + part if name in sums else part

        def hook(mod, args, out) -> None:  # returns None: the output stays as it is
            if out.requires_grad:
                out.register_hook(add)
        return hook

    def graph_from_here(mod, args, out):  # the graph starts at the embeddings' output
        return out.detach().requires_grad_(True)

    needs_grad = [(p, p.requires_grad) for p in model.parameters()]
    handles = [m.register_forward_hook(keep_output_gradient(n)) for n, m in mods.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(graph_from_here))
    gen = torch.Generator().manual_seed(int(seed))
    try:
        for p, _ in needs_grad:
            p.requires_grad_(False)
        with torch.enable_grad():
            for ids in windows:
                logits = model(input_ids=ids[None].to(dev), use_cache=False).logits[0].float()
                cdf = logits.detach().softmax(-1).cpu().cumsum(-1)
                u = torch.rand(cdf.shape[0], 1, generator=gen, dtype=cdf.dtype) * cdf[:, -1:]
                drawn = torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=cdf.shape[1] - 1)
                F.cross_entropy(logits, drawn.to(logits.device), reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in needs_grad:
            p.requires_grad_(flag)
    return {n: float(sums[n]) / (tokens * m.out_features) if n in sums else 0.0 for n, m in mods.items()}


# A rate sweep (``compare --bpw sweep``) quantizes copies of one model on one calibration set at
# many rates. Their statistics are the same, and each costs a pass of the fp model with its
# Hessians on every allocated run, so the last few are kept, keyed on everything they depend on.
_STATS_MEMO: OrderedDict[str, dict[str, LayerStats]] = OrderedDict()
_STATS_MEMO_SIZE = 4


def _stats_key(run: Run, names: set[str]) -> str:
    """A digest of what fp_layer_stats and output_sensitivity read: the model (its class, config, every parameter and
    buffer: the fp pass runs every block), the calibration tokens, the damping, the rotation seed,
    the device, the float32 matmul precision and the names (the seed also draws the sensitivity's
    labels)."""
    model = run.model
    config = getattr(model, "config", None)
    config_text = config.to_json_string() if hasattr(config, "to_json_string") else repr(config)
    h = hashlib.sha256(json.dumps([type(model).__qualname__, config_text,
                                   str(getattr(config, "_attn_implementation", None)), sorted(names),
                                   None if run.damp is None else float(run.damp), int(run.config.seed),
                                   str(run.device), torch.get_float32_matmul_precision(),
                                   calibration_digest(run.chunks)]).encode())
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for key, t in tensors:
        h.update(f"{key}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def memoized_layer_stats(run: Run, names: set[str]) -> dict[str, LayerStats]:
    """fp_layer_stats with each layer's output_sensitivity, computed once for the same model state,
    calibration and settings."""
    key = _stats_key(run, names)
    if key not in _STATS_MEMO:
        stats = fp_layer_stats(run, names)
        if run.chunks is not None:
            sensitivity = output_sensitivity(run.model, names, run.chunks, run.config.seed)
            stats = {n: dataclasses.replace(st, sensitivity=sensitivity[n]) for n, st in stats.items()}
        _STATS_MEMO[key] = stats
        while len(_STATS_MEMO) > _STATS_MEMO_SIZE:
            _STATS_MEMO.popitem(last=False)
    _STATS_MEMO.move_to_end(key)
    return dict(_STATS_MEMO[key])


def allocate_run(run: Run, names: list[str], bpw: float) -> Allocation:
    """Choose every named layer's config for a mean of ``bpw`` bits per weight, and install them
    as the run's overrides (exact names, so they win over nothing else)."""
    base = run.config
    configs = [PVQConfig(D=c.D, K=c.K, scale_bits=c.scale_bits, rotate=True, seed=base.seed)
               for c in candidates(code_bpw_range=(max(1.0, bpw - 2.0), bpw + 2.0))]
    stats = memoized_layer_stats(run, set(names))
    a = allocate(stats, bpw, configs)
    if abs(a.bpw - bpw) > BPW_TOLERANCE:
        raise ValueError(f"quantize_model: bpw={bpw} cannot be met to within {BPW_TOLERANCE} on this model with "
                         f"the kernels' configs (the closest allocation has {a.bpw:.4f})")
    run.overrides = [(re.compile(f"^{re.escape(n)}$"), c) for n, c in a.configs.items()]
    counts: dict[PVQConfig, int] = {}
    for c in a.configs.values():
        counts[c] = counts.get(c, 0) + 1
    run.config = max(counts, key=counts.get)  # the most common one: the checkpoint lists the others
    return a
