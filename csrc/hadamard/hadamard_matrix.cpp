#include "hadamard/hadamard_matrix.h"

#include <array>
#include <vector>

namespace pvq::hadamard {

namespace {

// Compile-time proof of the construction, for every m: symmetric and H·Hᵀ = m·I (rows orthogonal).
constexpr bool is_symmetric_hadamard(const SignMatrix& h) {
  for (int r = 0; r < h.m; ++r) {
    for (int c = 0; c < h.m; ++c) {
      if (h.negative(r, c) != h.negative(c, r)) return false;
      int dot = 0;
      for (int k = 0; k < h.m; ++k) dot += h.negative(r, k) == h.negative(c, k) ? 1 : -1;
      if (dot != (r == c ? h.m : 0)) return false;
    }
  }
  return true;
}

static_assert(is_symmetric_hadamard(paley2(1)) && is_symmetric_hadamard(paley2(12)) &&
              is_symmetric_hadamard(paley2(20)) && is_symmetric_hadamard(paley2(28)) &&
              is_symmetric_hadamard(paley2(36)) && is_symmetric_hadamard(paley2(52)) &&
              is_symmetric_hadamard(paley2(60)));
static_assert(split_size(576).m == 36 && split_size(576).log_p == 4);
static_assert(split_size(1536).m == 12 && split_size(1536).log_p == 7);
static_assert(split_size(40).m == 20 && split_size(40).log_p == 1);
static_assert(split_size(32768).m == 1 && split_size(32768).log_p == 15);
static_assert(split_size(6).m == 0 && split_size(44).m == 0 && split_size(65536).m == 0 && split_size(0).m == 0);

std::vector<float> build_dense(int m) {
  const SignMatrix h = paley2(m);
  std::vector<float> t(size_t(m) * m);
  for (int r = 0; r < m; ++r)
    for (int c = 0; c < m; ++c) t[size_t(r) * m + c] = h.negative(r, c) ? -1.0f : 1.0f;
  return t;
}

}  // namespace

const float* dense_table(int m) {
  static const std::array<std::vector<float>, kNumBases> tables = [] {
    std::array<std::vector<float>, kNumBases> t;
    for (int i = 0; i < kNumBases; ++i) t[i] = build_dense(kBases[i]);
    return t;
  }();
  for (int i = 0; i < kNumBases; ++i)
    if (kBases[i] == m) return tables[i].data();
  return nullptr;
}

}  // namespace pvq::hadamard
