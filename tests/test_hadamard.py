"""hadamard_transform against an independent numpy construction: Paley II, Sylvester, Kronecker.

The reference below builds every matrix from the definitions (GF(q) arithmetic with Euler's
criterion for the quadratic character, C ⊗ A + I ⊗ B for Paley II, the popcount formula for
Sylvester), sharing no code with csrc/hadamard/. The element order of GF(q) is the documented
convention: x_k = (k mod p) + (k div p)·ω with ω² = ν, ν the least quadratic non-residue mod p.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pvq_cuda
from conftest import requires_cuda

ops = torch.ops.pvq_cuda
BASES = (1, 12, 20, 28, 36, 52, 60)
# Every supported n: m * 2^k <= 32768.
SUPPORTED = sorted(m << k for m in BASES for k in range(16) if m << k <= 32768)


# ---------------------------------------------------------------------------------------------
# Reference construction (numpy, float64)


def _smallest_prime_factor(q):
    return next(d for d in range(2, q + 1) if q % d == 0)


def _paley2(m):
    """Symmetric Hadamard matrix of order m = 2(q+1), q ≡ 1 (mod 4) a prime or a prime square."""
    if m == 1:
        return np.ones((1, 1))
    q = m // 2 - 1
    p = _smallest_prime_factor(q)
    assert q in (p, p * p) and q % 4 == 1
    nu = next(c for c in range(2, p) if pow(c, (p - 1) // 2, p) == p - 1)  # least non-residue
    elems = [(k % p, k // p) for k in range(q)]

    def mul(x, y):
        return ((x[0] * y[0] + nu * x[1] * y[1]) % p, (x[0] * y[1] + x[1] * y[0]) % p)

    def power(x, e):
        r = (1, 0)
        for _ in range(e):
            r = mul(r, x)
        return r

    def chi(x):  # Euler's criterion in GF(q): x^((q-1)/2) is 1 for squares, -1 for non-squares
        if x == (0, 0):
            return 0
        return 1 if power(x, (q - 1) // 2) == (1, 0) else -1

    Q = np.array([[chi(((xi[0] - xj[0]) % p, (xi[1] - xj[1]) % p)) for xj in elems] for xi in elems])
    C = np.zeros((q + 1, q + 1))
    C[0, 1:] = C[1:, 0] = 1
    C[1:, 1:] = Q
    A = np.array([[1, 1], [1, -1]])
    B = np.array([[1, -1], [-1, -1]])
    return np.kron(C, A) + np.kron(np.eye(q + 1), B)  # C has a zero diagonal: B sits exactly there


def _sylvester(P):
    b = np.arange(P)
    bits = np.bitwise_and.outer(b, b)
    popcount = np.zeros_like(bits)
    while bits.any():
        popcount += bits & 1
        bits >>= 1
    return (-1.0) ** popcount


def _split(n):
    """(m, P) with n = m * P: the odd part of n picks m, the rest is the power of two P."""
    odd = n >> ((n & -n).bit_length() - 1)
    m = {1: 1, 3: 12, 5: 20, 7: 28, 9: 36, 13: 52, 15: 60}[odd]
    assert n % m == 0
    return m, n // m


def _dense(n):
    m, P = _split(n)
    return np.kron(_paley2(m), _sylvester(P))


def _reference(x, signs=None):
    """float64 transform of a [..., n] tensor, without a dense matrix: Sylvester butterflies over b
    (index i = a*P + b), then H_m over a."""
    n = x.shape[-1]
    m, P = _split(n)
    v = x.detach().cpu().double().numpy().reshape(-1, n)
    if signs is not None:
        v = v * signs.detach().cpu().double().numpy()
    v = v.reshape(-1, m, P)
    h = 1
    while h < P:
        v = v.reshape(v.shape[0], m, P // (2 * h), 2, h)
        v = np.stack([v[:, :, :, 0] + v[:, :, :, 1], v[:, :, :, 0] - v[:, :, :, 1]], axis=3)
        h *= 2
    v = np.einsum("ak,rkb->rab", _paley2(m), v.reshape(-1, m, P))
    return torch.from_numpy(v.reshape(x.shape) / math.sqrt(n))


def _signs(n, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    return s.to(dtype).to(device)


def _randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def _assert_fp32_close(got, want):
    torch.testing.assert_close(got.double().cpu(), want.double(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The matrices


def test_supported_sizes():
    assert len(SUPPORTED) == 80 and SUPPORTED[:6] == [1, 2, 4, 8, 12, 16] and SUPPORTED[-1] == 32768
    assert {n for n in range(1, 32769) if pvq_cuda.hadamard_split(n) is not None} == set(SUPPORTED)
    assert pvq_cuda.hadamard_split(576) == (36, 4) and pvq_cuda.hadamard_split(1536) == (12, 7)
    assert pvq_cuda.hadamard_split(40) == (20, 1) and pvq_cuda.hadamard_split(14336) == (28, 9)
    for n in (0, 3, 6, 10, 44, 96 * 7, 65536):
        assert pvq_cuda.hadamard_split(n) is None


@pytest.mark.parametrize("m", BASES)
def test_reference_base_matrix_is_symmetric_hadamard(m):
    H = _paley2(m)
    assert np.array_equal(H, H.T) and np.array_equal(np.abs(H), np.ones((m, m)))
    assert np.array_equal(H @ H.T, m * np.eye(m))


@pytest.mark.parametrize("m", BASES)
def test_op_base_matrix_matches_reference(m, device):
    # The transform of the identity is H_m / sqrt(m), row by row.
    H = pvq_cuda.hadamard_transform(torch.eye(m, device=device)).double().cpu() * math.sqrt(m)
    assert torch.equal(H.round(), torch.from_numpy(_paley2(m)))
    assert (H - H.round()).abs().max() < 1e-5
    assert torch.equal(H.round(), H.round().T)


def test_dense_reference_is_the_kronecker_definition():
    # Spot-check the index convention of the dense reference: H_n[a*P + b][a'*P + b'].
    H, Hm = _dense(48), _paley2(12)  # m = 12, P = 4
    for i, j in [(0, 0), (5, 7), (13, 46), (47, 47), (30, 9)]:
        (a, b), (a2, b2) = divmod(i, 4), divmod(j, 4)
        assert H[i, j] == Hm[a, a2] * (-1) ** bin(b & b2).count("1")


@pytest.mark.parametrize("n", [4, 24, 160, 576])
def test_fast_reference_matches_dense(n):
    x = _randn(3, n)
    want = x.double() @ torch.from_numpy(_dense(n)).T / math.sqrt(n)
    torch.testing.assert_close(_reference(x), want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Agreement with the reference

DENSE_NS = sorted({m << k for m in BASES for k in (0, 1, 3, 5)} | {576, 1536, 2048})


@pytest.mark.parametrize("n", DENSE_NS)
def test_matches_dense_reference(n, device):
    x = _randn(5, n, seed=n)
    s = _signs(n, seed=n)
    H = torch.from_numpy(_dense(n)) / math.sqrt(n)
    _assert_fp32_close(pvq_cuda.hadamard_transform(x.to(device)), x.double() @ H.T)
    _assert_fp32_close(pvq_cuda.hadamard_transform(x.to(device), s.to(device)), (x.double() * s.double()) @ H.T)


@pytest.mark.parametrize("n", [4096, 7168, 12288, 16384, 20480, 26624, 28672, 30720, 32768])
def test_large_n_matches_reference(n, device):
    x = _randn(3, n, seed=n)
    s = _signs(n, seed=n + 1)
    _assert_fp32_close(pvq_cuda.hadamard_transform(x.to(device), s.to(device)), _reference(x, s))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [60, 192, 576, 1536, 2048])
def test_low_precision_error_at_most_twice_torchs(n, dtype, device):
    # As in fast-hadamard-transform's tests: no worse than twice the error of PyTorch's own fp32
    # matmul rounded to the dtype, measured against float64, plus half an ulp at 1.0.
    x = (_randn(64, n, seed=n) * 3).to(dtype)
    H = torch.from_numpy(_dense(n)) / math.sqrt(n)
    exact = x.double() @ H.T
    torch_out = (x.float() @ H.T.float()).to(dtype)
    got = pvq_cuda.hadamard_transform(x.to(device)).cpu()
    assert got.dtype == dtype and got.shape == x.shape
    err = (got.double() - exact).abs().max().item()
    torch_err = (torch_out.double() - exact).abs().max().item()
    assert err <= 2 * torch_err + torch.finfo(dtype).eps / 2, (err, torch_err)


# ---------------------------------------------------------------------------------------------
# Algebraic properties


@pytest.mark.parametrize("n", [1, 2, 8, 12, 40, 576, 1536, 4096])
def test_orthogonal(n, device):
    x = _randn(7, n, seed=n).to(device)
    y = pvq_cuda.hadamard_transform(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-6)
    if n <= 1536:
        Q = pvq_cuda.hadamard_transform(torch.eye(n, device=device), _signs(n, device=device)).double()
        torch.testing.assert_close(Q @ Q.T, torch.eye(n, dtype=torch.float64, device=device), rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [4, 12, 96, 576, 1536, 8192])
def test_inverse(n, device):
    # T(x) = R x with R = H D / sqrt(n), D = diag(signs); H is symmetric with H² = n·I, so
    # R⁻¹ = Rᵀ = D H / sqrt(n), i.e. x = signs * T(T(x, signs)), and without signs T is an involution.
    x = _randn(6, n, seed=n).to(device)
    s = _signs(n, device=device, seed=n)
    torch.testing.assert_close(pvq_cuda.hadamard_transform(pvq_cuda.hadamard_transform(x)), x, rtol=1e-5, atol=1e-5)
    y = pvq_cuda.hadamard_transform(x, s)
    torch.testing.assert_close(s * pvq_cuda.hadamard_transform(y), x, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pvq_cuda.hadamard_transform(y, s), x, atol=1e-2)  # the signs matter
    assert torch.equal(y, pvq_cuda.hadamard_transform(x * s))  # signs act before H


@pytest.mark.parametrize("n", [8, 20, 576])
def test_int8_and_float_signs_agree(n, device):
    x = _randn(4, n, seed=n).to(device)
    s = _signs(n, device=device, seed=n)
    y = pvq_cuda.hadamard_transform(x, s)
    assert torch.equal(y, pvq_cuda.hadamard_transform(x, s.to(torch.int8)))
    assert torch.equal(pvq_cuda.hadamard_transform(x, torch.ones(n, device=device)), pvq_cuda.hadamard_transform(x))


# ---------------------------------------------------------------------------------------------
# Layouts and shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_layouts_and_batches(dtype, device):
    n = 576
    base = _randn(2, 3, n, dtype=dtype, device=device)
    want = pvq_cuda.hadamard_transform(base.contiguous())
    assert want.shape == (2, 3, n) and want.dtype == dtype and want.is_contiguous()
    eps = max(torch.finfo(dtype).eps, 1e-5)  # fp32: the accumulated 1e-5 of the other tests; else the rounding
    torch.testing.assert_close(want.double().cpu(), _reference(base), rtol=eps, atol=4 * eps)
    flat = pvq_cuda.hadamard_transform(base.reshape(6, n))
    assert torch.equal(flat.reshape(2, 3, n), want)
    # Rows scattered through a bigger buffer, the last dim strided, and a view at an odd offset.
    big = torch.zeros(2, 5, 2 * n, dtype=dtype, device=device)
    big[:, 1:4, ::2] = base
    view = big[:, 1:4, ::2]
    assert not view.is_contiguous()
    assert torch.equal(pvq_cuda.hadamard_transform(view), want)
    flat_buf = torch.cat([torch.zeros(1, dtype=dtype, device=device), base.reshape(-1)])
    shifted = flat_buf[1:].view(2, 3, n)  # contiguous, but 2 or 4 bytes past an aligned start
    assert torch.equal(pvq_cuda.hadamard_transform(shifted), want)
    transposed = base.reshape(6, n).T.contiguous().T
    assert torch.equal(pvq_cuda.hadamard_transform(transposed), flat)


def test_empty_and_single_rows(device):
    for shape in [(0, 12), (2, 0, 64), (0, 32768)]:
        y = pvq_cuda.hadamard_transform(torch.empty(shape, device=device))
        assert y.shape == shape
    v = _randn(24, device=device)
    assert torch.equal(pvq_cuda.hadamard_transform(v), pvq_cuda.hadamard_transform(v[None])[0])
    one = pvq_cuda.hadamard_transform(torch.tensor([[-2.5]], device=device), torch.tensor([-1], dtype=torch.int8, device=device))
    assert one.item() == 2.5


@settings(max_examples=40, deadline=None)
@given(
    n=st.sampled_from([n for n in SUPPORTED if n <= 2048]),
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=2),
    use_signs=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(n, lead, use_signs, seed):
    x = _randn(*lead, n, seed=seed) * (1 + seed % 7)
    s = _signs(n, seed=seed) if use_signs else None
    y = pvq_cuda.hadamard_transform(x, s)
    assert y.shape == x.shape
    torch.testing.assert_close(y.double(), _reference(x, s), rtol=1e-5, atol=1e-5 * (1 + seed % 7))


# ---------------------------------------------------------------------------------------------
# As a torch op


def test_opcheck(device):
    samples = [
        (_randn(4, 12, device=device),),
        (_randn(3, 576, device=device), _signs(576, device=device)),
        (_randn(2, 2, 64, dtype=torch.float16, device=device), _signs(64, torch.int8, device=device)),
        (_randn(5, 40, dtype=torch.bfloat16, device=device), None),
        (_randn(3, 24, device=device).requires_grad_(), _signs(24, device=device)),
    ]
    for args in samples:
        torch.library.opcheck(ops.hadamard_transform.default, args)


def test_compile_fullgraph(device):
    def rotate_back_and_forth(x, s):
        y = pvq_cuda.hadamard_transform(x, s)
        return s * pvq_cuda.hadamard_transform(y) + 1, y

    x, s = _randn(16, 1536, device=device), _signs(1536, device=device)
    torch._dynamo.reset()
    got = torch.compile(rotate_back_and_forth, fullgraph=True)(x, s)
    want = rotate_back_and_forth(x, s)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.fixture
def two_cpu_threads():
    """At least two intra-op threads, so that a CPU op's parallel_for really splits its rows (its
    worker threads do not inherit the caller's autograd dispatch state)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("n,rows", [(12, 3), (576, 3), (576, 96), (4096, 24)])
def test_gradient(n, rows, device, two_cpu_threads):
    # d(w·T(x, s))/dx = Rᵀ w with R = H·diag(s)/sqrt(n), from the dense reference. 96 x 576 and
    # 24 x 4096 span several parallel chunks (16384 elements each) on the CPU.
    x = _randn(rows, n, device=device).requires_grad_()
    w = _randn(rows, n, device=device, seed=1)
    s = _signs(n, device=device)
    (pvq_cuda.hadamard_transform(x, s) * w).sum().backward()
    R = torch.from_numpy(_dense(n)) * s.double().cpu() / math.sqrt(n)
    _assert_fp32_close(x.grad, w.double().cpu() @ R)
    x16 = x.detach().half().requires_grad_()
    pvq_cuda.hadamard_transform(x16, s.to(torch.int8)).sum().backward()
    assert x16.grad.dtype == torch.float16


def test_meta_tensors_give_shapes():
    x = torch.empty(4, 3, 1536, dtype=torch.bfloat16, device="meta")
    y = pvq_cuda.hadamard_transform(x, torch.empty(1536, device="meta"))
    assert y.shape == x.shape and y.dtype == torch.bfloat16 and y.device.type == "meta"


# ---------------------------------------------------------------------------------------------
# Bad input: the wrapper and the raw op raise the same kind of exception, naming the argument.


def _both(call_wrapper, call_op, exc, match):
    with pytest.raises(exc, match=match):
        call_wrapper()
    with pytest.raises(exc, match=match):
        call_op()


def _check_both(exc, match, *args):
    _both(lambda: pvq_cuda.hadamard_transform(*args), lambda: ops.hadamard_transform(*args), exc, match)


def test_bad_x_dtype(device):
    # float64 runs on the CPU only (computed in double: an exact reference, and gradcheck's dtype).
    bad = (torch.int32, torch.int8, torch.bool) + ((torch.float64,) if device == "cuda" else ())
    for dtype in bad:
        _check_both(TypeError, "x must .*float32", torch.zeros(2, 8, dtype=dtype, device=device))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        pvq_cuda.hadamard_transform([[1.0, 2.0]])


@pytest.mark.parametrize("n", [3, 5, 6, 10, 44, 72 * 7, 65536])
def test_unsupported_n(n, device):
    _check_both(ValueError, f"m in \\{{1, 12, 20, 28, 36, 52, 60\\}}.*got n={n}$", torch.zeros(2, n, device=device))


def test_zero_dim_and_zero_length(device):
    _check_both(ValueError, "x must have shape \\[..., n\\], got a 0-d tensor", torch.tensor(1.0, device=device))
    _check_both(ValueError, "got n=0", torch.zeros(3, 0, device=device))


def test_bad_signs(device):
    x = torch.zeros(2, 12, device=device)
    _check_both(ValueError, "signs must have shape \\[n\\] = \\[12\\].*\\[11\\]", x, torch.ones(11, device=device))
    _check_both(ValueError, "signs must have shape \\[n\\] = \\[12\\].*\\[1, 12\\]", x, torch.ones(1, 12, device=device))
    _check_both(ValueError, "signs must have shape", x, torch.tensor(1.0, device=device))
    for dtype in (torch.float64, torch.float16, torch.int32, torch.bool):
        _check_both(TypeError, "signs must .*float32.*int8", x, torch.ones(12, dtype=dtype, device=device))
    _check_both(ValueError, "signs must be on the same device as x", x, torch.ones(12, device="meta"))
    with pytest.raises(TypeError, match="signs must be a torch.Tensor"):
        pvq_cuda.hadamard_transform(x, [1.0] * 12)


def test_sparse_inputs():
    x = torch.zeros(2, 12)
    _check_both(ValueError, "x must be a dense \\(strided\\) tensor", x.to_sparse())
    _check_both(ValueError, "signs must be a dense \\(strided\\) tensor", x, torch.ones(12).to_sparse())


@requires_cuda
def test_signs_on_another_device():
    x = torch.zeros(2, 12)
    _check_both(ValueError, "signs must be on the same device as x \\(cpu\\), got cuda", x, torch.ones(12, device="cuda"))
    _check_both(ValueError, "signs must be on the same device as x \\(cuda:0\\), got cpu", x.cuda(), torch.ones(12))


# ---------------------------------------------------------------------------------------------
# CUDA against CPU (GPU only). Both kernels add in the same order in fp32 (butterfly stages by
# increasing bit, then H_m by increasing a'), scale by the same float and round once, so they are
# expected to agree bit for bit.

PARITY_NS = [n for n in SUPPORTED if n <= 2048 or n in (3072, 4096, 7168, 8192, 12288, 16384, 24576, 30720, 32768)]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", PARITY_NS)
def test_cuda_matches_cpu(n, dtype):
    # Rows: a few full tiles of ~8192 elements plus a partial one (odd counts hit the partial
    # windows of small n), and one sign pattern per n.
    rows = max(3, 3 * 8192 // n) + 5
    x = (_randn(rows, n, seed=n) * 4).to(dtype)
    s = _signs(n, seed=n)
    for signs in (None, s, s.to(torch.int8)):
        want = pvq_cuda.hadamard_transform(x, signs)
        got = pvq_cuda.hadamard_transform(x.cuda(), None if signs is None else signs.cuda())
        assert got.dtype == dtype and got.is_cuda
        assert torch.equal(got.cpu(), want), (got.cpu() - want).abs().max()


@requires_cuda
def test_cuda_many_rows_and_odd_layouts():
    x = _randn(3, 50_001, 12)  # 150003 rows of n = 12: many tiles and a partial last one
    assert torch.equal(pvq_cuda.hadamard_transform(x.cuda()).cpu(), pvq_cuda.hadamard_transform(x))
    y = _randn(7, 2 * 4096, dtype=torch.float16)[:, 1::2]  # strided last dim
    assert torch.equal(pvq_cuda.hadamard_transform(y.cuda()).cpu(), pvq_cuda.hadamard_transform(y))


@requires_cuda
def test_cuda_graph_capture():
    x = _randn(64, 1536, device="cuda")
    s = _signs(1536, device="cuda")
    y = pvq_cuda.hadamard_transform(x, s)  # warm up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pvq_cuda.hadamard_transform(x, s)
    x.copy_(_randn(64, 1536, device="cuda", seed=1))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, pvq_cuda.hadamard_transform(x, s)) and not torch.equal(out, y)


@pytest.mark.parametrize("n", [8, 576, 1536, 4096])
def test_float64_on_cpu_is_exact(n):
    """float64 rows are transformed in double: the reference to 1e-12, where fp32 gets 1e-6."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, generator=g, dtype=torch.float64)
    s = _signs(n, seed=n)
    y = pvq_cuda.hadamard_transform(x, s)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, _reference(x, s).to(torch.float64), rtol=1e-12, atol=1e-12)
