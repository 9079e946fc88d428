"""Integer activation baselines for W+A comparisons (simulated quantization).

``int<b>-token``: symmetric round-to-nearest to ``b`` bits with one fp16 scale per token
(``absmax / (2^(b-1) - 1)``), QuaRot-style: the token is first rotated with the layer's own
randomized Hadamard transform (the rotation the PVQ codes use). ``int<b>-g<G>``: the same with
one fp16 scale per group of G consecutive rotated values. Bits per activation count the scales:
``b + 16/n`` per token, ``b + 16/G`` per group. No clipping search (QuaRot's optional clip ratio
is not applied).

They run as forward pre-hooks on PVQ layers: the input x becomes ``Rᵀ Q(R x)``, and the layer,
which rotates its input itself, multiplies ``Q(R x)`` with its decoded weight (up to one fp32
rounding of the round trip). Simulated: the output is computed in floating point.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..layers.linear import PVQLinear
from ..ops import hadamard_transform

_NAME = re.compile(r"^int(\d+)-(token|g(\d+))$")


@dataclass(frozen=True)
class IntActivations:
    """A per-token or per-group symmetric INT activation quantizer."""

    bits: int
    group: int | None  # None: one scale per token

    @property
    def name(self) -> str:
        return f"int{self.bits}-" + ("token" if self.group is None else f"g{self.group}")

    @property
    def label(self) -> str:
        return f"INT{self.bits} " + ("per-token" if self.group is None else f"g{self.group}")

    def bits_per_activation(self, n: int) -> float:
        return self.bits + 16 / (n if self.group is None else self.group)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantized x [..., n] (float32): symmetric RTN, fp16 scales, levels -q..q, q = 2^(b-1)-1."""
        n = x.shape[-1]
        g = self.group or n
        if n % g:
            raise ValueError(f"{self.name}: the hidden size {n} is not a multiple of the group size {g}")
        q = 2 ** (self.bits - 1) - 1
        v = x.float().reshape(*x.shape[:-1], n // g, g)
        scale = (v.abs().amax(-1, keepdim=True) / q).half().float()
        out = torch.where(scale > 0, torch.round(v / scale.clamp_min(1e-30)).clamp(-q, q) * scale, torch.zeros(()))
        return out.reshape(x.shape)


def parse_activation_baseline(name: str) -> IntActivations:
    """``int<b>-token`` or ``int<b>-g<G>`` (2 <= b <= 16) as an IntActivations."""
    m = _NAME.match(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(f"unknown activation baseline {name!r}: expected 'int<b>-token' or 'int<b>-g<G>'")
    bits = int(m.group(1))
    group = int(m.group(3)) if m.group(3) else None
    if not 2 <= bits <= 16 or (group is not None and group < 1):
        raise ValueError(f"activation baseline {name!r}: bits must be in [2, 16] and the group size >= 1")
    return IntActivations(bits, group)


@contextlib.contextmanager
def simulated_activations(model: nn.Module, method: IntActivations | str):
    """Within the block, every PVQ layer of ``model`` sees its input quantized by ``method`` in its
    own rotated basis (see the module doc). The layers must not code activations themselves and
    must be rotated."""
    q = parse_activation_baseline(method) if isinstance(method, str) else method
    layers = [m for m in model.modules() if isinstance(m, PVQLinear)]
    if not layers:
        raise ValueError("simulated_activations: the model has no PVQ layer")
    for m in layers:
        if m.act_config is not None:
            raise ValueError("simulated_activations: a layer already codes its activations (act_config is set)")
        if m.signs is None:
            raise ValueError("simulated_activations: a layer is not rotated (config.rotate=False)")

    def hook(module: PVQLinear, args):
        x = args[0]
        signs = module.signs.to(x.device)
        rotated = hadamard_transform(x.float(), signs)
        back = hadamard_transform(q.quantize(rotated)) * signs  # R^T: signs * H(.) / sqrt(n)
        return (back.to(x.dtype), *args[1:])

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        yield q
    finally:
        for h in handles:
            h.remove()
