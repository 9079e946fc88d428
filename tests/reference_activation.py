"""Reference activation coding and W+A product, from the codec ops and torch arithmetic alone.

``encode_reference`` follows csrc/activation/activation_code.h step by step, with the same rounding
(separate float products and sums, the fixed pairwise tree in float64, fp16 by round-to-nearest-
even), so that the encoder op must match it bit for bit. ``wa_reference`` dequantizes both operands
in float64 and multiplies them; ``block_dots`` gives the exact integer dot products per block.
"""

from __future__ import annotations

import numpy as np
import torch

import pvq_cuda

_INV_NORM = torch.from_numpy((1.0 / np.sqrt(np.arange(1, 127 * 127 + 1, dtype=np.float64))).astype(np.float32))
INV_NORM = torch.cat([torch.zeros(1), _INV_NORM])  # csrc/codec/split_tables.cpp: float(1 / sqrt(double(s)))


def tree_sum(v: torch.Tensor) -> torch.Tensor:
    """activation_code.h's tree_sum over the last dim (float64): strides 1, 2, 4, ..."""
    v = v.clone()
    G = v.shape[-1]
    stride = 1
    while stride < G:
        i = torch.arange(0, G - stride, 2 * stride)
        v[..., i] = v[..., i] + v[..., i + stride]
        stride *= 2
    return v[..., 0]


def encode_reference(x: torch.Tensor, signs, levels: torch.Tensor, D: int, K: int):
    """(pulses, index, gain, scale) as pvq_cuda.encode_activations gives them."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    xr = pvq_cuda.hadamard_transform(x.reshape(-1, n).float(), signs)  # fp32, as the encoder rotates
    T, G = xr.shape[0], n // D
    g = xr.view(T, G, D)
    pulses = pvq_cuda.search(g, K)
    index = pvq_cuda.encode(pulses, K)
    y = pulses.float()
    dot = torch.zeros(T, G)
    energy = torch.zeros(T, G, dtype=torch.float64)
    for d in range(D):  # sequential, one rounding per product and per sum
        dot = dot + g[..., d] * y[..., d]
        energy = energy + g[..., d].double() * g[..., d].double()
    sq = pulses.long().square().sum(-1)
    gain = dot * INV_NORM[sq]
    norm = tree_sum(energy).sqrt().float()  # [T]
    mid = (levels[1:] + levels[:-1]) / 2
    ratio = gain / norm.unsqueeze(-1)
    code = torch.where(norm.unsqueeze(-1) > 0, torch.bucketize(ratio, mid), torch.zeros((), dtype=torch.long))
    lv = levels[code].double()
    num, den = tree_sum(lv * gain.double()), tree_sum(lv * lv)
    scale = torch.where(den > 0, num / den, torch.zeros((), dtype=torch.float64)).float().half()
    return (pulses.view(*lead, n), index.view(*lead, G), code.to(torch.uint8).view(*lead, G), scale.view(lead))


def activation_factors(pulses: torch.Tensor, gain: torch.Tensor, scale: torch.Tensor, levels: torch.Tensor,
                       D: int) -> torch.Tensor:
    """float64 factor of each activation group, scale · level / |y| (the exact real value)."""
    y = pulses.view(*pulses.shape[:-1], -1, D).double()
    return scale.double().unsqueeze(-1) * levels.double()[gain.long()] / y.square().sum(-1).sqrt()


def dequantize_reference(pulses, gain, scale, levels, D) -> torch.Tensor:
    """float64 x̂' [..., n] in the rotated basis."""
    f = activation_factors(pulses, gain, scale, levels, D)
    y = pulses.view(*pulses.shape[:-1], -1, D).double()
    return (f.unsqueeze(-1) * y).view(pulses.shape)


def weight_reference(weight: pvq_cuda.PVQWeight):
    """(pulses int8 [N, n], float64 factor per group [N, G]) of a packed weight: x̂ = factor · y."""
    index, code = weight.unpack()
    c = weight.config
    y = pvq_cuda.decode(index, c.D, c.K)
    f = (weight.row_scale.double().unsqueeze(-1) * weight.levels.double()[code]
         / y.double().square().sum(-1).sqrt())
    return y.reshape(weight.out_features, -1), f


def wa_reference(pulses, gain, scale, act_levels, act_D, weight: pvq_cuda.PVQWeight, bias=None) -> torch.Tensor:
    """float64 x̂' Ŵ'ᵀ (+ bias): both operands dequantized in float64, in the rotated basis."""
    xh = dequantize_reference(pulses, gain, scale, act_levels, act_D)
    yw, fw = weight_reference(weight)
    w = (fw.unsqueeze(-1) * yw.view(*fw.shape, -1).double()).reshape(weight.out_features, -1)
    out = xh.reshape(-1, xh.shape[-1]) @ w.T
    if bias is not None:
        out = out + bias.double()
    return out.view(*pulses.shape[:-1], weight.out_features)


def block_dots(pulses: torch.Tensor, weight_pulses: torch.Tensor, block: int) -> torch.Tensor:
    """Exact integer dot products per block of columns: int64 [tokens, out, n / block]."""
    x = pulses.reshape(-1, pulses.shape[-1]).long().view(pulses.shape[0] if pulses.dim() == 2 else -1,
                                                         -1, block)
    w = weight_pulses.long().view(weight_pulses.shape[0], -1, block)
    return torch.einsum("tbd,obd->tob", x, w)
