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
        raise TypeError(f"{fn}: model must be a decoder-only causal LM whose blocks are model.model.layers, with an "
                        f"lm_head ({SUPPORTED_ARCHITECTURES}), got {type(model).__name__}; a base model without an "
                        f"LM head, an encoder model, or one whose blocks live elsewhere (e.g. GPT-2's "
                        f"transformer.h) cannot be quantized by this pipeline")
    return layers


#: The architectures whose tiny random models the tests quantize, save and load (tests/test_architectures.py).
SUPPORTED_ARCHITECTURES = "Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma-2, Gemma-3, OLMo-2"


def check_dense_blocks(layers: nn.ModuleList, prefix: str = "model.layers", fn: str = "quantize_model") -> None:
    """Raise ValueError, naming the module or parameter, if a decoder block holds weights that are
    not nn.Linear layers: mixture-of-experts layers (experts as 3-D parameters ``[experts, out,
    in]``, as transformers 5 fuses them, or as a list of expert MLPs, as 4.x keeps them, and their
    routers) or any other weight matrix. Such weights would otherwise stay in full precision
    unnoticed, or, for experts, get Hessians from only the tokens routed to them."""
    for i, block in enumerate(layers):
        # An MoE layer holds its experts as a submodule named "experts" (transformers 4.x and 5.x).
        moe = [n for n, m in block.named_modules() if isinstance(getattr(m, "experts", None), nn.Module)]
        if moe:
            raise ValueError(f"{fn}: mixture-of-experts layers are not supported: "
                             f"{'.'.join(filter(None, (f'{prefix}.{i}', moe[0])))} is a "
                             f"{type(block.get_submodule(moe[0])).__name__} with experts; this pipeline quantizes "
                             f"dense decoder blocks of nn.Linear layers ({SUPPORTED_ARCHITECTURES})")
        linear_weights = {id(m.weight) for m in block.modules() if isinstance(m, nn.Linear)}
        for n, p in block.named_parameters():
            if p.dim() < 2 or id(p) in linear_weights:
                continue
            where = (f"{prefix}.{i}.{n} is a {p.dim()}-D parameter {list(p.shape)} of a "
                     f"{type(block.get_submodule(n.rpartition('.')[0])).__name__}, not an nn.Linear weight")
            if p.dim() >= 3:
                raise ValueError(f"{fn}: {where}: fused mixture-of-experts weights (or any weight of more than two "
                                 f"dimensions) are not supported; this pipeline quantizes dense decoder blocks of "
                                 f"nn.Linear layers ({SUPPORTED_ARCHITECTURES})")
            raise ValueError(f"{fn}: {where}: this pipeline quantizes nn.Linear layers only and would leave it "
                             f"unquantized")


def linears(module: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside ``module``, by its name relative to ``module``."""
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted) of ``root`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
