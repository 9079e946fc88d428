// The Hadamard matrices of pvq_cuda.hadamard_transform, built in code (paper.md §6). Torch-free and
// constexpr, so the CPU kernel, the argument checks and the CUDA kernel (which bakes the signs of
// H_m into its instructions at compile time) all read the one construction.
//
//   n = m · 2^p,  H_n = H_m ⊗ S_{2^p},  index i = a · 2^p + b,  H_n[i][j] = H_m[a][a'] · S[b][b'],
//   S[b][b'] = (−1)^popcount(b & b')  (Sylvester),  H_m from Paley construction II.
//
// Paley II (m = 2(q+1), q ≡ 1 mod 4 a prime or the square of a prime): the Jacobsthal matrix
// Q[i][j] = χ(x_i − x_j) of GF(q), bordered into the conference matrix C = [[0, 1ᵀ], [1, Q]], with
// each entry of C replaced by a 2×2 block: 0 → [[1,−1],[−1,−1]], ±1 → ±[[1,1],[1,−1]]. Both C and
// the blocks are symmetric, so H_m is symmetric, and since the two blocks anticommute, H_m² = m·I.
//
// The element order is part of the format (rotated weights are stored): x_k, k = 0..q−1, is
// (k mod p) + (k div p)·ω in GF(p)[ω]/(ω² − ν), ν the least quadratic non-residue mod p
// (so for prime q, x_k = k). Row/column 0 of C is the border; row i ≥ 1 is x_{i−1}.
#pragma once
#include <cmath>
#include <cstdint>

namespace pvq::hadamard {

inline constexpr int64_t kMaxN = 32768;
inline constexpr int kMaxM = 60;
// Every m, and the q it comes from (m = 1: the power-of-two case, no Paley factor).
inline constexpr int kNumBases = 7;
inline constexpr int kBases[kNumBases] = {1, 12, 20, 28, 36, 52, 60};

struct Split {
  int m = 0;       // 0: n is not supported
  int log_p = -1;  // n = m << log_p
};

// The unique split of n: the odd part of n picks m, and what is left must be a power of two.
constexpr Split split_size(int64_t n) {
  if (n < 1 || n > kMaxN) return {};
  int64_t odd = n;
  int twos = 0;
  while (odd % 2 == 0) {
    odd /= 2;
    ++twos;
  }
  for (int m : kBases) {
    int m_odd = m, m_twos = 0;
    while (m_odd % 2 == 0) {
      m_odd /= 2;
      ++m_twos;
    }
    if (m_odd == odd) return twos >= m_twos ? Split{m, twos - m_twos} : Split{};
  }
  return {};
}

// One bit per entry: bit c of neg[r] is set when H_m[r][c] = −1.
struct SignMatrix {
  int m = 0;
  uint64_t neg[kMaxM] = {};
  constexpr bool negative(int r, int c) const { return (neg[r] >> c) & 1u; }
};

namespace detail {

constexpr int smallest_factor(int q) {
  for (int d = 2; d * d <= q; ++d)
    if (q % d == 0) return d;
  return q;
}

constexpr int least_nonresidue(int p) {
  for (int c = 2; c < p; ++c) {
    bool square = false;
    for (int t = 1; t < p; ++t) square = square || (t * t) % p == c;
    if (!square) return c;
  }
  return 0;  // p = 2 has none; never asked for (q is odd)
}

// GF(q) for q = p or p²: element k is a + b·ω with a = k mod p, b = k div p, ω² = nu.
struct Field {
  int p;
  int nu;
  constexpr int make(int a, int b) const { return a + b * p; }
  constexpr int sub(int x, int y) const {
    return make((x % p - y % p + p) % p, (x / p - y / p + p) % p);
  }
  constexpr int mul(int x, int y) const {
    const int a1 = x % p, b1 = x / p, a2 = y % p, b2 = y / p;
    return make((a1 * a2 + nu * b1 * b2) % p, (a1 * b2 + a2 * b1) % p);
  }
};

}  // namespace detail

// H_m for m in kBases (m = 1 gives [1]); any other m gives an empty matrix (m = 0).
constexpr SignMatrix paley2(int m) {
  SignMatrix h;
  bool known = false;
  for (int b : kBases) known = known || b == m;
  if (!known) return h;
  h.m = m;
  if (m == 1) return h;
  const int q = m / 2 - 1;
  const int p = detail::smallest_factor(q);  // q is p or p·p
  const detail::Field f{p, detail::least_nonresidue(p)};
  bool square[kMaxM] = {};  // χ(x) = +1 exactly for the nonzero squares
  for (int k = 1; k < q; ++k) square[f.mul(k, k)] = true;
  for (int i = 0; i <= q; ++i) {
    for (int j = 0; j <= q; ++j) {
      const int c = i == j ? 0 : (i == 0 || j == 0) ? 1 : (square[f.sub(i - 1, j - 1)] ? 1 : -1);
      for (int r = 0; r < 2; ++r) {
        for (int s = 0; s < 2; ++s) {
          const int v = c == 0 ? (r == 0 && s == 0 ? 1 : -1) : (r == 1 && s == 1 ? -c : c);
          if (v < 0) h.neg[2 * i + r] |= uint64_t(1) << (2 * j + s);
        }
      }
    }
  }
  return h;
}

// 1/sqrt(n) in float, rounded once from double: the CPU and CUDA kernels use this same value.
inline float transform_scale(int64_t n) { return float(1.0 / std::sqrt(double(n))); }

// H_m as row-major ±1.0f (m·m floats), built once per m on first use; nullptr for unknown m.
const float* dense_table(int m);

}  // namespace pvq::hadamard
