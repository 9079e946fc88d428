"""Calibration Hessians: H = (2/N) Σ x xᵀ of each linear layer's inputs (paper.md §6)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..ops import hadamard_transform, hessian_accumulate_

DEFAULT_DAMP = 0.01  # λ of λ·mean(diag H)·I, GPTQ's habit


class HessianCollector:
    """Hooks the inputs of ``nn.Linear`` modules and accumulates their Hessians.

    Layers called one after another on the very same input tensor (q/k/v projections on the
    normalized hidden states, gate/up on the MLP input) share one Hessian, accumulated once.

    With ``hooks=False`` no hook is registered and the caller feeds inputs with :meth:`add`.

    Use as a context manager (hooks are removed on exit)::

        with HessianCollector({"q": attn.q_proj, "k": attn.k_proj}) as hc:
            block(x)
        H = hc.hessian("q")   # (2/N) Σ x xᵀ + damp·mean(diag)·I, float32 [n, n]
    """

    def __init__(self, modules: Mapping[str, nn.Linear], damp: float = DEFAULT_DAMP, hooks: bool = True) -> None:
        if not modules:
            raise ValueError("HessianCollector: modules must name at least one nn.Linear")
        for name, m in modules.items():
            if not isinstance(m, nn.Linear):
                raise TypeError(f"HessianCollector: module {name!r} must be an nn.Linear, got {type(m).__name__}")
        if not damp >= 0:
            raise ValueError(f"HessianCollector: damp must be >= 0, got {damp!r}")
        self.damp = float(damp)
        self._group_of: dict[str, int] = {}      # module name -> group id
        self._sums: list[torch.Tensor] = []      # unscaled Σ x xᵀ per group
        self._tokens: list[int] = []
        self._norms: list[list[torch.Tensor]] = []  # token norms per group (input_norm's median)
        self._last: tuple[torch.Tensor, int] | None = None  # (input tensor, group) of the last call
        self._modules = dict(modules)
        self._handles = ([m.register_forward_pre_hook(lambda mod, args, name=name: self.add(name, args[0]))
                          for name, m in modules.items()] if hooks else [])

    def add(self, name: str, x: torch.Tensor) -> None:
        """Account one input ``x`` [..., in_features] of layer ``name`` (what the hook does; callers
        that compute a layer's inputs themselves, without running it, call this directly)."""
        if self._last is not None and self._last[0] is x:
            group = self._last[1]  # same tensor as the previous layer: share its Hessian
            if self._group_of.setdefault(name, group) != group:
                raise RuntimeError(f"HessianCollector: {name!r} changed input sharing between calls")
            return
        group = self._group_of.get(name)
        if group is None:
            if name not in self._modules:
                raise KeyError(f"HessianCollector: no module named {name!r} is collected")
            group = len(self._sums)
            self._group_of[name] = group
            n = self._modules[name].in_features
            self._sums.append(torch.zeros(n, n, dtype=torch.float32, device=x.device))
            self._tokens.append(0)
            self._norms.append([])
        x2 = x.detach().reshape(-1, x.shape[-1])
        hessian_accumulate_(self._sums[group], x2)
        self._tokens[group] += x2.shape[0]
        self._norms[group].append(x2.float().norm(dim=-1))
        self._last = (x, group)

    def __enter__(self) -> "HessianCollector":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the hooks (the accumulated Hessians stay)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None

    def new_batch(self) -> None:
        """Forget the last input seen, so that sharing is never inferred across forward calls."""
        self._last = None

    def names(self) -> list[str]:
        return list(self._group_of)

    def shared_with(self, name: str) -> list[str]:
        """All layers whose Hessian is the same tensor as ``name``'s."""
        g = self._group_of[name]
        return [n for n, gg in self._group_of.items() if gg == g]

    def tokens(self, name: str) -> int:
        return self._tokens[self._group_of[name]]

    def input_norm(self, name: str) -> float | None:
        """The median norm of the input tokens of layer ``name`` (None if it saw none or they are all
        zero): the reference of the activation coder's outlier test (ActivationConfig.outlier_ratio)."""
        if name not in self._group_of:
            raise KeyError(f"HessianCollector: no inputs were seen for {name!r}")
        norms = self._norms[self._group_of[name]]
        if not norms:
            return None
        median = float(torch.cat(norms).median())
        return median if math.isfinite(median) and median > 0 else None

    def hessian(self, name: str, damp: float | None = None) -> torch.Tensor:
        """(2/N) Σ x xᵀ + damp·mean(diag)·I for layer ``name`` (a new float32 tensor)."""
        if name not in self._group_of:
            raise KeyError(f"HessianCollector: no inputs were seen for {name!r}")
        g = self._group_of[name]
        H = self._sums[g] * (2.0 / max(self._tokens[g], 1))
        return damp_hessian(H, self.damp if damp is None else damp)


def damp_hessian(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp·mean(diag H)·I (a dead input, diag 0, gets the damping of the others)."""
    H = H.clone()
    d = H.diagonal()
    d.add_(damp * d.mean().clamp_min(1e-12))
    return H


def rotate_hessian(H: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """R H Rᵀ for R = Hadamard·diag(signs)/√n: the Hessian of the rotated inputs x' = R x."""
    HRt = hadamard_transform(H, signs)                 # rows of H rotated: H Rᵀ
    return hadamard_transform(HRt.T.contiguous(), signs).T.contiguous()  # R (H Rᵀ)


def collect_hessians(model: nn.Module, names: Iterable[str], batches: Iterable, damp: float = DEFAULT_DAMP):
    """Run ``model`` on every batch (each a tensor or a tuple of positional args) with a collector
    on the named linear submodules; returns the collector (hooks removed)."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"collect_hessians: no submodule named {missing[0]!r}")
    with HessianCollector({n: modules[n] for n in names}, damp) as hc, torch.no_grad():
        for batch in batches:
            hc.new_batch()
            model(*batch) if isinstance(batch, tuple) else model(batch)
    return hc
