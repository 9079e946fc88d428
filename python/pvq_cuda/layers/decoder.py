"""Where the linear layers of a causal LM are, and how one is swapped for another."""

from __future__ import annotations

from torch import nn


def decoder_layers(model: nn.Module, fn: str = "quantize_model") -> nn.ModuleList:
    """The decoder blocks ``model.model.layers`` of a causal LM, or a TypeError saying what is wrong."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch nn.Module (a transformers causal LM), got {type(model).__name__}")
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if head is None or not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(f"{fn}: model must be a Llama-family causal LM (model.model.layers decoder blocks and an "
                        f"lm_head), got {type(model).__name__}; a base model without an LM head or an encoder "
                        f"model cannot be quantized by this pipeline")
    return layers


def linears(module: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside ``module``, by its name relative to ``module``."""
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted) of ``root`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
