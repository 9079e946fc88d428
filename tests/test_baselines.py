"""Scalar baselines: RTN and GPTQ (plain, act-order, Hadamard-rotated) against hand-made values,
a textbook GPTQ, and each other under the Hessian loss on a synthetic layer with correlated inputs."""

import pytest
import torch

from pvq_cuda.quantization.baselines import BASELINE_BITS, BASELINES, baseline_bpw, gptq_quantize, rtn_quantize
from pvq_cuda.quantization.error_feedback import hessian_loss
from pvq_cuda.quantization.hessian import damp_hessian

BITS = (2, 3, 4)


# ---------------------------------------------------------------- RTN

def test_rtn_known_values(device):
    # 3 bits, group 4. fp16(1/7) = 1170·2^-13 = 0.142822265625: the stored step, so the maximum 1.0
    # is reached only up to the step's rounding. Second group: grid -1 + {0, 1, 2, ...}·1, exact.
    # Third group: constant (step 0). Fourth: the minimum 0.1 is stored as fp16(0.1).
    s = 0.142822265625
    lo = 0.0999755859375  # fp16(0.1)
    W = torch.tensor([[0.0, 0.1, 0.7, 1.0, -1.0, 0.25, 6.0, 2.75],
                      [0.5, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1 + 7 * 0.5]], device=device)
    W_hat, bpw = rtn_quantize(W, 3, group=4)
    expected = torch.tensor([[0.0, s, 5 * s, 7 * s, -1.0, 0.0, 6.0, 3.0],
                             [0.5, 0.5, 0.5, 0.5, lo, lo, lo, lo + 7 * 0.5]], dtype=torch.float64)
    assert W_hat.dtype == torch.float32 and W_hat.device == W.device and W_hat.shape == W.shape
    torch.testing.assert_close(W_hat.double().cpu(), expected, rtol=0, atol=1e-6)
    assert bpw == 3 + 32 / 4
    # 2 bits on the first group: grid {0, 1/3, 2/3, 1} with step fp16(1/3) = 0.333251953125.
    W_hat2, _ = rtn_quantize(W[:1, :4], 2, group=4)
    s2 = 0.333251953125
    torch.testing.assert_close(W_hat2.double().cpu(), torch.tensor([[0.0, 0.0, 2 * s2, 3 * s2]], dtype=torch.float64),
                               rtol=0, atol=1e-7)


def test_rtn_error_decreases_with_bits_and_bpw():
    W = torch.randn(32, 256, generator=torch.Generator().manual_seed(0))
    errors = []
    for bits in range(2, 9):
        W_hat, bpw = rtn_quantize(W, bits)
        assert bpw == bits + 0.25
        # the error is at most half a step (+ fp16 rounding of the stored minimum and step)
        g = W.reshape(32, 2, 128)
        half_step = ((g.amax(-1) - g.amin(-1)) / (2**bits - 1) / 2).repeat_interleave(128, 1)
        assert bool(((W_hat - W).abs() <= half_step * 1.01 + 1e-3).all())
        errors.append(float((W_hat - W).square().mean()))
    assert all(a > 2.5 * b for a, b in zip(errors, errors[1:])), errors
    assert rtn_quantize(W, 3)[1] == 3.25 and rtn_quantize(W, 4)[1] == 4.25 and rtn_quantize(W, 2)[1] == 2.25
    assert rtn_quantize(W, 3, group=64)[1] == 3.5
    assert baseline_bpw(4, 128) == baseline_bpw(4, 128, (32, 256)) == 4.25
    assert baseline_bpw(4, 128, (32, 256), rotate=True) == 4.25 + 64 / (32 * 256)
    assert baseline_bpw(4, 128, (32, 576)) == 4 + 32 * 5 / 576  # 4 groups of 128 and one of 64


def test_rtn_ragged_last_group():
    # SmolLM2's n = 576 at group 128: four groups of 128 and a last one of 64
    W = torch.randn(8, 576, generator=torch.Generator().manual_seed(9))
    W_hat, bpw = rtn_quantize(W, 3, ragged=True)
    torch.testing.assert_close(W_hat[:, :512], rtn_quantize(W[:, :512], 3)[0], rtol=0, atol=0)
    torch.testing.assert_close(W_hat[:, 512:], rtn_quantize(W[:, 512:], 3, group=64)[0], rtol=0, atol=0)
    assert bpw == pytest.approx(3 + 32 * 5 / 576) and bpw > 3.25
    torch.testing.assert_close(rtn_quantize(W[:, :512], 3, ragged=True)[0], rtn_quantize(W[:, :512], 3)[0])


def test_rtn_half_precision_input_gives_float32():
    W = torch.randn(4, 128, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float16, torch.bfloat16):
        W_hat, _ = rtn_quantize(W.to(dtype), 4)
        assert W_hat.dtype == torch.float32
        torch.testing.assert_close(W_hat, rtn_quantize(W.to(dtype).float(), 4)[0])


# ---------------------------------------------------------------- GPTQ against a textbook loop

def _textbook_grid(x, bits):
    lo = x.amin(-1, keepdim=True).half().double()
    step = ((x.amax(-1, keepdim=True) - lo) / (2**bits - 1)).half().double()
    return lo, step


def _textbook_gptq(W, H, bits, group, act_order):
    """Frantar et al., Algorithm 1 without lazy batching, in float64: one column at a time, the
    error pushed into all later columns at once; group grids fitted when entering each group from
    the current weights, or (act-order, static groups) from the original weights up front."""
    W, H = W.double().clone(), H.double()
    rows, n = W.shape
    maxq = 2**bits - 1
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(n)
    if act_order:
        static = [_textbook_grid(W[:, g:g + group], bits) for g in range(0, n, group)]
    W, H = W[:, perm], H[perm][:, perm]
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    Q = torch.zeros_like(W)
    for i in range(n):
        if act_order:
            lo, step = static[int(perm[i]) // group]
        elif i % group == 0:
            lo, step = _textbook_grid(W[:, i:i + group], bits)
        w = W[:, i:i + 1]
        q = torch.clamp(torch.round((w - lo) / step), 0, maxq) * step + lo
        Q[:, i:i + 1] = q
        err = (w - q) / U[i, i]
        W[:, i + 1:] -= err @ U[i:i + 1, i + 1:]
    out = torch.empty_like(Q)
    out[:, perm] = Q
    return out


def _correlated_layer(rows, n, tokens, seed, outliers=()):
    """W with a few large input columns; H = 2/N XᵀX damped by 0.01, X = Z·A with random mixing A."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=gen) / n**0.5
    Z = torch.randn(tokens, n, generator=gen) * torch.linspace(0.2, 3.0, n)
    X = Z @ A
    H = damp_hessian(2.0 / tokens * (X.T @ X), 0.01)
    W = torch.randn(rows, n, generator=gen)
    for c in outliers:
        W[:, c] *= 12.0
    return W, H


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("n,group", [(128, 32), (384, 96), (512, 256), (320, 96)])
def test_gptq_matches_textbook(n, group, act_order, device):
    # group 96 straddles the 128-column super-blocks, group 256 spans two of them,
    # 320 = 3·96 + 32 ends with a short group
    W, H = _correlated_layer(12, n, 4 * n, seed=n + group)
    W_hat, bpw = gptq_quantize(W.to(device), H.to(device), 3, group=group, act_order=act_order, ragged=n % group > 0)
    ref = _textbook_gptq(W, H, 3, group, act_order)
    assert W_hat.dtype == torch.float32 and W_hat.device.type == device
    assert bpw == pytest.approx(3 + 32 * -(-n // group) / n)
    W_hat = W_hat.double().cpu()
    # Float32 lazy updates against a float64 eager loop: the same grid points, bit for bit, except
    # where a rounding tie (of a value or of a group's fp16 step) falls the other way. Feedback
    # stays within a row, so such a flip changes that row only.
    rows_equal = torch.isclose(W_hat, ref, rtol=0, atol=1e-6).all(1)
    assert int(rows_equal.sum()) >= 10, rows_equal
    assert abs(hessian_loss(W, W_hat, H) / hessian_loss(W, ref, H) - 1) < 0.01


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_identity_hessian_is_rtn(act_order):
    W = torch.randn(8, 256, generator=torch.Generator().manual_seed(2))
    W_hat, bpw = gptq_quantize(W, torch.eye(256), 4, act_order=act_order)
    W_rtn, bpw_rtn = rtn_quantize(W, 4)
    torch.testing.assert_close(W_hat, W_rtn, rtol=0, atol=1e-6)
    assert bpw == bpw_rtn == 4.25


def test_gptq_handles_a_singular_hessian():
    W = torch.randn(4, 128, generator=torch.Generator().manual_seed(3))
    X = torch.randn(16, 128, generator=torch.Generator().manual_seed(4))  # rank 16 < 128: singular
    W_hat, _ = gptq_quantize(W, X.T @ X, 4)
    assert bool(torch.isfinite(W_hat).all())


# ---------------------------------------------------------------- synthetic layer: who beats whom

@pytest.fixture(scope="module")
def losses():
    """hessian_loss of every method at 2, 3, 4 bits on a correlated layer, with and without outliers."""
    out = {}
    for kind, outliers in (("plain", ()), ("outliers", (5, 77, 140, 200))):
        W, H = _correlated_layer(64, 256, 2048, seed=1, outliers=outliers)
        for b in BITS:
            out[kind, "rtn", b] = hessian_loss(W, rtn_quantize(W, b)[0], H)
            out[kind, "gptq", b] = hessian_loss(W, gptq_quantize(W, H, b)[0], H)
            out[kind, "gptq-ao", b] = hessian_loss(W, gptq_quantize(W, H, b, act_order=True)[0], H)
            out[kind, "gptq-rot", b] = hessian_loss(W, gptq_quantize(W, H, b, rotate=True)[0], H)
    return out


def test_gptq_beats_rtn(losses):
    for kind in ("plain", "outliers"):
        for b in (3, 4):
            for m in ("gptq", "gptq-ao", "gptq-rot"):
                assert losses[kind, m, b] < 0.7 * losses[kind, "rtn", b], (kind, m, b, losses)


def test_act_order_helps(losses):
    for kind in ("plain", "outliers"):
        for b in BITS:
            assert losses[kind, "gptq-ao", b] < losses[kind, "gptq", b], (kind, b, losses)


def test_rotation_beats_plain_gptq_with_outliers(losses):
    for b in BITS:
        assert losses["outliers", "gptq-rot", b] < 0.5 * losses["outliers", "gptq", b], (b, losses)


def test_losses_decrease_with_bits(losses):
    for kind in ("plain", "outliers"):
        for m in ("rtn", "gptq", "gptq-ao", "gptq-rot"):
            seq = [losses[kind, m, b] for b in BITS]
            assert seq[0] > seq[1] > seq[2] > 0, (kind, m, seq)


# ---------------------------------------------------------------- rotation

@pytest.mark.parametrize("act_order", [False, True])
def test_rotation_round_trip(act_order, device):
    W, H = _correlated_layer(16, 576, 1200, seed=5, outliers=(3, 400))  # 576 = 36·16: Paley-II size
    W_hat, bpw = gptq_quantize(W.to(device), H.to(device), 8, group=64, rotate=True, seed=7, act_order=act_order)
    assert W_hat.device.type == device and W_hat.dtype == torch.float32
    assert bpw == 8 + 32 / 64 + 64 / (16 * 576)
    rel = float((W_hat.cpu() - W).norm() / W.norm())
    assert rel < 1e-2, rel
    # a different seed is a different rotation, hence a different (equally good) result
    W_hat2, _ = gptq_quantize(W.to(device), H.to(device), 8, group=64, rotate=True, seed=8, act_order=act_order)
    assert not torch.equal(W_hat, W_hat2)


# ---------------------------------------------------------------- the named baselines

@pytest.mark.parametrize("n", [256, 576])
def test_baselines_registry(n):
    W, H = _correlated_layer(8, n, 2 * n, seed=6)
    for b in BASELINE_BITS:
        for prefix in ("rtn", "gptq", "gptq-ao", "gptq-rot", "gptq-rot-ao"):
            assert f"{prefix}-int{b}" in BASELINES
    for name, fn in BASELINES.items():
        assert fn.__doc__ and isinstance(fn.needs_hessian, bool)
        W_hat, bpw = fn(W, H)
        assert W_hat.shape == W.shape and W_hat.dtype == torch.float32
        bits = int(name.rsplit("int", 1)[1])
        assert bpw == pytest.approx(bits + 32 * -(-n // 128) / n + (64 / W.numel() if "-rot" in name else 0), abs=1e-12)
        assert fn.needs_hessian == name.startswith("gptq")
    torch.testing.assert_close(BASELINES["rtn-int3"](W, None)[0], rtn_quantize(W, 3, ragged=True)[0])
    torch.testing.assert_close(BASELINES["gptq-rot-ao-int3"](W, H)[0],
                               gptq_quantize(W, H, 3, rotate=True, act_order=True, ragged=True)[0])
    with pytest.raises(ValueError, match="needs the layer's damped Hessian"):
        BASELINES["gptq-int4"](W, None)


# ---------------------------------------------------------------- bad input

def test_bad_input():
    W = torch.randn(4, 256)
    H = torch.eye(256)
    with pytest.raises(ValueError, match=r"multiple of group=128 \(or pass ragged=True"):
        rtn_quantize(torch.randn(4, 200), 4)
    with pytest.raises(ValueError, match="multiple of group=128"):
        gptq_quantize(torch.randn(4, 200), torch.eye(200), 4)
    with pytest.raises(ValueError, match=r"H must have shape \[n, n\] = \[256, 256\]"):
        gptq_quantize(W, torch.eye(128), 4)
    with pytest.raises(ValueError, match=r"H must have shape"):
        gptq_quantize(W, torch.ones(256), 4)
    with pytest.raises(TypeError, match="H must be"):
        gptq_quantize(W, None, 4)
    for bad in (1, 9, 0, 3.0, True, "4"):
        with pytest.raises(ValueError, match=r"bits must be an integer in 2\.\.8"):
            rtn_quantize(W, bad)
        with pytest.raises(ValueError, match=r"bits must be an integer in 2\.\.8"):
            gptq_quantize(W, H, bad)
    Wn = W.clone()
    Wn[1, 3] = float("nan")
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        rtn_quantize(Wn, 4)
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        gptq_quantize(Wn, H, 4)
    Hi = H.clone()
    Hi[2, 2] = float("inf")
    with pytest.raises(ValueError, match="H contains NaN or Inf"):
        gptq_quantize(W, Hi, 4)
    with pytest.raises(ValueError, match="2-D"):
        rtn_quantize(torch.randn(256), 4)
    with pytest.raises(TypeError, match="floating-point"):
        rtn_quantize(torch.ones(4, 256, dtype=torch.int32), 4)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        rtn_quantize([[0.0] * 128], 4)
    with pytest.raises(ValueError, match="group must be a positive integer"):
        rtn_quantize(W, 4, group=0)
    with pytest.raises(ValueError, match="fp16 range"):
        rtn_quantize(W * 1e5, 4)
    with pytest.raises(ValueError, match="Hadamard size"):
        gptq_quantize(torch.randn(4, 352), torch.eye(352), 4, group=32, rotate=True)  # 352 = 11·32
    with pytest.raises(ValueError, match="seed must be"):
        gptq_quantize(W, H, 4, rotate=True, seed=-1)
