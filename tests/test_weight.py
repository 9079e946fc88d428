"""quantize_weight and PVQWeight: quality, bit accounting, layout, dequantization."""

import pytest
import torch

import pvq_cuda
from conftest import requires_cuda
from pvq_cuda import PVQConfig, PVQWeight, quantize_weight


def _sqnr(w, w_hat):
    return float(10 * torch.log10(w.double().square().sum() / (w.double() - w_hat.double()).square().sum()))


def test_pvq_325_gaussian_4096_quality_and_rate():
    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    q = quantize_weight(w, PVQConfig.preset("pvq-3.25"))
    assert q.bpw <= 3.26
    sqnr = _sqnr(w, q.dequantize())
    print(f"\npvq-3.25 on N(0,1) 4096x4096: {sqnr:.2f} dB at {q.bpw:.4f} bpw")
    assert sqnr >= 16.9  # D=16, K=30: 17.2 dB; the paper's D=8, K=16 reference is 16.4 dB


@pytest.mark.parametrize("preset,floor", [("pvq-2.25", 11.0), ("pvq-4.25", 22.6), ("pvq8-2.25", 10.2),
                                          ("pvq8-3.25", 16.4)])
def test_presets_quality(preset, floor):
    w = torch.randn(256, 2048, generator=torch.Generator().manual_seed(1))
    q = quantize_weight(w, PVQConfig.preset(preset))
    assert _sqnr(w, q.dequantize()) >= floor


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("shape", [(1, 8), (33, 64), (70, 576), (5, 1536)])
def test_dequantize_equals_codec_decode(rotate, shape, device):
    """The packed layout, decoded by the kernels, is exactly the codec's decode of the stored codes."""
    cfg = PVQConfig(D=8, K=16, scale_bits=2, rotate=rotate, seed=3)
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(2)).to(device)
    q = quantize_weight(w, cfg)
    index, gain = q.unpack()
    pulses = pvq_cuda.decode(index, 8, 16).float()
    norm = pulses.square().sum(-1, keepdim=True).sqrt()
    ref = (q.row_scale.float()[:, None, None] * q.levels[gain].unsqueeze(-1) * pulses / norm).reshape(shape)
    torch.testing.assert_close(q.dequantize(rotated=True), ref, rtol=1e-6, atol=1e-7)
    # and the codes are the search result of the rotated weight
    rotated = w if not rotate else pvq_cuda.hadamard_transform(w, q.signs)
    assert torch.equal(pulses.to(torch.int8), pvq_cuda.search(rotated.reshape(shape[0], -1, 8), 16))


@pytest.mark.parametrize("bits", [(15, 3), (24, 2), (32, 2), (50, 2), (63, 1), (62, 2), (1, 0), (7, 8)])
def test_pack_unpack_round_trip(bits):
    index_bits, scale_bits = bits
    gen = torch.Generator().manual_seed(index_bits)
    rows, groups = 70, 9
    lo = torch.randint(0, 2 ** min(index_bits, 32), (rows, groups), generator=gen)
    hi = torch.randint(0, 2 ** max(index_bits - 32, 0), (rows, groups), generator=gen)
    index = hi << 32 | lo if index_bits > 32 else lo
    index[0, 0], index[1, 1] = 0, 2**index_bits - 1
    gain = torch.randint(0, 2**scale_bits, (rows, groups), generator=gen)
    words = torch.ops.pvq_cuda._pack_codes(index, gain, index_bits, scale_bits)
    assert words.numel() == 3 * groups * (index_bits + scale_bits)  # 3 tiles of 32 rows
    i2, g2 = torch.ops.pvq_cuda._unpack_codes(words, rows, groups, index_bits, scale_bits)
    assert torch.equal(i2, index) and torch.equal(g2, gain)


def test_layout_bit_positions():
    """Lane l's code sits at chunk bits [B l, B l + B), chunk (t, j) at words (t G + j) B."""
    B, rows, groups = 26, 40, 3
    index = torch.arange(rows * groups).reshape(rows, groups) * 1000 + 7
    gain = torch.arange(rows * groups).reshape(rows, groups) % 4
    words = torch.ops.pvq_cuda._pack_codes(index, gain, 24, 2).view(torch.int32).long() & 0xFFFFFFFF
    bits = "".join(format(int(w), "032b")[::-1] for w in words)  # little-endian bit string
    for r in (0, 5, 31, 32, 39):
        for j in range(groups):
            t, lane = divmod(r, 32)
            start = (t * groups + j) * B * 32 + lane * B
            code = int(bits[start:start + B][::-1], 2)
            assert code == (int(gain[r, j]) << 24 | int(index[r, j]))


def test_bpw_counts_everything():
    q = quantize_weight(torch.randn(100, 64), PVQConfig.preset("pvq-3.25"))
    tiles = 4  # 100 rows -> 4 tiles of 32 (28 padding rows)
    bits = tiles * 8 * 26 * 32 + 100 * 16 + 4 * 32 + 64
    assert q.bpw == pytest.approx(bits / (100 * 64))


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(8))
    with pytest.raises(ValueError, match="multiple of D=16"):
        quantize_weight(torch.randn(4, 12), PVQConfig(rotate=False))
    with pytest.raises(ValueError, match="finite"):
        quantize_weight(torch.tensor([[float("nan")] * 16]), PVQConfig(rotate=False))
    with pytest.raises(TypeError, match="floating"):
        quantize_weight(torch.ones(2, 8, dtype=torch.int32))


def test_corrupt_codes_are_refused():
    q = quantize_weight(torch.randn(4, 16), PVQConfig(D=8, K=6, scale_bits=3, rotate=False))
    codes = q.codes.clone()
    codes[0] = -1  # every index bit set: index >= V(8,6)
    with pytest.raises(ValueError, match="corrupt codes"):
        PVQWeight(codes, q.row_scale, q.levels, 4, 16, q.config)
    with pytest.raises(ValueError, match="codes must be torch.int32 of shape"):
        PVQWeight(q.codes[:-1], q.row_scale, q.levels, 4, 16, q.config)
    with pytest.raises(ValueError, match="row_scale must be torch.float16"):
        PVQWeight(q.codes, q.row_scale.float(), q.levels, 4, 16, q.config)
    with pytest.raises(ValueError, match="format_version 2"):
        PVQWeight(q.codes, q.row_scale, q.levels, 4, 16, q.config, format_version=2)


@requires_cuda
def test_quantize_on_cuda_matches_cpu():
    w = torch.randn(96, 576, generator=torch.Generator().manual_seed(5))
    a, b = quantize_weight(w), quantize_weight(w.cuda())
    assert torch.equal(a.row_scale, b.row_scale.cpu()) and torch.equal(a.levels, b.levels.cpu())
    # Rotation runs in float on both devices; codes may differ only where the search input differs.
    assert (a.codes != b.codes.cpu()).float().mean() < 0.01


def test_pvq_weight_save_load_round_trip(tmp_path):
    q = quantize_weight(torch.randn(70, 64), PVQConfig.preset("pvq-2.25", seed=11))
    path = tmp_path / "w.safetensors"
    pvq_cuda.save(path, {"layer": q, "bias": torch.randn(70)}, metadata={"note": "test"})
    back = pvq_cuda.load(path)
    w = back["layer"]
    assert isinstance(w, PVQWeight) and w.config == q.config and w.shape == q.shape
    assert torch.equal(w.codes, q.codes) and torch.equal(w.row_scale, q.row_scale)
    assert torch.equal(w.dequantize(), q.dequantize())
    assert pvq_cuda.read_metadata(path) == {"note": "test"}


@pytest.mark.parametrize("case", ["short_codes", "row_scale_dtype", "levels_shape", "bad_config", "big_index",
                                  "shape_mismatch", "version", "missing_info"])
def test_pvq_weight_with_wrong_parts_is_refused(tmp_path, monkeypatch, case):
    """Well-formed files (checksums fine) that hold an inconsistent PVQWeight must not load."""
    q = quantize_weight(torch.randn(40, 32), PVQConfig(D=8, K=6, scale_bits=3, rotate=False))
    edits = {
        "short_codes": lambda t, i: t.__setitem__("codes", t["codes"][:-1]),
        "row_scale_dtype": lambda t, i: t.__setitem__("row_scale", t["row_scale"].float()),
        "levels_shape": lambda t, i: t.__setitem__("levels", t["levels"][:2]),
        "bad_config": lambda t, i: i["config"].__setitem__("K", 500),
        "big_index": lambda t, i: t.__setitem__("codes", torch.full_like(t["codes"], -1)),
        "shape_mismatch": lambda t, i: i.__setitem__("in_features", 40),
        "version": lambda t, i: i.__setitem__("format_version", 2),
        "missing_info": lambda t, i: i.pop("out_features"),
    }
    original = PVQWeight.to_state

    def edited_state(self):
        tensors, info = original(self)
        tensors, info = dict(tensors), {**info, "config": dict(info["config"])}
        edits[case](tensors, info)
        return tensors, info

    monkeypatch.setattr(PVQWeight, "to_state", edited_state)
    path = tmp_path / "bad.safetensors"
    pvq_cuda.save(path, {"w": q})
    monkeypatch.setattr(PVQWeight, "to_state", original)
    with pytest.raises(pvq_cuda.FormatError, match="'w'|w"):
        pvq_cuda.load(path)
