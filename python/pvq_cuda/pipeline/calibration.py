"""Calibration token ids: checked, batched into chunks of one length, and fingerprinted for resume."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def calibration_chunks(calibration, batch_size: int, vocab_size: int | None) -> list[torch.Tensor]:
    """Token ids as a list of int64 [b, seqlen] chunks (same-length samples are batched)."""
    if calibration is None:
        raise ValueError("quantize_model: calibration is required for this method (token ids [nsamples, seqlen])")
    if isinstance(calibration, torch.Tensor):
        samples = [calibration] if calibration.dim() == 1 else list(calibration)
        if calibration.dim() not in (1, 2):
            raise ValueError(f"quantize_model: calibration must be token ids [nsamples, seqlen], got shape "
                             f"{list(calibration.shape)}")
    elif isinstance(calibration, Sequence) and not isinstance(calibration, str):
        samples = [s.reshape(-1) if isinstance(s, torch.Tensor) and s.dim() == 2 and s.shape[0] == 1 else s
                   for s in calibration]
    else:
        raise TypeError(f"quantize_model: calibration must be a tensor or a list of tensors of token ids, got "
                        f"{type(calibration).__name__}")
    if not samples:
        raise ValueError("quantize_model: calibration holds no samples")
    for i, s in enumerate(samples):
        if not isinstance(s, torch.Tensor) or s.dim() != 1 or s.numel() == 0:
            raise ValueError(f"quantize_model: calibration sample {i} must be a non-empty 1-D tensor of token ids")
        if s.dtype.is_floating_point or s.dtype == torch.bool:
            raise TypeError(f"quantize_model: calibration sample {i} must hold integer token ids, got {s.dtype}")
        if int(s.min()) < 0 or (vocab_size is not None and int(s.max()) >= vocab_size):
            raise ValueError(f"quantize_model: calibration sample {i} holds token ids outside [0, {vocab_size})")
    chunks: list[torch.Tensor] = []
    i = 0
    while i < len(samples):  # consecutive samples of one length go into one batch
        j = i + 1
        while j < len(samples) and j - i < batch_size and samples[j].numel() == samples[i].numel():
            j += 1
        chunks.append(torch.stack([s.long() for s in samples[i:j]]))
        i = j
    return chunks


def calibration_digest(chunks: list[torch.Tensor] | None) -> str | None:
    if chunks is None:
        return None
    h = hashlib.sha256()
    for c in chunks:
        h.update(str(list(c.shape)).encode())
        h.update(c.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
