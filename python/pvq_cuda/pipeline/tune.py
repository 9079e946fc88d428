"""Training a block's still-unquantized linears between the quantization of its groups (QuIP#'s
fine-tuning within a block; ``quantize_model(..., tune_epochs=E)``).

Error feedback (GPTQ) lets the columns of one layer not yet quantized absorb the error of those
already quantized, and fp targets let a layer absorb the drift in its own inputs, both linearly,
one layer at a time. Between groups, the block's later linears can do the same through the
block's non-linearities (attention, the gated MLP): after a group of a block is quantized, the
weights (and biases) of the block's linears that are still to be quantized are trained by Adam,
``epochs`` passes over the calibration chunks, one step a chunk (learning rate ``lr`` times
the layer's weight RMS), to make the block's output on
its (quantized-stream) inputs match its target: the block's output before any of its layers was
quantized, or with fp targets the unquantized block's output on the unquantized stream. Those
layers are then quantized from their trained weights, with Hessians from the inputs the trained
block gives. Layers kept in full precision (``ignore``) are never changed; nor are the norms
(the end-to-end fine-tuning, :func:`~pvq_cuda.pipeline.finetune_scales`, trains those).

The loss is the relative squared error ‖out − target‖² / ‖target‖² per chunk. After each epoch
the mean loss over the chunks is measured again, and the weights of the best epoch are kept (the
original ones if none was better): with a few steps of Adam, whose first steps move every weight
by about the learning rate whatever its gradient, an epoch can make a block worse (seen on
SmolLM2-135M's early blocks), and the calibration chunks are all the evidence there is. Only the
trainable layers need gradients, so the backward pass stops at the earliest of them: after the
first group (q/k/v) it runs through o_proj's weight and the MLP, never through the attention.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .capture import first

# Adam's learning rate relative to each layer's weight RMS: a step moves a weight by at most about
# lr · RMS(W). Relative, because layers' scales differ (SmolLM2-135M's RMS run from 0.05 to 0.4);
# measured on it at 2.25 bpw: an absolute 1e-3 (0.5-2 % of an RMS a step) diverged in some blocks.
TUNE_LR = 1.5e-3


def relative_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖out − target‖² / ‖target‖², in float32: the loss of both block-wise trainings (this one
    and finetune_scales' block stage)."""
    out, target = out.float(), target.float()
    return (out - target).square().mean() / target.square().mean().clamp_min(1e-30)


def tune_pending(block: nn.Module, pending: list[str], forward: Callable[[int], object], targets: list[torch.Tensor],
                 *, epochs: int, lr: float) -> tuple[float, float] | None:
    """Train the parameters of ``block``'s linears named in ``pending`` so that ``forward(c)``
    (the block on calibration chunk ``c``) approaches ``targets[c]``; in place. The weights kept
    are those of the epoch with the lowest mean loss over the chunks, or the original ones when
    no epoch lowered it: tuning never makes the block's error on the calibration chunks larger.
    Returns that mean loss before training and with the weights kept, or None when nothing is
    pending."""
    groups = []
    for n in pending:
        layer = block.get_submodule(n)
        rms = float(layer.weight.detach().float().square().mean().sqrt())
        groups.append({"params": list(layer.parameters()), "lr": lr * max(rms, 1e-12)})
    params = [p for g in groups for p in g["params"]]
    if not params or not epochs:
        return None
    dev = params[0].device

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(float(relative_error(first(forward(c)), targets[c].to(dev)))
                       for c in range(len(targets))) / len(targets)

    frozen = [(p, p.requires_grad) for p in block.parameters()]
    try:
        for p in block.parameters():
            p.requires_grad_(False)
        before = best = mean_loss()
        kept = [p.detach().clone() for p in params]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(groups)
        for _ in range(epochs):
            with torch.enable_grad():
                for c in range(len(targets)):
                    loss = relative_error(first(forward(c)), targets[c].to(dev))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            now = mean_loss()
            if now < best:
                best, kept = now, [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, k in zip(params, kept):
                p.copy_(k)
    finally:
        for p in params:
            p.grad = None
        for p, rg in frozen:
            p.requires_grad_(rg)
    return before, best
