"""Online activation coding and the W+A product (paper.md §7): the ops against their references.

- encode_activations equals tests/reference_activation.py bit for bit (pulses, index, gain codes,
  fp16 scales), which is built from the codec ops (hadamard_transform, search, encode) on the
  rotated fp32 tokens and torch arithmetic with the header's rounding;
- wa_matmul equals the float64 product of both dequantized operands within a float32 bound, and
  its integer part (the block dot products) exactly;
- bad input gets a clear exception naming the argument.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pvq_cuda
from pvq_cuda.format.activation import ACT_PRESETS, ActivationConfig, activation_levels, code_activations, wa_matmul
from pvq_cuda.format.weight import rotation_signs
from pvq_cuda.ops import encode_activations
from pvq_cuda.ops import wa_matmul as wa_matmul_op
from conftest import requires_cuda
from reference_activation import (activation_factors, block_dots, dequantize_reference, encode_reference, wa_reference,
                                  weight_reference)

# (n, D) pairs: n a Hadamard size (m * 2^k), D | n; odd token counts below.
SHAPES = [(8, 8), (12, 4), (24, 2), (40, 8), (64, 16), (96, 32), (576, 8), (576, 2), (1536, 8), (112, 1)]


def _levels(D, n, gain_bits):
    return activation_levels(ActivationConfig(D, min(pvq_cuda.max_pulses(D), 7), gain_bits), n)


def _random_tokens(gen, tokens, n, dtype, heavy=False):
    x = torch.randn(tokens, n, generator=gen)
    if heavy:  # LLM-like: a few large outlier channels
        x[:, torch.randint(0, n, (max(1, n // 64),), generator=gen)] *= 30
    x *= torch.exp(torch.randn(tokens, 1, generator=gen))  # per-token norms over decades
    return x.to(dtype)


@settings(max_examples=40, deadline=None)
@given(shape=st.sampled_from(SHAPES), data=st.data(), tokens=st.integers(1, 9), gain_bits=st.integers(0, 8),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), signed=st.booleans(),
       heavy=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_encoder_matches_reference_bit_for_bit(shape, data, tokens, gain_bits, dtype, signed, heavy, seed):
    n, D = shape
    K = data.draw(st.integers(1, pvq_cuda.max_pulses(D)), label="K")
    gen = torch.Generator().manual_seed(seed)
    x = _random_tokens(gen, tokens, n, dtype, heavy)
    signs = rotation_signs(n, seed) if signed else None
    levels = _levels(D, n, gain_bits)
    got = encode_activations(x, signs, levels, D, K, gain_bits)
    want = encode_reference(x, signs, levels, D, K)
    for name, a, b in zip(("pulses", "index", "gain", "scale"), got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("name", list(ACT_PRESETS))
def test_presets_match_the_codec_ops_on_real_shapes(name):
    """At each preset, on SmolLM2's hidden sizes: pulses = search(R x), index = encode(pulses)."""
    cfg = ACT_PRESETS[name]
    gen = torch.Generator().manual_seed(11)
    for n in (576, 1536):
        x = torch.randn(16, 8, n, generator=gen) * 4
        signs = rotation_signs(n, 3)
        codes = code_activations(x, cfg, signs)
        rotated = pvq_cuda.hadamard_transform(x, signs)
        pulses = pvq_cuda.search(rotated.view(16, 8, -1, cfg.D), cfg.K)
        assert torch.equal(codes.pulses.view(pulses.shape), pulses)
        assert torch.equal(codes.index, pvq_cuda.encode(pulses, cfg.K))
        assert codes.gain.shape == (16, 8, n // cfg.D) and codes.scale.shape == (16, 8)
        assert int(codes.gain.max()) < 1 << cfg.gain_bits
        # and the reconstruction is as good as the preset's rate says (Gaussian rows). The pooled
        # SQNR has a left tail: now and then one group lies past the top gain level and is clipped.
        # Over 200 draws of these 128 tokens (mean, sd, min in dB at n=576; at 1536 the spread is
        # smaller): a4.25 23.0, 0.02, 22.96; a6.25 35.1, 0.07, 34.5; a8 41.5, 0.32, 39.6; a8.5 44.3,
        # 0.39, 41.4. The bounds sit 3-5 sd under the means, and some draws fall below them, so the
        # draw is fixed (seed 11).
        err = (codes.dequantize() - rotated).square().sum() / rotated.square().sum()
        sqnr = -10 * math.log10(err.item())
        assert sqnr > {"pvq-a4.25": 22.9, "pvq-a6.25": 34.8, "pvq-a8": 40.5, "pvq-a8.5": 43.2}[name]
        assert codes.bits_per_activation() == pytest.approx(cfg.code_bits / cfg.D + 16 / n)


def test_encoder_fp16_input_codes_the_fp32_rotation():
    """A 16-bit token is rotated in fp32 and never rounded back to 16 bits before the search."""
    x = torch.randn(64, 576).half()
    signs = rotation_signs(576, 1)
    cfg = ACT_PRESETS["pvq-a6.25"]
    codes = code_activations(x, cfg, signs)
    rotated32 = pvq_cuda.hadamard_transform(x.float(), signs)
    assert torch.equal(codes.pulses, pvq_cuda.search(rotated32.view(64, -1, 8), cfg.K).view(64, 576))


def test_zero_and_tiny_tokens():
    cfg = ACT_PRESETS["pvq-a4.25"]
    x = torch.randn(4, 64)
    x[1] = 0
    x[2] *= 1e-30  # subnormal fp16 scale range
    codes = code_activations(x, cfg, rotation_signs(64, 0))
    assert float(codes.scale[1]) == 0 and int(codes.gain[1].max()) == 0
    assert torch.equal(codes.dequantize()[1], torch.zeros(64))
    want = encode_reference(x, rotation_signs(64, 0), codes.levels, cfg.D, cfg.K)
    assert all(torch.equal(a, b) for a, b in zip(codes[:4], want))


def test_encoder_rejects_nonfinite_and_overflow():
    cfg = ACT_PRESETS["pvq-a4.25"]
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(3, 2, 64)
        x[1, 0, 17] = bad
        with pytest.raises(ValueError, match=r"x must be finite, but token 2 .* NaN or Inf"):
            code_activations(x, cfg, None)
    x = torch.randn(3, 64)
    x[2] *= 1e5  # norm ~8e5: past fp16's 65504
    with pytest.raises(ValueError, match=r"token 2 .* past the float16 range"):
        code_activations(x, cfg, None)


def test_encoder_bad_arguments():
    n = 64
    x, lv = torch.randn(3, n), _levels(8, n, 4)
    enc = encode_activations
    with pytest.raises(TypeError, match="x must have dtype float32, float16, bfloat16; got float64"):
        enc(x.double(), None, lv, 8, 7, 4)
    with pytest.raises(TypeError, match="x must have dtype"):
        enc(x.int(), None, lv, 8, 7, 4)
    with pytest.raises(ValueError, match="D must be one of"):
        enc(x, None, lv, 3, 7, 4)
    with pytest.raises(ValueError, match="K must be"):
        enc(x, None, lv, 8, 128, 4)
    with pytest.raises(ValueError, match=r"ceil\(log2 V\(D,K\)\)"):
        enc(torch.randn(2, 64), None, _levels(16, 64, 4), 16, 60, 4)
    with pytest.raises(ValueError, match="multiple of D=16"):
        enc(torch.randn(2, 24), None, _levels(8, 24, 4), 16, 7, 4)
    with pytest.raises(ValueError, match="Hadamard size"):
        enc(torch.randn(2, 88), None, _levels(8, 88, 4), 8, 7, 4)
    with pytest.raises(ValueError, match="gain_bits must be an int in"):
        enc(x, None, lv, 8, 7, 9)
    with pytest.raises(ValueError, match=r"levels must have shape \[16\]"):
        enc(x, None, lv[:8], 8, 7, 4)
    with pytest.raises(ValueError, match="increasing order"):
        enc(x, None, lv.flip(0), 8, 7, 4)
    with pytest.raises(ValueError, match=r"signs must have shape \[n\] = \[64\]"):
        enc(x, torch.ones(32), lv, 8, 7, 4)
    with pytest.raises(ValueError, match="0-d"):
        enc(torch.tensor(1.0), None, lv, 8, 7, 4)
    # the raw op checks the same in C++
    with pytest.raises(ValueError, match="multiple of D=16"):
        torch.ops.pvq_cuda.encode_activations.default(torch.randn(2, 24), None, _levels(8, 24, 4), 16, 7, 4)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        torch.ops.pvq_cuda.encode_activations.default(x.double(), None, lv, 8, 7, 4)


def test_activation_config_validates_and_counts_bits():
    cfg = ActivationConfig(8, 29, 4)
    assert cfg.code_bits == 34 and cfg.code_bpa == 4.25
    assert cfg.bits_per_activation(4096) == pytest.approx(4.25 + 16 / 4096)
    assert ACT_PRESETS["pvq-a6.25"].code_bpa == 6.25 and ACT_PRESETS["pvq-a8"].code_bpa == 8.0
    assert ACT_PRESETS["pvq-a8.5"].code_bpa == 8.5
    assert ActivationConfig.preset("pvq-a4.25", gain_bits=3).gain_bits == 3
    for bad, match in (({"D": 3}, "D must be one of"), ({"K": 0}, "K must be"), ({"gain_bits": 9}, "gain_bits"),
                       ({"gain_bits": True}, "gain_bits"), ({"D": 32, "K": 40}, "log2")):
        with pytest.raises(ValueError, match=match):
            ActivationConfig(**bad)
    with pytest.raises(ValueError, match="unknown preset"):
        ActivationConfig.preset("pvq-a5")
    assert "ActivationConfig" in pvq_cuda.__all__ and pvq_cuda.ActivationConfig is ActivationConfig


@requires_cuda
@pytest.mark.parametrize("n, preset", [(576, "pvq-a4.25"), (4096, "pvq-a6.25"), (3840, "pvq-a8"), (8192, "pvq-a8.5")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_encoder_matches_cpu_bit_for_bit(n, preset, dtype):
    """The fused CUDA kernel (activation/encode.cu) gives the CPU kernel's codes: pulses, index, gain code
    and the fp16 scale's bits; a NaN token raises the CPU path's error."""
    gen = torch.Generator().manual_seed(n)
    cfg = ACT_PRESETS[preset]
    x = _random_tokens(gen, 37, n, dtype, heavy=True)
    signs = rotation_signs(n, 3)
    levels = activation_levels(cfg, n)
    want = encode_activations(x, signs, levels, cfg.D, cfg.K, cfg.gain_bits)
    got = encode_activations(x.cuda(), signs.cuda(), levels.cuda(), cfg.D, cfg.K, cfg.gain_bits)
    for name, w, g in zip(("pulses", "index", "gain", "scale"), want, got):
        g = g.cpu()
        if name == "scale":
            w, g = w.view(torch.int16), g.view(torch.int16)
        assert torch.equal(g, w), f"{name}: {(g != w).reshape(37, -1).any(1).sum()} tokens differ"
    x[5, 7] = float("nan")
    with pytest.raises(ValueError, match="token 5 .* holds NaN or Inf"):
        encode_activations(x.cuda(), signs.cuda(), levels.cuda(), cfg.D, cfg.K, cfg.gain_bits)


# --------------------------------------------------------------------------------------------
# W+A product
# --------------------------------------------------------------------------------------------

def _layer_and_codes(gen, N, n, wcfg, acfg, tokens, bias=True):
    W = torch.randn(N, n, generator=gen)
    weight = pvq_cuda.quantize_weight(W, wcfg)
    x = _random_tokens(gen, tokens, n, torch.float32, heavy=True)
    codes = code_activations(x, acfg, weight.signs)
    b = torch.randn(N, generator=gen) if bias else None
    return weight, codes, b


def _float_bound(codes, weight):
    """|Σ terms| rounding bound of the kernel's float32 sum: per block (fx·fw)·dot is 3 roundings, the
    running sum over B blocks B more, then the row scale one: (B + 4) u Σ|term| with u = 2^-24, plus
    the rounding of the float32 factors themselves (3 u each side)."""
    a, c = codes.config, weight.config
    d = min(a.D, c.D)
    fx = activation_factors(codes.pulses, codes.gain, codes.scale, codes.levels, a.D)      # [T, Ga]
    yw, fw = weight_reference(weight)                                                      # [N, n], [N, Gw]
    dots = block_dots(codes.pulses.view(-1, weight.in_features), yw, d).double()           # [T, N, B]
    fxb = fx.view(-1, fx.shape[-1]).repeat_interleave(a.D // d, dim=1)                      # [T, B]
    fwb = fw.repeat_interleave(c.D // d, dim=1)                                             # [N, B]
    terms = (fxb[:, None, :] * fwb[None, :, :] * dots).abs().sum(-1)                        # [T, N]
    B = weight.in_features // d
    return (B + 10) * 2.0**-24 * terms


@settings(max_examples=25, deadline=None)
@given(wname=st.sampled_from(["pvq-3.25", "pvq-4.25", "pvq-2.25"]), aname=st.sampled_from(list(ACT_PRESETS)),
       n=st.sampled_from([64, 96, 576]), N=st.integers(1, 70), tokens=st.integers(1, 7), bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_wa_matmul_matches_float64_reference(wname, aname, n, N, tokens, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    weight, codes, b = _layer_and_codes(gen, N, n, pvq_cuda.PVQConfig.preset(wname), ACT_PRESETS[aname], tokens, bias)
    got = wa_matmul(codes, weight, b).double()
    want = wa_reference(codes.pulses, codes.gain, codes.scale, codes.levels, codes.config.D, weight, b)
    bound = _float_bound(codes, weight).view_as(got) + (0 if b is None else 2.0**-24 * b.abs().double())
    assert got.shape == (tokens, N)
    assert bool(((got - want).abs() <= bound).all()), float(((got - want).abs() - bound).max())


@pytest.mark.parametrize("D", [1, 2, 8, 16, 32])
def test_wa_matmul_integer_part_is_exact(D):
    """One group per row (in_features = D for both operands): out / (fx·fw) is the group's integer
    pulse dot product, recovered exactly (|dot| <= 127^2 and ~5 float32 roundings: error < 0.01)."""
    gen = torch.Generator().manual_seed(D)
    wcfg = pvq_cuda.PVQConfig(D=D, K=min(pvq_cuda.max_pulses(D), 20), scale_bits=2)
    acfg = ActivationConfig(D, min(pvq_cuda.max_pulses(D), 17), 3)
    weight, codes, _ = _layer_and_codes(gen, 70, D, wcfg, acfg, 11, bias=False)
    out = wa_matmul(codes, weight).double()
    fx = activation_factors(codes.pulses, codes.gain, codes.scale, codes.levels, D)[:, 0]
    yw, fw = weight_reference(weight)
    dots = block_dots(codes.pulses, yw, D)[..., 0]
    f = fx[:, None] * fw[None, :, 0]
    assert bool((f != 0).all()) and bool((dots != 0).any())
    assert torch.equal(torch.round(out / f).long(), dots)


@pytest.mark.parametrize("wD,aD", [(16, 8), (8, 16), (16, 2), (4, 32), (1, 8), (8, 1)])
def test_wa_matmul_mixed_group_sizes(wD, aD):
    """Groups of different sizes meet in blocks of min(D, act_D) columns: the exact integer block dots
    combined in float64 with both groups' factors give the kernel's result to the float32 bound."""
    gen = torch.Generator().manual_seed(wD * 100 + aD)
    wcfg = pvq_cuda.PVQConfig(D=wD, K=min(pvq_cuda.max_pulses(wD), 20), scale_bits=2)
    acfg = ActivationConfig(aD, min(pvq_cuda.max_pulses(aD), 17), 3)
    weight, codes, _ = _layer_and_codes(gen, 33, 64, wcfg, acfg, 5, bias=False)
    got = wa_matmul(codes, weight).double()
    d = min(wD, aD)
    fx = activation_factors(codes.pulses, codes.gain, codes.scale, codes.levels, aD).repeat_interleave(aD // d, 1)
    yw, fw = weight_reference(weight)
    dots = block_dots(codes.pulses, yw, d).double()
    want = (fx[:, None, :] * fw.repeat_interleave(wD // d, 1)[None] * dots).sum(-1)
    assert bool(((got - want).abs() <= _float_bound(codes, weight)).all())
    ref = wa_reference(codes.pulses, codes.gain, codes.scale, codes.levels, aD, weight)
    assert bool(((got - ref).abs() <= _float_bound(codes, weight)).all())


def test_wa_matmul_leading_dims_and_large_batch():
    gen = torch.Generator().manual_seed(5)
    weight, codes, b = _layer_and_codes(gen, 130, 96, pvq_cuda.PVQConfig.preset("pvq-3.25"),
                                        ACT_PRESETS["pvq-a6.25"], 200)
    flat = wa_matmul(codes, weight, b)
    shaped = code_activations(torch.randn(2, 3, 96).mul(2), ACT_PRESETS["pvq-a6.25"], weight.signs)
    assert wa_matmul(shaped, weight).shape == (2, 3, 130)
    # every token independent of the others in the batch
    one = wa_matmul(code_activations(torch.zeros(1, 96), ACT_PRESETS["pvq-a6.25"], weight.signs), weight, b)
    assert torch.equal(one[0], b.float())
    assert flat.shape == (200, 130)


def test_wa_matmul_bad_arguments():
    gen = torch.Generator().manual_seed(2)
    weight, codes, b = _layer_and_codes(gen, 40, 64, pvq_cuda.PVQConfig.preset("pvq-3.25"), ACT_PRESETS["pvq-a4.25"], 3)
    c, a = weight.config, codes.config
    args = [codes.pulses, codes.gain, codes.scale, codes.levels, weight.codes, weight.row_scale, weight.levels, b, 40,
            c.D, c.K, c.scale_bits, a.D, a.K]

    def call(**change):
        names = ["pulses", "gain", "scale", "act_levels", "codes", "row_scale", "levels", "bias", "out_features", "D",
                 "K", "scale_bits", "act_D", "act_K"]
        kw = dict(zip(names, args))
        kw.update(change)
        return wa_matmul_op(*[kw[k] for k in names])

    with pytest.raises(ValueError, match=r"in_features=64"):
        wa_matmul(code_activations(torch.randn(3, 32), a, None), weight)
    with pytest.raises(TypeError, match="pulses must have dtype int8"):
        call(pulses=codes.pulses.int())
    with pytest.raises(ValueError, match=r"pulses must have shape \[\.\.\., 64\] \(the layer's in_features\), got"):
        call(pulses=torch.cat([codes.pulses, codes.pulses], -1), gain=torch.cat([codes.gain, codes.gain], -1))
    with pytest.raises(ValueError, match=r"gain must have shape \[3, 8\]"):
        call(gain=codes.gain[:, :4])
    with pytest.raises(TypeError, match="scale must have dtype float16"):
        call(scale=codes.scale.float())
    with pytest.raises(ValueError, match=r"act_levels must have shape \[2\^gain_bits\]"):
        call(act_levels=codes.levels[:3])
    with pytest.raises(ValueError, match="D must be one of"):
        call(act_D=128)
    w24 = pvq_cuda.quantize_weight(torch.randn(8, 24), pvq_cuda.PVQConfig.preset("pvq-4.25"))
    p24 = torch.zeros(2, 24, dtype=torch.int8)
    p24[:, ::16] = 7
    with pytest.raises(ValueError, match=r"in_features \(24\) must be a multiple of act_D=16"):
        wa_matmul_op(p24, torch.zeros(2, 1, dtype=torch.uint8), torch.ones(2).half(), torch.ones(1), w24.codes,
                     w24.row_scale, w24.levels, None, 8, 8, 29, 4, 16, 7)
    bad = codes.pulses.clone()
    bad[1, 9] += 1  # group 1 of token 1 no longer sums to K
    with pytest.raises(ValueError, match=r"sum \|y\| == act_K=29, but token 1, group 1 has sum \|y\| = 30"):
        call(pulses=bad)
    with pytest.raises(ValueError, match=r"act_K=28.*token 0, group 0"):
        call(act_K=28)
    with pytest.raises(ValueError, match=r"gain codes must be < 8 .* token 0, group 0 holds"):
        call(act_levels=codes.levels[:8], gain=torch.full_like(codes.gain, 9))
    with pytest.raises(ValueError, match="bias must have shape"):
        call(bias=torch.zeros(7))
    with pytest.raises(ValueError, match="corrupt"):
        call(codes=torch.full_like(weight.codes, -1))


@requires_cuda
@pytest.mark.parametrize("wname, aname, tokens", [("pvq-3.25", "pvq-a4.25", 1), ("pvq-4.25", "pvq-a6.25", 5),
                                                  ("pvq8-3.25", "pvq-a8", 16), ("pvq-2.25", "pvq-a8.5", 40)])
def test_cuda_wa_matmul_matches_float64_reference(wname, aname, tokens):
    """The CUDA path (activations decoded, then the fused GEMV up to 16 tokens and cuBLAS tiles above)
    is within the float32 bound of the float64 product of both dequantized operands, as the CPU op
    is; bad activation codes raise the CPU path's error."""
    gen = torch.Generator().manual_seed(tokens)
    weight, codes, b = _layer_and_codes(gen, 200, 576, pvq_cuda.PVQConfig.preset(wname), ACT_PRESETS[aname], tokens)
    want = wa_reference(codes.pulses, codes.gain, codes.scale, codes.levels, codes.config.D, weight, b)
    # Any summation order of in_features fp32 products: (n + 66) u of the absolute products.
    xh = dequantize_reference(codes.pulses, codes.gain, codes.scale, codes.levels, codes.config.D)
    absolute = xh.abs() @ weight.dequantize(rotated=True).double().abs().T
    bound = (576 + 66) * 2.0**-24 * absolute + 2.0**-24 * b.abs().double()
    cuda_codes = codes._replace(pulses=codes.pulses.cuda(), index=codes.index.cuda(), gain=codes.gain.cuda(),
                                scale=codes.scale.cuda(), levels=codes.levels.cuda())
    got = wa_matmul(cuda_codes, weight.to("cuda"), b.cuda()).cpu().double()
    assert got.shape == want.shape
    assert bool(((got - want).abs() <= bound).all()), float(((got - want).abs() - bound).max())
    bad = cuda_codes.pulses.clone()
    bad[tokens - 1, 9] += 1 if bad[tokens - 1, 9] >= 0 else -1
    with pytest.raises(ValueError, match=rf"but token {tokens - 1}, group {9 // codes.config.D} has sum"):
        wa_matmul(cuda_codes._replace(pulses=bad), weight.to("cuda"), b.cuda())


def test_opcheck_and_compile():
    gen = torch.Generator().manual_seed(3)
    weight, codes, b = _layer_and_codes(gen, 40, 64, pvq_cuda.PVQConfig.preset("pvq-4.25"), ACT_PRESETS["pvq-a6.25"], 5)
    c, a = weight.config, codes.config
    x = torch.randn(2, 5, 64)
    torch.library.opcheck(torch.ops.pvq_cuda.encode_activations.default,
                          (x, weight.signs, codes.levels, a.D, a.K, a.gain_bits))
    torch.library.opcheck(torch.ops.pvq_cuda.encode_activations.default, (x[0].half(), None, codes.levels, a.D, a.K,
                                                                           a.gain_bits))
    torch.library.opcheck(torch.ops.pvq_cuda.wa_matmul.default,
                          (codes.pulses, codes.gain, codes.scale, codes.levels, weight.codes, weight.row_scale,
                           weight.levels, b, 40, c.D, c.K, c.scale_bits, a.D, a.K))

    def f(x):
        return wa_matmul(code_activations(x, a, weight.signs, codes.levels), weight, b) * 2

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))
    meta = encode_activations(torch.empty(3, 7, 64, device="meta"), None, codes.levels.to("meta"), 8, 20, 6)
    assert [t.shape for t in meta] == [(3, 7, 64), (3, 7, 8), (3, 7, 8), (3, 7)]


def test_reference_tree_is_the_header_order():
    """The reference's tree_sum adds in the header's order (strides 1, 2, 4, ...), not torch.sum's."""
    from reference_activation import tree_sum

    v = torch.tensor([[1e16, 1.0, -1e16, 1.0, 3.0]], dtype=torch.float64)
    # strides 1, 2, 4: ((1e16 + 1) + (-1e16 + 1)) + 3 = 3 (each +1 is lost), a sequential sum gives 4
    want = ((np.float64(1e16) + 1.0) + (np.float64(-1e16) + 1.0)) + 3.0
    assert want == 3.0 and float(tree_sum(v)[0]) == want
