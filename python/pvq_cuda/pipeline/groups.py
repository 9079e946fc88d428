"""Which linears of a decoder block are quantized together, and in which order."""

from __future__ import annotations

from torch import nn

from ..layers.decoder import linears

#: Linears of a Llama-family block in the order GPTQ quantizes them; layers in one group share
#: one input. Linears not named here go last, one group each, in module order.
SEQUENTIAL_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def groups(block: nn.Module) -> list[list[str]]:
    present = linears(block)
    groups, seen = [], set()
    for g in SEQUENTIAL_GROUPS:
        names = [n for n in g if n in present]
        if names:
            groups.append(names)
            seen.update(names)
    groups += [[n] for n in present if n not in seen]
    return groups


def kept(names, prefix: str, ignore_re) -> list[str]:
    return [n for n in names if ignore_re is None or not ignore_re.search(prefix + n)]
