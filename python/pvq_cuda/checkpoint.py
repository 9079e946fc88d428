"""save_quantized / load_quantized: a PVQ-quantized causal LM as a Hugging Face style directory.

Layout (ready for a later ``AutoModelForCausalLM.from_pretrained`` integration)::

    config.json                    the model's config plus a "quantization_config" block (below)
    model.safetensors              one shard, or model-00001-of-0000N.safetensors + index:
    model.safetensors.index.json   {"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}
    generation_config.json         when the model has one
    tokenizer files                when a tokenizer is given

Shards are written by :func:`pvq_cuda.save` (atomic, CRC-32 per tensor). A PVQ layer ``name`` is
stored as the object ``name`` (a PVQWeight), i.e. the tensors ``name.codes`` (int32),
``name.row_scale`` (float16), ``name.levels`` (float32): exactly the buffer names of PVQLinear, so a
state dict loads by name. Its bias is the tensor ``name.bias``. Every other parameter and persistent
buffer is stored under its state-dict name, tied duplicates (lm_head tied to the embeddings) once.
config.json is written last, so a directory without it is an unfinished save.

``quantization_config``::

    quant_method            "pvq"
    format_version          the packed layout version of the codes (PVQWeight.format_version)
    D, K, scale_bits        the default layer config (scale_bits = gain bits per group)
    rotate, seed            randomized Hadamard rotation and its sign seed
    rotation                "hadamard-splitmix64-signs" (how seed becomes the rotation), or null
    bits_per_weight         code bits per weight of the default config
    modules_to_not_convert  nn.Linear modules kept in full precision (lm_head, ignored layers)
    module_overrides        {module name: {D, K, scale_bits, rotate, seed}} where a layer differs
    calibration             how the Hessians were made (source, nsamples, seqlen, tokens, seed, damp,
                            act_order), or null for data-free quantization
    quantizer               "pvq_cuda <version>"
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .config import PVQConfig
from .io import load as _load_file
from .io import save as _save_file
from .linear import PVQLinear
from .report import write_json
from .weight import FORMAT_VERSION, PVQWeight

QUANT_METHOD = "pvq"
ROTATION_NAME = "hadamard-splitmix64-signs"
SINGLE_SHARD = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def _version() -> str:
    from . import __version__

    return __version__


def build_quantization_config(model: nn.Module, *, calibration: Mapping | None = None, damp: float | None = None,
                              act_order: bool | None = None, method: str = "pvq") -> dict:
    """The ``quantization_config`` dict of a model whose PVQ layers are in place (see module doc)."""
    pvq = {n: m for n, m in model.named_modules() if isinstance(m, PVQLinear)}
    if not pvq:
        raise ValueError("the model has no PVQLinear layer: quantize it with quantize_model(method='pvq') first")
    counts = Counter(m.config for m in pvq.values())
    default = max(counts, key=lambda c: counts[c])  # most layers; Counter keeps first-seen order on ties
    dense = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    calib = None
    if calibration:
        calib = dict(calibration)
        if damp is not None:
            calib["damp"] = damp
        if act_order is not None:
            calib["act_order"] = act_order
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "D": default.D,
        "K": default.K,
        "scale_bits": default.scale_bits,
        "rotate": default.rotate,
        "seed": default.seed,
        "rotation": ROTATION_NAME if default.rotate else None,
        "bits_per_weight": default.code_bpw,
        "modules_to_not_convert": dense,
        "module_overrides": {n: m.config.to_dict() for n, m in pvq.items() if m.config != default},
        "calibration": calib,
        "method": method,
        "quantizer": f"pvq_cuda {_version()}",
    }


def _config_of(qcfg: Mapping, name: str) -> PVQConfig:
    over = qcfg.get("module_overrides") or {}
    if name in over:
        return PVQConfig(**over[name])
    return PVQConfig(D=qcfg["D"], K=qcfg["K"], scale_bits=qcfg["scale_bits"], rotate=qcfg["rotate"], seed=qcfg["seed"])


def _entries(model: nn.Module) -> dict:
    """name -> tensor or PVQWeight: everything the directory stores."""
    out: dict = {}
    pvq_prefixes = []
    for name, m in model.named_modules():
        if isinstance(m, PVQLinear):
            out[name] = m.weight
            if m.bias is not None:
                out[f"{name}.bias"] = m.bias
            pvq_prefixes.append(name + ".")
    seen: set[tuple[int, tuple, torch.dtype]] = set()
    for key, t in model.state_dict().items():
        if key.endswith("_extra_state") or any(key.startswith(p) for p in pvq_prefixes):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:  # tied weights are stored once; loading ties them again
            continue
        seen.add(ident)
        out[key] = t
    return out


def _nbytes(value) -> int:
    if isinstance(value, PVQWeight):
        return sum(t.numel() * t.element_size() for t in value.to_state()[0].values())
    return value.numel() * value.element_size()


def save_quantized(model: nn.Module, directory: str | os.PathLike, tokenizer=None, calibration_info: Mapping | None = None,
                   *, max_shard_size: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write a PVQ-quantized causal LM (from :func:`quantize_model`) to ``directory``.

    Args:
        model: a transformers causal LM with PVQLinear layers in place.
        directory: created if needed; files of an earlier save there are replaced.
        tokenizer: saved with ``save_pretrained`` beside the weights when given.
        calibration_info: JSON-able calibration settings for ``quantization_config.calibration``,
            added to (and overriding) what quantize_model recorded there.
        max_shard_size: bytes per safetensors shard (a PVQ layer's parts never straddle two).

    Returns the directory as a Path.
    """
    from .model import decoder_layers

    decoder_layers(model, "save_quantized")
    if not isinstance(max_shard_size, int) or max_shard_size < 1:
        raise ValueError(f"save_quantized: max_shard_size must be a positive int, got {max_shard_size!r}")
    old = getattr(model.config, "quantization_config", None)
    old = old if isinstance(old, Mapping) and old.get("quant_method") == QUANT_METHOD else {}
    # What quantize_model recorded (damp, act_order, token counts), completed by the caller's info.
    calib = {**(old.get("calibration") or {}), **(calibration_info or {})} or None
    qcfg = build_quantization_config(model, calibration=calib, method=old.get("method", "pvq"))

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    entries = _entries(model)
    shards: list[dict] = [{}]
    size = 0
    for name, value in entries.items():
        n = _nbytes(value)
        if shards[-1] and size + n > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += n
    names = [SINGLE_SHARD] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                     for i in range(len(shards))]
    for stale in list(out.glob("model*.safetensors")) + [out / INDEX_FILE, out / "config.json"]:
        if stale.name not in names and stale.exists():
            stale.unlink()
    meta = {"quant_method": QUANT_METHOD, "pvq_format_version": str(FORMAT_VERSION)}
    weight_map = {}
    for fname, shard in zip(names, shards):
        _save_file(out / fname, shard, metadata=meta)
        for name, value in shard.items():
            parts = [f"{name}.{p}" for p in value.to_state()[0]] if isinstance(value, PVQWeight) else [name]
            weight_map.update({p: fname for p in parts})
    if len(shards) > 1:
        total = sum(_nbytes(v) for v in entries.values())
        write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "save_pretrained"):
        gen.save_pretrained(str(out))
    config = model.config.to_dict()
    config["quantization_config"] = qcfg
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    write_json(out / "config.json", config)  # last: its presence marks a finished save
    model.config.quantization_config = qcfg
    return out


def read_quantization_config(directory: str | os.PathLike) -> dict:
    """The ``quantization_config`` of a saved directory (ValueError when it is not a PVQ model)."""
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"load_quantized: {str(path)!r} is not a directory")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"load_quantized: {str(path)!r} has no config.json (not a model directory, or an "
                                f"unfinished save)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"load_quantized: {str(cfg_path)!r} is not valid JSON: {e}") from e
    q = config.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"load_quantized: {str(cfg_path)!r} has no quantization_config with quant_method "
                         f"'{QUANT_METHOD}' (not a pvq_cuda model)")
    fv = q.get("format_version")
    if not isinstance(fv, int) or not 1 <= fv <= FORMAT_VERSION:
        raise ValueError(f"load_quantized: {str(cfg_path)!r} has format_version {fv!r}; this pvq_cuda reads "
                         f"1..{FORMAT_VERSION}")
    return q


def _shard_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / f for f in files]
    single = path / SINGLE_SHARD
    if not single.is_file():
        raise FileNotFoundError(f"load_quantized: {str(path)!r} has neither {SINGLE_SHARD} nor {INDEX_FILE}")
    return [single]


def _no_init():
    """transformers' context that skips weight initialization (5.x: transformers.initialization,
    4.x: transformers.modeling_utils), or a no-op where neither exists."""
    import contextlib

    for module in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return getattr(__import__(module, fromlist=["no_init_weights"]), "no_init_weights")()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def load_quantized(directory: str | os.PathLike, device=None) -> nn.Module:
    """Rebuild a model written by :func:`save_quantized`: the architecture from config.json, PVQLinear
    modules where the codes are, every tensor checked against its checksum. Returns the model in
    eval mode on ``device`` (default CPU); it gives the same logits as the model that was saved.
    The tokenizer, if saved, loads with ``AutoTokenizer.from_pretrained(directory)``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .model import decoder_layers

    path = Path(directory)
    qcfg = read_quantization_config(path)
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the model is built dense, then our layers go in
    try:
        with _no_init():  # every weight is overwritten from the files: skip the random init
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise ValueError(f"load_quantized: {str(path)!r} does not describe a causal LM: {e}") from e
    decoder_layers(model, "load_quantized")

    stored: dict = {}
    for f in _shard_files(path):
        stored.update(_load_file(f))
    skip = set(qcfg.get("modules_to_not_convert") or [])
    for name, value in list(stored.items()):
        if not isinstance(value, PVQWeight):
            continue
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"load_quantized: stored PVQ layer {name!r} is not a module of "
                             f"{type(model).__name__}") from None
        if not isinstance(linear, nn.Linear) or name in skip:
            raise ValueError(f"load_quantized: stored PVQ layer {name!r} does not replace an nn.Linear to convert")
        if (linear.out_features, linear.in_features) != value.shape:
            raise ValueError(f"load_quantized: {name!r} is {list(value.shape)} in the file but "
                             f"{[linear.out_features, linear.in_features]} in the model config")
        if value.config != _config_of(qcfg, name):
            raise ValueError(f"load_quantized: {name!r} is stored with {value.config}, but quantization_config "
                             f"says {_config_of(qcfg, name)}")
        bias = stored.pop(f"{name}.bias", None)
        if (bias is None) != (linear.bias is None):
            raise ValueError(f"load_quantized: {name!r}: the bias is {'missing' if bias is None else 'unexpected'}")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                PVQLinear.from_weight(value, None if bias is None else bias.to(linear.bias.dtype)))
        del stored[name]

    expected = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    pvq_keys = {f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, PVQLinear)
                for b in ("codes", "row_scale", "levels", "bias")}
    expected -= pvq_keys
    unexpected = sorted(set(stored) - expected)
    if unexpected:
        raise ValueError(f"load_quantized: the files hold tensors the model does not have: {unexpected[:5]}")
    # assign=True keeps the stored dtypes (bit-identical logits); ties are restored afterwards.
    model.load_state_dict(stored, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    state = model.state_dict()
    loaded_ptrs = {state[k].untyped_storage().data_ptr() for k in stored}
    missing = [k for k in sorted(expected - set(stored)) if state[k].untyped_storage().data_ptr() not in loaded_ptrs]
    if missing:
        raise ValueError(f"load_quantized: the files lack tensors the model needs: {missing[:5]}")
    model.config.quantization_config = qcfg
    model.eval()
    if device is not None:
        model.to(device)
    return model
