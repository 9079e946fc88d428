#include "hadamard/row_transform.h"

#include "hadamard/hadamard_matrix.h"

namespace pvq::hadamard {

namespace {

// Stages h = 1, 2, 4 on eight neighbours in registers: one pass over memory instead of three,
// and the later stages (h >= 8) have contiguous inner loops the compiler vectorizes.
template <typename T>
inline void butterfly8(T* c) {
  T r[8];
  for (int k = 0; k < 8; ++k) r[k] = c[k];
  for (int h = 1; h < 8; h <<= 1) {
    for (int k = 0; k < 8; ++k) {
      if (k & h) continue;
      const T u = r[k], w = r[k + h];
      r[k] = u + w;
      r[k + h] = u - w;
    }
  }
  for (int k = 0; k < 8; ++k) c[k] = r[k];
}

template <typename T>
void sylvester(T* __restrict__ c, int log_p) {
  const int P = 1 << log_p;
  int h = 1;
  if (P >= 8) {
    for (int i = 0; i < P; i += 8) butterfly8(c + i);
    h = 8;
  }
  for (; h < P; h <<= 1) {
    for (int i = 0; i < P; i += 2 * h) {
      T* __restrict__ lo = c + i;
      T* __restrict__ hi = c + i + h;
      for (int j = 0; j < h; ++j) {
        const T u = lo[j], w = hi[j];
        lo[j] = u + w;
        hi[j] = u - w;
      }
    }
  }
}

}  // namespace

template <typename T>
void sylvester_chunks(T* v, int m, int log_p) {
  for (int a = 0; a < m; ++a) sylvester(v + (a << log_p), log_p);
}

namespace {

// Columns c0 .. c0+width-1 of all m rows: at most 60 · 64 · 4 = 15 KB of inputs, so the m·m
// sweeps over them stay in L1 (a whole row of n = 14336 floats would not). kWidth > 0 fixes the
// width at compile time, so the common full block unrolls and vectorizes completely.
template <int kWidth, typename T>
void small_hadamard_block(const float* table, int m, int64_t cols, int64_t c0, int width, const T* __restrict__ v,
                          T* __restrict__ out) {
  constexpr int kMax = kWidth > 0 ? kWidth : 64;
  if constexpr (kWidth > 0) width = kWidth;
  for (int a = 0; a < m; ++a) {
    const float* h = table + a * m;
    T acc[kMax];
    for (int c = 0; c < width; ++c) acc[c] = h[0] * v[c0 + c];
    for (int a2 = 1; a2 < m; ++a2) {
      const float s = h[a2];  // ±1: the products are exact, so contraction into FMA changes nothing
      const T* __restrict__ src = v + a2 * cols + c0;
      for (int c = 0; c < width; ++c) acc[c] += s * src[c];
    }
    for (int c = 0; c < width; ++c) out[a * cols + c0 + c] = acc[c];
  }
}

}  // namespace

template <typename T>
void small_hadamard(const float* table, int m, int64_t cols, const T* __restrict__ v, T* __restrict__ out) {
  constexpr int kBlock = 64;
  int64_t c0 = 0;
  for (; c0 + kBlock <= cols; c0 += kBlock) small_hadamard_block<kBlock>(table, m, cols, c0, kBlock, v, out);
  if (c0 < cols) small_hadamard_block<0>(table, m, cols, c0, int(cols - c0), v, out);
}

void rotate_row(float* v, const float* signs, int m, int log_p, float scale, float* tmp) {
  const int64_t P = int64_t(1) << log_p, n = m * P;
  if (signs)
    for (int64_t i = 0; i < n; ++i) v[i] *= signs[i];
  sylvester_chunks(v, m, log_p);
  if (m > 1) {
    small_hadamard(dense_table(m), m, P, v, tmp);
    for (int64_t i = 0; i < n; ++i) v[i] = tmp[i];
  }
  for (int64_t i = 0; i < n; ++i) v[i] *= scale;
}

template void sylvester_chunks<float>(float*, int, int);
template void sylvester_chunks<double>(double*, int, int);
template void small_hadamard<float>(const float*, int, int64_t, const float*, float*);
template void small_hadamard<double>(const float*, int, int64_t, const double*, double*);

}  // namespace pvq::hadamard
