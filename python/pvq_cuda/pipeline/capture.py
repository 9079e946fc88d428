"""Catching a block's activations: hooks that stop a forward once what is needed has been seen,
catch a module's inputs, and sum the fp-target shift S on a linear's inputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class Stop(Exception):
    """Raised by our hooks to end a forward pass early (the rest of it is not needed)."""


def to_device(obj, device, memo: dict | None = None):
    """Move every tensor inside nested tuples/lists/dicts to ``device``. With ``memo`` (a dict kept
    across calls), a tensor met again is moved once and shared, as it was before the move."""
    if isinstance(obj, torch.Tensor):
        if memo is None:
            return obj.to(device)
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))  # the original is kept so that its id stays unique
        return memo[id(obj)][1]
    if isinstance(obj, tuple):
        return tuple(to_device(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, memo) for k, v in obj.items()}
    return obj


def first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class StopWhenSeen:
    """Stops a forward pass once every module in ``modules`` has been called (a pre-hook registered
    after the HessianCollector's, so the collector has already seen the input)."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self._ids = {id(m) for m in modules}
        self._pending: set[int] = set()
        self._handles = [m.register_forward_pre_hook(self._hook) for m in modules]

    def _hook(self, module, args):
        self._pending.discard(id(module))
        if not self._pending:
            raise Stop

    def reset(self) -> None:
        self._pending = set(self._ids)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def catch_inputs(module: nn.Module, run: Callable[[], object]) -> tuple[tuple, dict]:
    """Call ``run`` and return the (args, kwargs) ``module`` was called with; the forward stops there."""
    caught: list = []

    def hook(mod, args, kwargs):
        caught.append((args, dict(kwargs)))
        raise Stop

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    except Stop:
        pass
    finally:
        handle.remove()
    if not caught:
        raise RuntimeError(f"quantize_model: the forward pass never reached {type(module).__name__}")
    return caught[0]


def block_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Block 0's hidden states and every block's other arguments ``(args, kwargs)`` (attention
    mask, position embeddings, ...) in ``model``'s forward on ``input_ids``, without running a block.

    Block 0's arguments are not every block's: models with sliding-window layers (Gemma-2/3,
    Qwen2/3, ...) pass each block the mask of its layer type, and Gemma-3 also the rotary
    embedding of that type. So for this forward every block is a stub that records its arguments
    and hands its input on unchanged (the model computes the masks and embeddings before its
    loop over the blocks); the last one stops the forward before the final norm and lm_head."""
    caught: list[tuple[tuple, dict]] = []

    def stub(*args, **kwargs):
        caught.append((args, kwargs))
        if len(caught) == len(layers):
            raise Stop
        return args[0] if args else kwargs["hidden_states"]

    own = [b.__dict__.get("forward") for b in layers]  # instance-level forwards (e.g. accelerate hooks)
    for b in layers:
        b.forward = stub
    try:
        model(input_ids=input_ids, use_cache=False)
    except Stop:
        pass
    finally:
        for b, f in zip(layers, own):
            if f is None:
                del b.forward
            else:
                b.forward = f
    if len(caught) != len(layers):
        raise RuntimeError(f"quantize_model: {type(model).__name__}'s forward called its decoder blocks "
                           f"{len(caught)} times, not once each ({len(layers)} blocks)")
    args, kwargs = caught[0]
    hidden = args[0] if args else kwargs["hidden_states"]
    extras = []
    for args, kwargs in caught:
        kwargs = dict(kwargs)
        kwargs.pop("hidden_states", None)
        extras.append((tuple(args[1:]), kwargs))
    return hidden, extras


def first_inputs(modules: dict[str, nn.Module], run: Callable[[], object]) -> tuple[dict[str, torch.Tensor], object]:
    """Call ``run`` and return the input each of ``modules`` got on its first call, by name in the
    order of those calls (a module never called is missing), and what ``run`` returned."""
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.setdefault(n, args[0]))
               for n, m in modules.items()]
    try:
        out = run()
    finally:
        for h in handles:
            h.remove()
    return seen, out


class ShiftCollector:
    """Accumulates S = Σ (x̃ − x) xᵀ on one linear's inputs x (the quantized model's), with x̃ the
    fp model's input to the same layer for the same chunk. With ``hook=True`` it watches the
    module's inputs (set ``chunk`` before each call); otherwise the caller feeds :meth:`add`."""

    def __init__(self, module: nn.Linear, fp_inputs: list[torch.Tensor], hook: bool = True) -> None:
        self.fp_inputs, self.chunk = fp_inputs, 0
        self.sum: torch.Tensor | None = None
        self._n = module.in_features
        self._handle = (module.register_forward_pre_hook(lambda mod, args: self.add(args[0], self.chunk))
                        if hook else None)

    def add(self, x: torch.Tensor, chunk: int) -> None:
        x = x.detach().reshape(-1, self._n).float()
        dx = self.fp_inputs[chunk].to(x.device).reshape(-1, self._n).float() - x
        if self.sum is None:
            self.sum = torch.zeros(self._n, self._n, dtype=torch.float64, device=x.device)
        # bf16 operands: S only enters as a correction W·S·H⁻¹, and the drift x̃ − x is itself a
        # small fraction of x, so its ~0.4 % rounding is far below the 1 % damping; the product
        # runs 2.2x faster than in fp32 on the dev CPU (AVX512-BF16), and on GPU tensor cores.
        self.sum += (dx.T.to(torch.bfloat16) @ x.to(torch.bfloat16)).double()

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
