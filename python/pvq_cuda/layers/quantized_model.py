"""save_quantized / load_quantized: a model with PVQLinear layers to and from its checkpoint directory.

The directory's files and their layout are the format layer's (:mod:`pvq_cuda.format.checkpoint`);
this module takes the PVQ layers out of a transformers causal LM and puts them back in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..format.atomic import replace_directory
from ..format.checkpoint import (DEFAULT_MAX_SHARD_BYTES, QUANT_METHOD, act_config_of, build_quantization_config,
                                 config_of, input_norm_of, is_checkpoint_file, placeholder_key, read_checkpoint_tensors,
                                 read_quantization_config, write_checkpoint)
from ..format.weight import PVQWeight
from .decoder import decoder_layers, set_submodule
from .linear import PVQLinear


def model_quantization_config(model: nn.Module, *, calibration: Mapping | None = None, damp: float | None = None,
                              act_order: bool | None = None, method: str = "pvq") -> dict:
    """The ``quantization_config`` of a model whose PVQ layers are in place."""
    configs = {n: m.config for n, m in model.named_modules() if isinstance(m, PVQLinear)}
    acts = {n: m.act_config for n, m in model.named_modules() if isinstance(m, PVQLinear)}
    norms = {n: m.input_norm for n, m in model.named_modules() if isinstance(m, PVQLinear)}
    dense = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return build_quantization_config(configs, dense, calibration=calibration, damp=damp, act_order=act_order,
                                     method=method, act_configs=acts, input_norms=norms)


def set_activation_coding(model: nn.Module, act_config, *, names=None) -> list[str]:
    """Code the input activations of the model's PVQ layers with ``act_config`` (an
    :class:`~pvq_cuda.ActivationConfig` or preset name; None stops coding them): every PVQLinear,
    or those whose module names are in ``names``. Returns the names of the layers it set."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, PVQLinear) and (names is None or n in names)]
    if not layers:
        raise ValueError("set_activation_coding: the model has no PVQLinear layer to code the activations of "
                         "(activation coding needs PVQ weights: quantize with method 'pvq' or 'pvq-datafree')")
    for _, m in layers:
        m.set_activation_config(act_config)
    return [n for n, _ in layers]


def make_save_pretrained_atomic(model: nn.Module) -> None:
    """Make ``model.save_pretrained(dir)`` write a checkpoint that loads again, replacing ``dir`` as
    a whole like :func:`save_quantized` (a save killed at any moment leaves the old checkpoint or
    the new one). Installed on the models pvq_cuda makes or loads (quantize_model, load_quantized,
    from_pretrained). A model loaded by transformers keeps transformers' writer, run into a sibling
    temporary directory that is then swapped in; any other is written by :func:`save_quantized`
    (transformers alone cannot serialise PVQ layers' extra state). Pushes to the Hub go unchanged."""
    original = getattr(model, "save_pretrained", None)
    if original is None or getattr(original, "_pvq_atomic", False):
        return

    def save_pretrained(save_directory, *args, **kwargs):
        if kwargs.get("push_to_hub"):
            return original(save_directory, *args, **kwargs)
        if getattr(model, "hf_quantizer", None) is None:
            unknown = sorted(set(kwargs) - {"max_shard_size", "safe_serialization", "is_main_process"})
            if args or unknown or kwargs.get("safe_serialization", True) is not True:
                raise TypeError(f"save_pretrained of a pvq_cuda model writes safetensors through save_quantized, "
                                f"which takes max_shard_size (bytes) only; got {unknown or 'positional arguments'}")
            if not kwargs.get("is_main_process", True):
                return None
            size = kwargs.get("max_shard_size", DEFAULT_MAX_SHARD_BYTES)
            if isinstance(size, str):
                from transformers.utils import convert_file_size_to_int

                size = convert_file_size_to_int(size)
            save_quantized(model, save_directory, max_shard_size=size)
            return None
        with replace_directory(save_directory, keep=lambda name: not is_checkpoint_file(name)) as tmp:
            return original(tmp, *args, **kwargs)

    save_pretrained._pvq_atomic = True
    save_pretrained.__doc__ = original.__doc__
    model.save_pretrained = save_pretrained


def stored_quantization_config(model: nn.Module) -> dict:
    """The model's ``config.quantization_config`` as a dict when it is pvq's (quantize_model and
    load_quantized store a dict, transformers an object with ``to_dict``), else {}."""
    q = getattr(getattr(model, "config", None), "quantization_config", None)
    q = q.to_dict() if hasattr(q, "to_dict") else q
    return dict(q) if isinstance(q, Mapping) and q.get("quant_method") == QUANT_METHOD else {}


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
    if pvq_prefixes:  # see format.checkpoint.placeholder_key: makes a dense load fail loudly
        out[placeholder_key(p[:-1] for p in pvq_prefixes)] = torch.empty(0)
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
    decoder_layers(model, "save_quantized")
    old = stored_quantization_config(model)
    # What quantize_model recorded (damp, act_order, token counts), completed by the caller's info.
    calib = {**(old.get("calibration") or {}), **(calibration_info or {})} or None
    qcfg = model_quantization_config(model, calibration=calib, method=old.get("method", "pvq"))
    config = model.config.to_dict()
    config["quantization_config"] = qcfg
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    out = write_checkpoint(directory, _entries(model), config, tokenizer=tokenizer,
                           generation_config=getattr(model, "generation_config", None), max_shard_size=max_shard_size)
    model.config.quantization_config = qcfg
    return out


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

    stored = read_checkpoint_tensors(path, qcfg)
    pvq_names = [n for n, v in stored.items() if isinstance(v, PVQWeight)]
    if pvq_names:
        stored.pop(placeholder_key(pvq_names), None)
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
        if value.config != config_of(qcfg, name):
            raise ValueError(f"load_quantized: {name!r} is stored with {value.config}, but quantization_config "
                             f"says {config_of(qcfg, name)}")
        bias = stored.pop(f"{name}.bias", None)
        if (bias is None) != (linear.bias is None):
            raise ValueError(f"load_quantized: {name!r}: the bias is {'missing' if bias is None else 'unexpected'}")
        set_submodule(model, name, PVQLinear.from_weight(value, None if bias is None else bias.to(linear.bias.dtype),
                                                         act_config=act_config_of(qcfg, name),
                                                         input_norm=input_norm_of(qcfg, name)))
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
    make_save_pretrained_atomic(model)
    model.eval()
    if device is not None:
        model.to(device)
    return model
