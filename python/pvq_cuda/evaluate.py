"""Held-out perplexity, GPTQ style: exp of the mean next-token NLL over fixed windows.

Each window of ``seqlen`` tokens predicts its last ``seqlen - 1`` tokens from the ones before it
(no context carried across windows), so ``m`` windows score ``m·(seqlen - 1)`` tokens.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from .linear import PVQLinear


def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 2, device=None,
               decoded_cache: bool | None = None) -> dict:
    """Perplexity of ``model`` on token windows ``[m, seqlen]``.

    Args:
        decoded_cache: decode PVQ weights once and run dense GEMMs (memory for speed; default:
            on CPU, where the fused kernel is meant for small batches). Restored afterwards.

    Returns ``{"perplexity", "nll", "tokens", "windows", "seconds"}``.
    """
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise ValueError(f"perplexity: windows must be token ids [m >= 1, seqlen >= 2], got "
                         f"{getattr(windows, 'shape', type(windows).__name__)}")
    if device is None:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
    device = torch.device(device)
    if decoded_cache is None:
        decoded_cache = device.type == "cpu"
    pvq = [m for m in model.modules() if isinstance(m, PVQLinear)]
    had_cache = [m._decoded is not None for m in pvq]
    if decoded_cache:
        for m in pvq:
            if m._decoded is None:
                m.enable_decoded_cache()
    model.eval()
    t0 = time.perf_counter()
    nll, count = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, windows.shape[0], batch_size):
                ids = windows[i:i + batch_size].to(device)
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                   reduction="sum")
                nll += float(loss.double())
                count += ids[:, 1:].numel()
    finally:
        if decoded_cache:
            for m, had in zip(pvq, had_cache):
                if not had:
                    m.disable_decoded_cache()
    mean = nll / count
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count, "windows": int(windows.shape[0]),
            "seconds": time.perf_counter() - t0}
