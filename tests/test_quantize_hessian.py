"""Hessian-aware PVQ (error feedback, Hessian-optimal gain) against data-free PVQ."""

import importlib

import pytest
import torch

import pvq_cuda
from conftest import requires_cuda
from pvq_cuda import PVQConfig, quantize_weight
from pvq_cuda.quantization.error_feedback import error_feedback, hessian_loss, inverse_cholesky_upper
from pvq_cuda.quantization.hessian import damp_hessian

# The module itself (the package re-exports its function under the same name).
ef_module = importlib.import_module("pvq_cuda.quantization.error_feedback")


def _layer(n=256, N=96, tokens=4096, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=gen) / n**0.5 + 0.1 * torch.eye(n)
    X = (torch.randn(tokens, n, generator=gen) * torch.linspace(0.2, 3, n)) @ mix  # correlated inputs
    H = damp_hessian(2 / tokens * X.T @ X, 0.01)
    return torch.randn(N, n, generator=gen), H


@pytest.mark.parametrize("preset", ["pvq-2.25", "pvq-3.25", "pvq-4.25", "pvq16-3.25"])
def test_error_feedback_beats_data_free(preset):
    W, H = _layer()
    cfg = PVQConfig.preset(preset)
    free = hessian_loss(W, quantize_weight(W, cfg).dequantize(), H)
    aware = hessian_loss(W, quantize_weight(W, cfg, H).dequantize(), H)
    ordered = hessian_loss(W, quantize_weight(W, cfg, H, act_order=True, metric_search=True).dequantize(), H)
    print(f"\n{preset}: H-loss data-free {free:.5f}, Hessian-aware {aware:.5f}, +act-order+metric {ordered:.5f}")
    assert aware < 0.7 * free
    assert ordered < 1.05 * aware


@pytest.mark.parametrize("preset,act_order", [("pvq-2.25", False), ("pvq-3.25", True), ("pvq-4.25", False),
                                              ("pvq8-3.25", True)])
def test_refinement_lowers_the_loss(preset, act_order):
    """Coordinate descent after error feedback keeps a new code only where it lowers the H-loss: the
    packed codes (decoded, so the index and gain updates are checked too) score below error feedback
    alone, and a second pass is no worse than the first beyond the row refit's reshuffle."""
    W, H = _layer(seed=5)
    cfg = PVQConfig.preset(preset)
    loss = {p: hessian_loss(W, quantize_weight(W, cfg, H, act_order=act_order, refine_passes=p).dequantize(), H)
            for p in (0, 1, 2)}
    print(f"\n{preset} act_order={act_order}: H-loss by refine passes {loss}")
    assert loss[1] < 0.995 * loss[0]
    assert loss[2] < 1.002 * loss[1]


@pytest.mark.parametrize("hessian", [False, True])
def test_row_scale_is_refit(hessian):
    """After the refit the error of each row is H-orthogonal to the row's reconstruction (up to the
    fp16 rounding of the scale), and the refit lowers the loss against the plain row norms."""
    W, H = _layer(N=48)
    Hm = H if hessian else torch.eye(W.shape[1])
    q = quantize_weight(W, PVQConfig.preset("pvq-3.25"), H if hessian else None)
    W_hat = q.dequantize()
    err = W - W_hat
    cos = ((err @ Hm) * W_hat).sum(1) / (((err @ Hm) * err).sum(1) * ((W_hat @ Hm) * W_hat).sum(1)).sqrt()
    assert cos.abs().max() < 0.01
    norms = pvq_cuda.hadamard_transform(W, q.signs).norm(dim=1)
    assert not torch.allclose(q.row_scale.float(), norms, rtol=1e-3)  # the refit moved the scales
    plain = W_hat * (norms.half().float() / q.row_scale.float()).unsqueeze(1)
    assert hessian_loss(W, W_hat, Hm) < hessian_loss(W, plain, Hm)


def test_unrotated_and_identity_hessian():
    W, _ = _layer(n=64, N=40)
    cfg = PVQConfig(rotate=False)
    # With H = I every group is independent: feedback changes nothing and s* is the LS gain.
    q_free, q_eye = quantize_weight(W, cfg), quantize_weight(W, cfg, torch.eye(64))
    assert torch.equal(q_free.codes, q_eye.codes)


def test_error_feedback_width_one_is_gptq():
    """Width-1 feedback with round-to-grid equals a textbook, column-by-column GPTQ."""
    W, H = _layer(n=32, N=8, tokens=512, seed=3)
    U = inverse_cholesky_upper(H).float()
    step = 0.25
    Q = error_feedback(W, U, 1, lambda j, w, u: torch.round(w / step) * step)
    Wr = W.clone()
    Qr = torch.empty_like(W)
    for i in range(32):
        Qr[:, i] = torch.round(Wr[:, i] / step) * step
        err = (Wr[:, i] - Qr[:, i]) / U[i, i]
        Wr[:, i:] -= err[:, None] * U[i, i:][None, :]
    torch.testing.assert_close(Q, Qr, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_width_one_fast_path_matches_the_any_width_loop(seed):
    """GPTQ's column loop (on Wᵀ, division for the 1×1 solve) against the generic block loop at
    width 1: the same quantized values and the same group columns, over several super-blocks and
    groups that straddle them (96 does not divide 128) and a short last group."""
    W, H = _layer(n=360, N=24, tokens=2048, seed=seed)
    U = inverse_cholesky_upper(H).float()

    def run(loop):
        seen = []

        def start_group(j, cols):
            seen.append((j, cols.clone()))

        # A smooth map, so that rounding-level differences cannot flip a grid point and diverge.
        Q = loop(W, U, 1, lambda j, w, u: 0.8 * w + 0.01 * j, 96, start_group)
        return Q, seen

    Q_fast, seen_fast = run(lambda W, U, _w, qb, g, sg: ef_module._error_feedback_columns(W, U, qb, g, sg))
    Q_ref, seen_ref = run(ef_module._error_feedback_blocks)
    assert Q_fast.shape == Q_ref.shape == W.shape and Q_fast.is_contiguous()
    torch.testing.assert_close(Q_fast, Q_ref, rtol=1e-5, atol=1e-5)
    assert [j for j, _ in seen_fast] == [j for j, _ in seen_ref] == [0, 96, 192, 288]
    for (_, a), (_, b) in zip(seen_fast, seen_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The public entry point takes the fast path at width 1.
    step = 0.2
    Q_grid = error_feedback(W, U, 1, lambda j, w, u: torch.round(w / step) * step)
    Q_grid_ref = ef_module._error_feedback_blocks(W, U, 1, lambda j, w, u: torch.round(w / step) * step, 0, None)
    assert hessian_loss(W, Q_grid, H) == pytest.approx(hessian_loss(W, Q_grid_ref, H), rel=1e-3)


@pytest.mark.parametrize("n", [1, 7, 128, 129, 300, 777])
def test_inverse_cholesky_upper_factors_the_inverse(n):
    """U is upper triangular with a positive diagonal and UᵀU = H⁻¹, at sizes that split unevenly."""
    gen = torch.Generator().manual_seed(n)
    f64 = torch.float64
    X = torch.randn(2 * n + 8, n, generator=gen, dtype=f64) * torch.rand(n, generator=gen, dtype=f64)
    H = X.T @ X + 0.05 * torch.eye(n, dtype=torch.float64)
    U = inverse_cholesky_upper(H)
    assert U.dtype == torch.float64 and U.shape == (n, n)
    assert torch.equal(U, U.triu()) and bool((U.diagonal() > 0).all())
    torch.testing.assert_close(U.T @ U @ H, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-8)
    # A singular (rank-deficient, for n > 1) Hessian is damped until it factors.
    Hs = X[:n // 2 + 1].T @ X[:n // 2 + 1]
    Us = inverse_cholesky_upper(Hs.float())
    assert bool(torch.isfinite(Us).all()) and torch.equal(Us, Us.triu())


def test_bad_hessians_are_refused():
    W = torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"hessian must be a \[16, 16\]"):
        quantize_weight(W, PVQConfig(rotate=False), torch.eye(8))
    with pytest.raises(ValueError, match="finite"):
        quantize_weight(W, PVQConfig(rotate=False), torch.full((16, 16), float("nan")))
    with pytest.raises(ValueError, match="need a hessian"):
        quantize_weight(W, PVQConfig(rotate=False), act_order=True)
    with pytest.raises(ValueError, match="need a hessian"):
        quantize_weight(W, PVQConfig(rotate=False), refine_passes=1)
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="refine_passes must be an int >= 0"):
            quantize_weight(W, PVQConfig(rotate=False), torch.eye(16), refine_passes=bad)
    with pytest.raises(ValueError, match="positive definite"):
        quantize_weight(W, PVQConfig(rotate=False), -torch.eye(16))


@requires_cuda
def test_hessian_aware_on_cuda():
    W, H = _layer()
    q = quantize_weight(W.cuda(), PVQConfig(), H.cuda())
    assert q.device.type == "cuda"
    assert hessian_loss(W, q.dequantize().cpu(), H) < 0.7 * hessian_loss(W, quantize_weight(W).dequantize(), H)


@pytest.mark.parametrize("D,K", [(4, 7), (8, 16), (16, 14), (16, 30)])
@pytest.mark.parametrize("path", ["native", "torch", "torch in chunks of 7 rows"])
def test_metric_search_matches_explicit_rescoring(D, K, path, monkeypatch):
    """The incremental move scores pick the same moves as rescoring every candidate vector, whether
    the native op scores them (the CPU) or torch ops do (other devices), all rows at once or in
    chunks (later passes rescan only the rows that moved)."""
    from pvq_cuda.quantization import quantize
    from pvq_cuda.quantization.quantize import METRIC_SEARCH_PASSES, _metric_search

    if path != "native":
        monkeypatch.setattr(quantize, "_native_moves", lambda y: False)
    if path.endswith("7 rows"):
        monkeypatch.setattr(quantize, "_MOVE_SCORES", 7 * D * D)
    gen = torch.Generator().manual_seed(D * 100 + K)
    w = torch.randn(120, D, generator=gen)
    A = torch.randn(D, D, generator=gen)
    M = A @ A.T / D + 0.05 * torch.eye(D)
    start = pvq_cuda.search(w, K)
    got = _metric_search(start, w, M)
    Md, Mw = M.double(), w.double() @ M.double()
    for r in range(w.shape[0]):
        y = start[r].double()
        score = lambda v: float((v @ Mw[r]) ** 2 / (v @ Md @ v))  # noqa: E731
        for _ in range(METRIC_SEARCH_PASSES):
            best, best_y = score(y), None
            for i in range(D):
                for j in range(D):
                    if i == j or y[i] == 0:
                        continue
                    c = y.clone()
                    c[i] -= torch.sign(y[i])
                    c[j] += torch.sign(y[j]) if y[j] != 0 else (-1.0 if w[r, j] < 0 else 1.0)
                    if score(c) > best * (1 + 1e-12):
                        best, best_y = score(c), c
            if best_y is None:
                break
            y = best_y
        assert torch.equal(got[r].double(), y), r
        assert int(got[r].abs().sum()) == K


def _move_inputs(D, rows, gen, integer):
    """Inputs of one metric-search pass, with integer-valued w and M (many exactly tied moves) or
    random ones; a quarter of the rows hold a single pulse."""
    K = min(2 * D, pvq_cuda.max_pulses(D))
    w = (torch.randint(-3, 4, (rows, D), generator=gen) if integer else torch.randn(rows, D, generator=gen)).double()
    if integer:  # a diagonal metric of small integers: moves between equal coordinates tie exactly
        M = torch.diag(torch.randint(1, 3, (D,), generator=gen).double())
    else:
        A = torch.randn(D, D, generator=gen).double()
        M = A @ A.T + 0.05 * torch.eye(D, dtype=torch.float64)
    y = pvq_cuda.search(torch.randn(rows, D, generator=gen), K).double()
    y[: rows // 4] = pvq_cuda.search(torch.randn(rows // 4, D, generator=gen), 1).double()  # one pulse
    Mw, My = w @ M, y @ M
    sgn = torch.where(w < 0, -1.0, 1.0).double()
    return y, Mw, My, (y * Mw).sum(-1), (y * My).sum(-1), sgn, M


@pytest.mark.parametrize("D", [2, 4, 8, 16, 32])
@pytest.mark.parametrize("integer", [False, True])
def test_metric_moves_op_equals_torch_scoring(D, integer):
    """The native op and the torch scoring (the path off the CPU) make the same move in every row,
    bit for bit, ties included (the first move in (i, j) order wins on both)."""
    from pvq_cuda.quantization.quantize import _scored_moves

    gen = torch.Generator().manual_seed(D + 100 * integer)
    args = _move_inputs(D, 301, gen, integer)
    better, moved = pvq_cuda.ops.metric_moves(*args)
    want_better, want_moved = _scored_moves(*args)
    assert better.dtype == torch.bool and moved.dtype == torch.float64 and moved.shape == args[0].shape
    assert torch.equal(better, want_better)
    assert 0 < int(better.sum()) < len(better)  # both outcomes are exercised
    assert torch.equal(moved[better], want_moved[better])
    assert torch.equal(moved[~better], args[0][~better])
    assert torch.equal(moved.abs().sum(-1), args[0].abs().sum(-1))  # a move keeps K


def test_metric_moves_opcheck_and_bad_input():
    gen = torch.Generator().manual_seed(3)
    args = _move_inputs(8, 20, gen, False)
    torch.library.opcheck(torch.ops.pvq_cuda._metric_moves.default, args)
    y, Mw, My, num, den, sgn, M = args
    with pytest.raises(TypeError, match="w_metric must have dtype float64"):
        pvq_cuda.ops.metric_moves(y, Mw.float(), My, num, den, sgn, M)
    with pytest.raises(TypeError, match="w_metric must be float64"):  # the kernel's own check
        torch.ops.pvq_cuda._metric_moves.default(y, Mw.float(), My, num, den, sgn, M)
    with pytest.raises(ValueError, match=r"fit_den must have shape \[20\]"):
        pvq_cuda.ops.metric_moves(y, Mw, My, num, den[:5], sgn, M)
    with pytest.raises(ValueError, match=r"metric must have shape \[8, 8\]"):
        pvq_cuda.ops.metric_moves(y, Mw, My, num, den, sgn, M[:4])
    with pytest.raises(ValueError, match="y_metric must have the shape of pulses"):
        pvq_cuda.ops.metric_moves(y, Mw, My[:, :4], num, den, sgn, M)
    with pytest.raises(ValueError, match="D must be one of"):
        pvq_cuda.ops.metric_moves(y[:, :6], Mw[:, :6], My[:, :6], num, den, sgn[:, :6], M[:6, :6])
    with pytest.raises(ValueError, match=r"pulses must have shape \[rows, D\]"):
        pvq_cuda.ops.metric_moves(y[0], Mw, My, num, den, sgn, M)


@requires_cuda
def test_metric_moves_op_rejects_cuda_tensors():
    args = _move_inputs(8, 20, torch.Generator().manual_seed(4), False)
    with pytest.raises(ValueError, match="pulses must be on the CPU"):
        pvq_cuda.ops.metric_moves(*(t.cuda() for t in args))


@requires_cuda
def test_metric_search_on_cuda_matches_the_cpu():
    """On a GPU the moves are scored by torch ops (the CPU has the native op). The rounding of the
    inputs (w·M, y·M from cuBLAS) may differ, so near-ties may flip: nearly all codes and the loss
    must agree."""
    W, H = _layer()
    cfg = PVQConfig.preset("pvq-2.25")
    cpu = quantize_weight(W, cfg, H, metric_search=True, refine_passes=1)
    gpu = quantize_weight(W.cuda(), cfg, H.cuda(), metric_search=True, refine_passes=1)
    assert (gpu.codes.cpu() == cpu.codes).float().mean() > 0.99
    loss_cpu, loss_gpu = (hessian_loss(W, q.dequantize().cpu(), H) for q in (cpu, gpu))
    assert abs(loss_gpu / loss_cpu - 1) < 0.01
