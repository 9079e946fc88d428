"""Llama-style decoder blocks run in stages, so that no layer is computed twice."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from ..layers.decoder import linears
from ..quantization.hessian import HessianCollector
from .capture import ShiftCollector, catch_inputs, first, first_inputs
from .groups import SEQUENTIAL_GROUPS, kept
from .run import Run


class LlamaFlow:
    """A Llama-style decoder block run in stages, so that each sequential group's inputs are made
    without running any layer whose output is not needed::

        x_attn = input_layernorm(h)              q/k/v inputs: no linear runs
        a      = o_proj's input                  the block's forward, stopped at o_proj
        r      = h + o_proj(a)                   the block's residual add
        x_mlp  = post_attention_layernorm(r)     gate/up inputs: no linear runs
        d      = down_proj's input               mlp(x_mlp), stopped at down_proj
        out    = r + down_proj(d)                the next block's input

    The generic path (the block run up to each group) computes, per token, q/k/v/o and attention
    twice, gate and up twice, and q and k once more: 16.3 against 10.7 units of a q_proj-sized
    GEMM at SmolLM2's shapes, and two attentions against one. :meth:`probe` checks, on the first
    unquantized block of each structure (pipeline.groups.block_structure: once per run when all
    blocks are alike), that every stage equals the block's own forward bit for bit; a block that
    fails it (another residual layout, extra norms, other linears) takes the generic path. Of the
    architectures tested (tests/test_architectures.py), Llama, Mistral, Qwen2 and Qwen3 (whose q/k
    norms sit inside the attention, which the stages run as the block does) pass; Phi-3 (fused
    qkv_proj, gate_up_proj), Gemma-2/3 (norms after the attention and the MLP) and OLMo-2 (no
    input norms) fail it."""

    QKV, O, GATE_UP, DOWN = SEQUENTIAL_GROUPS

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    @classmethod
    def probe(cls, block: nn.Module, h: torch.Tensor, forward: Callable[[], object]) -> bool:
        """Whether the stages reproduce ``forward()`` (the block on input ``h``) bit for bit."""
        present = linears(block)
        if set(present) != {n for g in SEQUENTIAL_GROUPS for n in g}:
            return False
        for norm in ("input_layernorm", "post_attention_layernorm"):
            if not isinstance(getattr(block, norm, None), nn.Module):
                return False
        seen, out = first_inputs(present, forward)
        out = first(out)
        if len(seen) != len(present):  # a linear the forward never calls
            return False
        flow = cls(block)
        try:
            x_attn = flow.attn_input(h)
            r = flow.residual(h, seen["self_attn.o_proj"])
            x_mlp = flow.mlp_input(r)
            return (all(torch.equal(seen[n], x_attn) for n in cls.QKV)
                    and all(torch.equal(seen[n], x_mlp) for n in cls.GATE_UP)
                    and torch.equal(flow.down_input(x_mlp), seen["mlp.down_proj"])
                    and torch.equal(flow.output(r, seen["mlp.down_proj"]), out))
        except (RuntimeError, TypeError, ValueError, AttributeError):  # a stage that does not fit this block
            return False

    def attn_input(self, h: torch.Tensor) -> torch.Tensor:
        return self.block.input_layernorm(h)

    def o_input(self, forward: Callable[[], object]) -> torch.Tensor:
        return catch_inputs(self.block.self_attn.o_proj, forward)[0][0]

    def residual(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return h + self.block.self_attn.o_proj(a)

    def mlp_input(self, r: torch.Tensor) -> torch.Tensor:
        return self.block.post_attention_layernorm(r)

    def down_input(self, x_mlp: torch.Tensor) -> torch.Tensor:
        return catch_inputs(self.block.mlp.down_proj, lambda: self.block.mlp(x_mlp))[0][0]

    def output(self, r: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return r + self.block.mlp.down_proj(d)


def staged_block(run: Run, block: nn.Module, prefix: str, i: int, hidden: list[torch.Tensor], block_forward,
                  fp_inputs, store, after_group: Callable[[], None]) -> list[torch.Tensor]:
    """Quantize a block that passed :meth:`LlamaFlow.probe`, group by group; returns its outputs.
    ``block_forward(c)`` runs the block on calibration chunk ``c``; ``after_group()`` runs after
    each group is quantized, before the next group's inputs are made."""
    flow, dev = LlamaFlow(block), run.device

    def quantize(group, inputs: list[torch.Tensor], t0: float) -> None:
        names = kept(group, prefix, run.ignore)
        if not names:
            return
        mods = {n: block.get_submodule(n) for n in names}
        hc = HessianCollector(mods, run.damp, hooks=False)
        shift = ShiftCollector(mods[names[0]], fp_inputs[names[0]], hook=False) if fp_inputs is not None else None
        for c, x in enumerate(inputs):
            x = x.to(dev)
            hc.new_batch()
            for n in names:  # one tensor: the group shares one Hessian
                hc.add(n, x)
            if shift is not None:
                shift.add(x, c)
        run.quantize_group(block, prefix, i, names, hc, shift, (time.perf_counter() - t0) / len(names))
        after_group()

    chunks = range(len(hidden))
    t0 = time.perf_counter()
    quantize(LlamaFlow.QKV, [flow.attn_input(hidden[c].to(dev)) for c in chunks], t0)
    t0 = time.perf_counter()
    a = [flow.o_input(lambda c=c: block_forward(c)).to(store) for c in chunks]
    quantize(LlamaFlow.O, a, t0)
    r = [flow.residual(hidden[c].to(dev), a[c].to(dev)).to(store) for c in chunks]
    del a
    t0 = time.perf_counter()
    x_mlp = [flow.mlp_input(r[c].to(dev)).to(store) for c in chunks]
    quantize(LlamaFlow.GATE_UP, x_mlp, t0)
    t0 = time.perf_counter()
    d = [flow.down_input(x_mlp[c].to(dev)).to(store) for c in chunks]
    del x_mlp
    quantize(LlamaFlow.DOWN, d, t0)
    return [flow.output(r[c].to(dev), d[c].to(dev)).to(store) for c in chunks]
