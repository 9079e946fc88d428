"""Resuming a quantize_model run: per-block checkpoints and the activations after the last one."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..format.atomic import write_json
from ..format.container import load as load_file
from ..format.container import read_metadata
from ..format.container import save as save_file
from ..format.weight import PVQWeight
from ..layers.decoder import set_submodule
from ..layers.linear import PVQLinear
from ..quantization.methods import Method

RESUME_VERSION = 1


def fingerprint(model, method: Method, config, overrides, ignore, act_order, metric_search, fp_targets,
                 refine_passes, damp, seed, calib_digest, tune_epochs=0, tune_lr=None) -> str:
    # The search options share the key "act_order", each added only where it changed the encoding
    # (fp targets from their first release, refine passes and tuning when > 0), so that resume
    # directories written before an option existed keep their fingerprints.
    flags = (act_order, metric_search, True) if fp_targets else (act_order, metric_search)
    if refine_passes:
        flags += (("refine_passes", refine_passes),)
    if tune_epochs:
        flags += (("tune", tune_epochs, tune_lr),)
    cfg = model.config.to_dict() if hasattr(model, "config") and hasattr(model.config, "to_dict") else {}
    cfg.pop("quantization_config", None)
    cfg.pop("transformers_version", None)
    spec = {"version": RESUME_VERSION, "method": method.name, "config": config.to_dict(),
            "overrides": [[p.pattern, c.to_dict()] for p, c in overrides], "ignore": ignore,
            "act_order": flags, "damp": damp, "seed": seed, "calibration": calib_digest,
            "model": json.dumps(cfg, sort_keys=True, default=str)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


class Resume:
    """Per-block checkpoints in ``resume_dir``: ``block_XXXX.safetensors`` (the quantized layers of a
    finished block, written atomically by pvq_cuda.save) and ``activations.safetensors`` (the inputs of
    the next block, so a rerun continues without recomputing the finished blocks)."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        manifest = self.dir / "manifest.json"
        if manifest.exists():
            old = json.loads(manifest.read_text()).get("fingerprint")
            if old != fingerprint:
                raise ValueError(f"quantize_model: resume_dir {str(self.dir)!r} holds a run with other settings "
                                 f"(model, method, config, calibration, ...); use another directory or delete it")
        else:
            write_json(manifest, {"fingerprint": fingerprint, "version": RESUME_VERSION})

    def block_path(self, i: int) -> Path:
        return self.dir / f"block_{i:04d}.safetensors"

    def done(self, num_blocks: int) -> int:
        """How many leading blocks are finished."""
        k = 0
        while k < num_blocks and self.block_path(k).exists():
            k += 1
        return k

    def save_block(self, i: int, block: nn.Module, prefix: str, entries: list[dict],
                   tune: list[dict] | None = None) -> None:
        """Block ``i``'s quantized layers, with its layer log ``entries`` and its tuning log
        ``tune`` (quantize_model's ``tune`` entries of this block) to give back on resume."""
        tensors: dict = {}
        for rel, m in block.named_modules():
            if isinstance(m, PVQLinear):
                tensors[rel] = m.weight
                if m.bias is not None:
                    tensors[f"{rel}.bias"] = m.bias
        for e in entries:  # simulated baselines: the dense dequantized weights
            rel = e["name"][len(prefix):]
            m = block.get_submodule(rel)
            if isinstance(m, nn.Linear):
                tensors[f"{rel}.weight"] = m.weight.detach()
        save_file(self.block_path(i), tensors, metadata={"fingerprint": self.fingerprint,
                                                          "log": json.dumps(entries),
                                                          "tune": json.dumps(tune or [])})

    def load_block(self, i: int, block: nn.Module, device) -> tuple[list[dict], list[dict]]:
        """Install block ``i``'s saved layers in ``block``; returns its layer log and its tuning log
        (none in a block saved without one), as :meth:`save_block` got them."""
        path = self.block_path(i)
        meta = read_metadata(path)
        if meta.get("fingerprint") != self.fingerprint:
            raise ValueError(f"quantize_model: {str(path)!r} belongs to another run; delete resume_dir to restart")
        stored = load_file(path, device=device)
        entries = json.loads(meta["log"])
        # The log names layers in full (prefix + name): their calibration input norms come back from it.
        norms = {e["name"]: e["input_norm"] for e in entries if "input_norm" in e}
        for name, value in stored.items():
            if isinstance(value, PVQWeight):
                norm = next((v for full, v in norms.items() if full == name or full.endswith("." + name)), None)
                set_submodule(block, name, PVQLinear.from_weight(value, stored.get(f"{name}.bias"), input_norm=norm))
        for name, value in stored.items():
            if name.endswith(".weight") and isinstance(value, torch.Tensor):
                with torch.no_grad():
                    block.get_submodule(name[: -len(".weight")]).weight.copy_(value)
        return entries, json.loads(meta.get("tune", "[]"))

    def save_activations(self, i: int, hidden: list[torch.Tensor], fp_hidden: list[torch.Tensor] | None) -> None:
        tensors = {f"h.{c}": h for c, h in enumerate(hidden)}
        tensors.update({f"f.{c}": h for c, h in enumerate(fp_hidden or [])})
        save_file(self.dir / "activations.safetensors", tensors,
                   metadata={"fingerprint": self.fingerprint, "after_block": str(i)})

    def load_activations(self, i: int, n_chunks: int, device) -> dict[str, torch.Tensor] | None:
        """The saved tensors (``h.<chunk>``, and ``f.<chunk>`` with fp targets) after block ``i``."""
        path = self.dir / "activations.safetensors"
        if not path.exists():
            return None
        meta = read_metadata(path)
        if meta.get("fingerprint") != self.fingerprint or meta.get("after_block") != str(i):
            return None
        stored = load_file(path, device=device)
        if any(f"h.{c}" not in stored for c in range(n_chunks)):
            return None
        return stored
