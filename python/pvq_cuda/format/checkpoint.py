"""The checkpoint directory: a PVQ-quantized causal LM as a Hugging Face style directory.

This module writes and reads the files; :mod:`pvq_cuda.layers.quantized_model` puts the layers
into a model and takes them out (``save_quantized`` / ``load_quantized``).

Layout::

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
A save replaces the whole directory at once (format.atomic.replace_directory), so a save killed at any
moment leaves either the old or the new checkpoint, never a mix.

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
    activation              {D, K, gain_bits, outlier_ratio}: the PVQ layers code their input
                            activations online (W+A, format.activation.ActivationConfig), or null
                            (weights only)
    activation_overrides    {module name: {D, K, gain_bits, outlier_ratio} or null} where a PVQ
                            layer differs
    input_norms             {module name: median calibration token norm of its input} (PVQ layers
                            quantized with calibration data; the activation coder's outlier test)
    quantizer               "pvq_cuda <version>"

The activation keys are absent from checkpoints written before W+A existed: read as null; a
missing outlier_ratio reads as the default, a missing input_norms as none (one stage per token).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from .._version import __version__
from .activation import ActivationConfig, is_input_norm
from .atomic import recover_directory, replace_directory, write_json
from .config import PVQConfig
from .container import VERSION_KEY, FormatError
from .container import load as load_file
from .container import save as save_file
from .weight import LAYOUT_VERSION, TILE_ROWS, PVQWeight

QUANT_METHOD = "pvq"
ROTATION_NAME = "hadamard-splitmix64-signs"
SINGLE_SHARD = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def placeholder_key(pvq_layers) -> str:
    """Where a checkpoint holds its empty placeholder: the ``weight`` of its first PVQ layer by name.

    A dense model (transformers without ``import pvq_cuda``) has a real weight there and refuses
    the empty tensor loudly instead of loading a model with uninitialised linears; a model with PVQ
    layers has no such parameter and skips it."""
    return f"{min(pvq_layers)}.weight"


def check_quantization_config(q, where: str) -> None:
    """A ``quantization_config`` this pvq_cuda can load, or a ValueError naming what is wrong."""
    if not isinstance(q, Mapping) or q.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{where}: the quantization_config has quant_method "
                         f"{q.get('quant_method') if isinstance(q, Mapping) else None!r}, not {QUANT_METHOD!r}")
    fv = q.get("format_version")
    if not isinstance(fv, int) or isinstance(fv, bool) or not 1 <= fv <= LAYOUT_VERSION:
        raise ValueError(f"{where}: quantization_config has format_version {fv!r}; this pvq_cuda reads "
                         f"1..{LAYOUT_VERSION} (a newer checkpoint needs a newer pvq_cuda)")
    try:
        config_of(q, "")
        for name in q.get("module_overrides") or {}:
            config_of(q, name)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: quantization_config does not describe a valid PVQ config: {e}") from None
    try:
        act_config_of(q, "")
        for name in q.get("activation_overrides") or {}:
            act_config_of(q, name)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: quantization_config does not describe a valid activation config: {e}") from None
    norms = q.get("input_norms") or {}
    if not isinstance(norms, Mapping) or not all(is_input_norm(v) for v in norms.values()):
        raise ValueError(f"{where}: quantization_config's input_norms must map module names to positive finite "
                         f"numbers, got {norms!r:.200}")


def build_quantization_config(configs: Mapping[str, PVQConfig], dense: list[str], *,
                              calibration: Mapping | None = None, damp: float | None = None,
                              act_order: bool | None = None, method: str = "pvq",
                              act_configs: Mapping[str, ActivationConfig | None] | None = None,
                              input_norms: Mapping[str, float | None] | None = None) -> dict:
    """The ``quantization_config`` dict (see the module doc) of a model whose PVQ layers have the
    configs ``configs`` (by module name), the activation configs ``act_configs`` (by module name;
    missing or None: weights only), the calibration input norms ``input_norms`` (by module name;
    missing or None: unknown) and whose other linears are ``dense``."""
    if not configs:
        raise ValueError("the model has no PVQLinear layer: quantize it with quantize_model(method='pvq') first")
    counts: dict[PVQConfig, int] = {}
    for c in configs.values():
        counts[c] = counts.get(c, 0) + 1
    default = max(counts, key=lambda c: counts[c])  # most layers; first seen on ties
    calib = None
    if calibration:
        calib = dict(calibration)
        if damp is not None:
            calib["damp"] = damp
        if act_order is not None:
            calib["act_order"] = act_order
    acts = {name: (act_configs or {}).get(name) for name in configs}
    act_counts: dict[ActivationConfig | None, int] = {}
    for a in acts.values():
        act_counts[a] = act_counts.get(a, 0) + 1
    act_default = max(act_counts, key=lambda a: act_counts[a])
    return {
        "quant_method": QUANT_METHOD,
        "format_version": LAYOUT_VERSION,
        "D": default.D,
        "K": default.K,
        "scale_bits": default.scale_bits,
        "rotate": default.rotate,
        "seed": default.seed,
        "rotation": ROTATION_NAME if default.rotate else None,
        "bits_per_weight": default.code_bpw,
        "modules_to_not_convert": sorted(dense),
        "module_overrides": {n: c.to_dict() for n, c in configs.items() if c != default},
        "calibration": calib,
        "activation": None if act_default is None else act_default.to_dict(),
        "activation_overrides": {n: None if a is None else a.to_dict() for n, a in acts.items() if a != act_default},
        "input_norms": {n: float(v) for n, v in sorted((input_norms or {}).items()) if v is not None and n in configs},
        "method": method,
        "quantizer": f"pvq_cuda {__version__}",
    }


def config_of(qcfg: Mapping, name: str) -> PVQConfig:
    """The PVQConfig of module ``name`` under a ``quantization_config``."""
    over = qcfg.get("module_overrides") or {}
    if name in over:
        return PVQConfig(**over[name])
    return PVQConfig(D=qcfg["D"], K=qcfg["K"], scale_bits=qcfg["scale_bits"], rotate=qcfg["rotate"], seed=qcfg["seed"])


def input_norm_of(qcfg: Mapping, name: str) -> float | None:
    """The calibration input norm of PVQ module ``name`` under a ``quantization_config`` (None: unknown)."""
    return (qcfg.get("input_norms") or {}).get(name)


def act_config_of(qcfg: Mapping, name: str) -> ActivationConfig | None:
    """The ActivationConfig of PVQ module ``name`` under a ``quantization_config`` (None: its
    activations are not coded)."""
    over = qcfg.get("activation_overrides") or {}
    value = over[name] if name in over else qcfg.get("activation")
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"activation config of {name or 'the model'!r} must be a mapping or null, got "
                        f"{type(value).__name__}")
    return ActivationConfig(**value)


def _nbytes(value) -> int:
    if isinstance(value, PVQWeight):
        return sum(t.numel() * t.element_size() for t in value.to_state()[0].values())
    return value.numel() * value.element_size()


def is_checkpoint_file(name: str) -> bool:
    """Whether a file of a model directory belongs to the checkpoint itself (shards, their index,
    the configs): a new save replaces these and never carries stale ones over."""
    return (name.startswith("model") and name.endswith(".safetensors")) or name in (
        INDEX_FILE, "config.json", "generation_config.json")


def write_checkpoint(directory: str | os.PathLike, entries: Mapping, config: dict, *, tokenizer=None,
                     generation_config=None, max_shard_size: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write ``entries`` (name -> tensor or PVQWeight) as safetensors shards of at most
    ``max_shard_size`` bytes (a PVQWeight's parts never straddle two), the tokenizer and generation
    config when given, and ``config`` as config.json.

    The directory is replaced as a whole (:func:`pvq_cuda.format.atomic.replace_directory`): a save
    killed at any moment leaves the old checkpoint or the new one, complete. Other files already in
    the directory (a job's log, a tokenizer this save does not write) stay."""
    if not isinstance(max_shard_size, int) or max_shard_size < 1:
        raise ValueError(f"save_quantized: max_shard_size must be a positive int, got {max_shard_size!r}")
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
    meta = {"quant_method": QUANT_METHOD, "pvq_format_version": str(LAYOUT_VERSION)}
    with replace_directory(directory, keep=lambda name: not is_checkpoint_file(name)) as out:
        weight_map = {}
        for fname, shard in zip(names, shards):
            save_file(out / fname, shard, metadata=meta)
            for name, value in shard.items():
                parts = [f"{name}.{p}" for p in value.to_state()[0]] if isinstance(value, PVQWeight) else [name]
                weight_map.update({p: fname for p in parts})
        if len(shards) > 1:
            total = sum(_nbytes(v) for v in entries.values())
            write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        if generation_config is not None and hasattr(generation_config, "save_pretrained"):
            generation_config.save_pretrained(str(out))
        write_json(out / "config.json", config)
    return Path(directory)


def read_quantization_config(directory: str | os.PathLike) -> dict:
    """The ``quantization_config`` of a saved directory (ValueError when it is not a PVQ model)."""
    path = Path(directory)
    recover_directory(path)  # a save killed mid-swap (see format.atomic) leaves the old version aside
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
    check_quantization_config(q, f"load_quantized: {str(cfg_path)!r}")
    return q


def _shard_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"load_quantized: {str(index)!r} is not a valid shard index: {e!r}") from None
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"load_quantized: {str(path)!r} lacks shard(s) {missing} that {INDEX_FILE} lists "
                                    f"(an incomplete copy or download)")
        return [path / f for f in files]
    single = path / SINGLE_SHARD
    if not single.is_file():
        raise FileNotFoundError(f"load_quantized: {str(path)!r} has neither {SINGLE_SHARD} nor {INDEX_FILE}")
    return [single]


def _is_container_file(path: Path) -> bool:
    """Whether a shard was written by pvq_cuda's container (else: plain safetensors, e.g. by
    transformers' save_pretrained of a loaded PVQ model)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError):
        return True  # let the container's reader name the problem
    return VERSION_KEY in meta or meta.get("format") == "pvq_cuda"


def _plain_shard(path: Path, qcfg: Mapping) -> dict:
    """A plain safetensors shard: its tensors, with each PVQ layer's parts (``name.codes``,
    ``name.row_scale``, ``name.levels``) rebuilt into a checked PVQWeight (no checksums here)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file as load_plain

    try:
        tensors = load_plain(str(path))
    except (SafetensorError, OSError) as e:
        raise FormatError(path, f"not a readable safetensors file ({e})") from e
    for name in [k[: -len(".codes")] for k in tensors if k.endswith(".codes")]:
        parts = {p: tensors.pop(f"{name}.{p}", None) for p in ("codes", "row_scale", "levels")}
        if any(t is None for t in parts.values()):
            raise FormatError(path, f"PVQ layer {name!r} lacks part(s) "
                                    f"{[p for p, t in parts.items() if t is None]}")
        config = config_of(qcfg, name)
        tiles = (parts["row_scale"].numel() + TILE_ROWS - 1) // TILE_ROWS
        groups = parts["codes"].numel() // max(1, tiles * config.code_bits)
        try:
            tensors[name] = PVQWeight(parts["codes"], parts["row_scale"], parts["levels"], parts["row_scale"].numel(),
                                      groups * config.D, config, qcfg.get("format_version", LAYOUT_VERSION))
        except (TypeError, ValueError) as e:
            raise FormatError(path, f"PVQ layer {name!r} does not fit its config {config}: {e}") from e
    return tensors


def read_checkpoint_tensors(directory: str | os.PathLike, qcfg: Mapping) -> dict:
    """Every stored tensor and PVQWeight of a checkpoint directory, by name. Shards written by
    pvq_cuda are checksum-verified; plain safetensors shards (transformers' save_pretrained of a
    loaded PVQ model) have their PVQ layers rebuilt from ``qcfg`` and checked against it."""
    stored: dict = {}
    for f in _shard_files(Path(directory)):
        stored.update(load_file(f) if _is_container_file(f) else _plain_shard(f, qcfg))
    return stored
