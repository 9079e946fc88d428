"""Which linears of a decoder block are quantized together, and in which order."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..layers.decoder import linears
from .capture import first_inputs

#: Linears of a Llama-family block in the order GPTQ quantizes them; layers in one group share
#: one input. The staged path (llama.LlamaFlow) takes exactly these.
SEQUENTIAL_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def call_order_groups(block: nn.Module, forward: Callable[[], object], prefix: str = "") -> list[list[str]]:
    """The block's linears in the order ``forward()`` (the unquantized block on calibration
    inputs) calls them, linears called one after another on the same input tensor in one group:
    q/k/v → o → gate/up → down for a Llama-style block, qkv_proj → o_proj → gate_up_proj →
    down_proj for Phi-3's fused ones. Each group is quantized before the next one's inputs are
    made, as GPTQ does; the module order would not do (Phi-3 declares o_proj before qkv_proj).
    A linear the forward never calls has no calibration inputs: ValueError naming it."""
    present = linears(block)
    seen, _ = first_inputs(present, forward)
    missing = [n for n in present if n not in seen]
    if missing:
        raise ValueError(f"quantize_model: {', '.join(prefix + n for n in missing)} never ran in its block's forward "
                         f"on the calibration inputs, so it has no Hessian; keep it in full precision with ignore=")
    groups: list[list[str]] = []
    for n, x in seen.items():
        if groups and x is seen[groups[-1][0]]:
            groups[-1].append(n)
        else:
            groups.append([n])
    return groups


def block_structure(block: nn.Module) -> tuple:
    """What decides how a block computes: its modules' names, classes and forward functions
    (instance-level overrides included). Blocks alike in it share one probe and one call order."""
    return tuple((n, type(m), getattr(m.forward, "__func__", m.forward)) for n, m in block.named_modules())


def kept(names, prefix: str, ignore_re) -> list[str]:
    return [n for n in names if ignore_re is None or not ignore_re.search(prefix + n)]
