"""Any decoder block, quantized group by group by running it up to each group."""

from __future__ import annotations

import time
from collections.abc import Callable

from torch import nn

from ..quantization.hessian import HessianCollector
from .capture import ShiftCollector, Stop, StopWhenSeen, catch_inputs
from .groups import kept
from .run import Run


def generic_block(run: Run, block: nn.Module, prefix: str, i: int, n_chunks: int, block_forward,
                   fp_inputs, groups: list[list[str]], after_group: Callable[[], None]) -> None:
    """Quantize any block group by group (``groups``: groups.call_order_groups), running it up to
    each group on every chunk (``block_forward(c)`` runs it on chunk ``c``); ``after_group()``
    runs after each group is quantized."""
    mlp_in: list | None = None
    for group in groups:
        names = kept(group, prefix, run.ignore)
        if not names:
            continue
        mods = {n: block.get_submodule(n) for n in names}
        in_mlp = all(n.startswith("mlp.") for n in names) and hasattr(block, "mlp")
        t0 = time.perf_counter()
        if in_mlp and mlp_in is None:  # the MLP's inputs, with the attention already quantized
            mlp_in = [catch_inputs(block.mlp, lambda c=c: block_forward(c)) for c in range(n_chunks)]
        hc = HessianCollector(mods, run.damp)
        shift = ShiftCollector(mods[names[0]], fp_inputs[names[0]]) if fp_inputs is not None else None
        stopper = StopWhenSeen(list(mods.values()))
        try:
            for c in range(n_chunks):
                hc.new_batch()
                stopper.reset()
                if shift is not None:
                    shift.chunk = c
                try:
                    if in_mlp:
                        a, kw = mlp_in[c]
                        block.mlp(*a, **kw)
                    else:
                        block_forward(c)
                except Stop:
                    pass
        finally:
            stopper.remove()
            hc.remove()
            if shift is not None:
                shift.remove()
        run.quantize_group(block, prefix, i, names, hc, shift, (time.perf_counter() - t0) / len(names))
        after_group()
