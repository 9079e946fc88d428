// Exact PVQ codec math in split order (paper.md §2–§3), shared verbatim by the CPU kernels (g++)
// and the CUDA kernels (nvcc). Torch-free on purpose: a .cu that includes torch headers compiles in
// ~60 s instead of ~2 s (notes/build.md), and one source for both devices is what makes
// "CPU and CUDA agree bit for bit" true by construction rather than by testing alone.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/device_code.h"

#if defined(__CUDACC__)
#define PVQ_HD __host__ __device__ __forceinline__
#else
#define PVQ_HD inline
#endif

namespace pvq {

constexpr int kMaxK = 127;           // |y_i| <= K must fit int8 pulses
constexpr int kMaxLevel = 5;         // D = 2^5 = 32
constexpr int kMaxIndexBits = 63;    // indices are int64 tensors; 2^63 also bounds every remainder
constexpr int kGuideBits = 6;        // 64 buckets: at K=16 at most 2 extra compares (pvq_decoding.md §4b.1)
constexpr int kHostLeafMaxK = 16;    // host leaf table: sum_{k<=16} V(4,k) = 50,049 entries, 196 KB
constexpr uint64_t kSaturated = ~uint64_t(0);  // a count too large for 64 bits (never a valid (D,K))

// Entries per level of the triangular offset table: k = 0..kMaxK, each with k1 = 0..k+1.
PVQ_HD constexpr int tri(int k) { return k * (k + 3) / 2; }
constexpr int kOffsetsPerLevel = tri(kMaxK + 1);

// Every table the codec reads. Plain pointers, so one struct serves host memory, device global
// memory and (for `leaf`) shared memory. Built once on the host by build_split_tables().
struct SplitTables {
  const uint64_t* count;       // [level 0..5][k]      V(2^level, k), kSaturated when >= 2^64
  const uint64_t* offset;      // [level 1..5][tri(k)+k1]  off(n,k,k1) = sum_{j<k1} V(h,j) V(h,k-j)
  const uint8_t* guide;        // [level 1..5][k][64]  smallest k1 of the indices in bucket i>>shift
  const uint8_t* guide_shift;  // [level 1..5][k]
  const uint64_t* magic;       // [level 0..4][k]      reciprocal of V(2^level,k), see divide()
  const uint8_t* magic_log;    // [level 0..4][k]      ceil(log2 V(2^level,k))
  const uint32_t* leaf_base;   // [k], k = 0..leaf_max_k+1: first entry of k pulses in `leaf`
  const uint32_t* leaf;        // int8x4 words: the 4-leaf decode, tabulated for k <= leaf_max_k
  const float* inv_norm;       // [s], s = 0..kMaxK^2: 1/sqrt(s) rounded once from double, so a
                               // group's gain is the same float on every device
  int leaf_max_k;              // leaves with more pulses split 4 -> 2+2 instead (-1: no table)
};

PVQ_HD uint64_t count_at(const SplitTables& t, int level, int k) {
  return t.count[level * (kMaxK + 1) + k];
}

PVQ_HD uint64_t mulhi64(uint64_t a, uint64_t b) {
#if PVQ_DEVICE_CODE
  return __umul64hi(a, b);
#else
  return uint64_t((unsigned __int128)a * b >> 64);
#endif
}

// floor(r / d) for r < 2^63 without a divide instruction. With l = ceil(log2 d) and
// m = ceil(2^(63+l) / d) (< 2^64), Granlund–Montgomery give floor(m r / 2^(63+l)) = floor(r / d)
// for every r < 2^63: the rounding error of m adds less than 2^-l <= 1/d to r/d.
PVQ_HD uint64_t divide(uint64_t r, uint64_t m, int l) {
  return l == 0 ? r : mulhi64(m, r) >> (l - 1);
}

template <int N>
struct Log2 { static constexpr int value = 1 + Log2<N / 2>::value; };
template <>
struct Log2<1> { static constexpr int value = 0; };

// V(4, k) = 8k + 8(k^3 - k)/3 for k >= 1: every index and offset of a node of N <= 4 fits 32 bits.
PVQ_HD constexpr uint64_t count4(uint64_t k) { return k == 0 ? 1 : 8 * k + 8 * (k * k * k - k) / 3; }
static_assert(count4(kMaxK) < (uint64_t(1) << 32), "N <= 4 nodes must index in 32 bits");

// floor(r / d) as divide() for r < 2^32: the high 64 bits of m r from two 32x64 products, not four.
PVQ_HD uint32_t divide32(uint32_t r, uint64_t m, int l) {
  if (l == 0) return r;
  const uint64_t lo = uint64_t(uint32_t(m)) * r;
  const uint64_t hi = uint64_t(uint32_t(m >> 32)) * r + (lo >> 32);
  return uint32_t(hi >> 32) >> (l - 1);  // mulhi64(m, r) < r < 2^32, so the 32-bit shift is exact
}

// ---------------------------------------------------------------------------------------------
// Decode: index -> pulses. Each node finds k1 (guide bucket, then a short compare walk), does one
// multiply-high division, and hands two independent indices to its halves; 4-leaves are one table
// read. No coordinate waits on another, unlike the sequential Fischer/Opus order. Nodes of N <= 4
// take 32-bit indices (count4 above): on a GPU that halves their compares, subtractions and
// products, which matter because most leaves miss the shared-memory table and split 2+2
// (bench/results/kernel-budget-2026-12-01.md).
// ---------------------------------------------------------------------------------------------
// I, the index type, is never deduced (type_identity_t): callers pass any integer index and get the
// 64-bit decode of the top node; only the recursion narrows it.
template <int N, typename I = uint64_t>
PVQ_HD void decode_node(const SplitTables& t, std::type_identity_t<I> i, int k, int8_t* y) {
  if constexpr (N == 1) {
    y[0] = int8_t(k == 0 ? 0 : (i ? -k : k));
  } else if constexpr (N == 2) {
    // off(2,k,k1) = 0, then 2 + 4(k1-1): closed form, so no table and no division.
    if (k == 0) {
      y[0] = 0;
      y[1] = 0;
    } else if (i < 2) {
      y[0] = 0;
      y[1] = int8_t(i ? -k : k);
    } else if (i >= I(4 * k - 2)) {
      y[0] = int8_t(i > I(4 * k - 2) ? -k : k);
      y[1] = 0;
    } else {
      const uint32_t u = uint32_t(i) - 2u;
      const int k1 = 1 + int(u >> 2), k2 = k - k1;
      y[0] = int8_t(u & 2u ? -k1 : k1);
      y[1] = int8_t(u & 1u ? -k2 : k2);
    }
  } else {
    if (N == 4 && k <= t.leaf_max_k) {
      const uint32_t w = t.leaf[t.leaf_base[k] + uint32_t(i)];
      y[0] = int8_t(w);
      y[1] = int8_t(w >> 8);
      y[2] = int8_t(w >> 16);
      y[3] = int8_t(w >> 24);
      return;
    }
    constexpr int L = Log2<N>::value, H = N / 2;
    using Child = std::conditional_t<(H <= 4), uint32_t, I>;
    const int node = (L - 1) * (kMaxK + 1) + k;
    const uint64_t* off = t.offset + (L - 1) * kOffsetsPerLevel + tri(k);
    int k1 = t.guide[node * (1 << kGuideBits) + int(i >> t.guide_shift[node])];
    while (I(off[k1 + 1]) <= i) ++k1;
    const int k2 = k - k1;
    const I r = i - I(off[k1]);
    const int child = (L - 1) * (kMaxK + 1) + k2;
    Child i1, i2;
    if constexpr (N <= 4) {
      const uint32_t r32 = uint32_t(r);  // r < V(4, k) < 2^32 (count4), also when I is 64-bit (D = 4)
      i1 = divide32(r32, t.magic[child], t.magic_log[child]);
      i2 = r32 - i1 * uint32_t(count_at(t, L - 1, k2));
    } else {
      // Children of N >= 16 nodes at large K need 64 bits; those of an 8-node never do (count4).
      const uint64_t q = divide(r, t.magic[child], t.magic_log[child]);
      i1 = Child(q);
      i2 = Child(r - q * count_at(t, L - 1, k2));
    }
    decode_node<H, Child>(t, i1, k1, y);
    decode_node<H, Child>(t, i2, k2, y + H);
  }
}

// ---------------------------------------------------------------------------------------------
// Encode: pulses -> index, O(N log N) adds and N multiplies. Requires sum |y| == k (checked by the
// callers, which report the offending row).
// ---------------------------------------------------------------------------------------------
template <int N>
PVQ_HD int abs_sum(const int8_t* y) {
  int s = 0;
  for (int j = 0; j < N; ++j) s += y[j] < 0 ? -y[j] : y[j];
  return s;
}

template <int N>
PVQ_HD uint64_t encode_node(const SplitTables& t, const int8_t* y, int k) {
  if constexpr (N == 1) {
    return (k != 0 && y[0] < 0) ? 1u : 0u;
  } else {
    constexpr int L = Log2<N>::value, H = N / 2;
    const int k1 = abs_sum<H>(y), k2 = k - k1;
    const uint64_t off = t.offset[(L - 1) * kOffsetsPerLevel + tri(k) + k1];
    return off + encode_node<H>(t, y, k1) * count_at(t, L - 1, k2) + encode_node<H>(t, y + H, k2);
  }
}

// ---------------------------------------------------------------------------------------------
// Search: the pyramid point nearest in angle to x. Runs in exact integer arithmetic on a fixed-
// point copy of |x| (S fractional bits below max|x|), so it is deterministic and identical on CPU
// and GPU whatever the compiler does with floating-point contraction.
// ---------------------------------------------------------------------------------------------

// Fractional bits for |x| such that every cross-multiplied score below fits 64 bits:
// (X + q)^2 * (Y + 2y + 1) <= (K+1)^4 2^(2S) < 2^63. Beyond 24 bits fp32 inputs carry no more.
PVQ_HD int search_fraction_bits(int K) {
  int b = 0;
  while ((1 << b) < K + 1) ++b;  // ceil(log2(K+1))
  const int s = (63 - 4 * b) / 2;
  return s < 24 ? s : 24;
}

// Is num_a / den_a > num_b / den_b? (All terms positive, products < 2^64 by the bound above.)
PVQ_HD bool ratio_greater(uint64_t num_a, uint64_t den_a, uint64_t num_b, uint64_t den_b) {
  return num_a * den_b > num_b * den_a;
}

// NaN and Inf have an all-ones exponent; a bit test behaves the same under every compiler flag.
PVQ_HD bool finite_bits(float v) {
  uint32_t u;
  memcpy(&u, &v, sizeof u);
  return (u & 0x7f800000u) != 0x7f800000u;
}

// Returns false (and writes zeros) when x holds NaN or Inf.
template <int N, typename Load>
PVQ_HD bool search_group(Load load, int K, int8_t* out) {
  float a[N];
  float amax = 0.f;
  bool finite = true;
  for (int j = 0; j < N; ++j) {
    const float v = load(j);
    finite = finite && finite_bits(v);
    a[j] = fabsf(v);
    amax = fmaxf(amax, a[j]);
  }
  if (!finite) {
    for (int j = 0; j < N; ++j) out[j] = 0;
    return false;
  }
  int y[N];
  if (amax == 0.f) {
    // No direction to follow: the first axis, like Opus.
    for (int j = 0; j < N; ++j) y[j] = 0;
    y[0] = K;
  } else {
    int e;
    frexpf(amax, &e);  // amax = f 2^e, f in [0.5, 1): scaling by 2^(S-e) is exact
    const int S = search_fraction_bits(K);
    uint64_t q[N];
    uint64_t qsum = 0;
    for (int j = 0; j < N; ++j) {
      q[j] = uint64_t(rintf(ldexpf(a[j], S - e)));
      qsum += q[j];
    }
    // Projection: floor(K q / sum q) leaves fewer than N pulses to place.
    int left = K;
    uint64_t X = 0, Y = 0;  // <|x|, y> in fixed point, and |y|^2
    for (int j = 0; j < N; ++j) {
      y[j] = int(uint64_t(K) * q[j] / qsum);
      left -= y[j];
      X += q[j] * uint64_t(y[j]);
      Y += uint64_t(y[j] * y[j]);
    }
    // Greedy: each remaining pulse goes where it raises <|x|,y>/|y| most.
    for (; left > 0; --left) {
      int best = 0;
      uint64_t bn = 0, bd = 1;
      for (int j = 0; j < N; ++j) {
        const uint64_t xn = X + q[j];
        const uint64_t num = xn * xn, den = Y + 2 * uint64_t(y[j]) + 1;
        if (ratio_greater(num, den, bn, bd)) {
          best = j;
          bn = num;
          bd = den;
        }
      }
      X += q[best];
      Y += 2 * uint64_t(y[best]) + 1;
      ++y[best];
    }
    // Refinement past greedy: move one pulse i -> j while the best such move raises the cosine.
    // Each accepted move strictly raises X^2/Y over a finite set, so this terminates; the cap only
    // bounds the worst case (it is rarely reached: tests/test_search.py reports the miss rate).
    for (int pass = 0; pass < 2 * N; ++pass) {
      int bi = -1, bj = -1;
      uint64_t bn = X * X, bd = Y;
      for (int i = 0; i < N; ++i) {
        if (y[i] == 0) continue;
        for (int j = 0; j < N; ++j) {
          if (j == i) continue;
          const uint64_t xn = X - q[i] + q[j];
          const uint64_t num = xn * xn, den = Y + 2 * uint64_t(y[j]) + 2 - 2 * uint64_t(y[i]);
          if (ratio_greater(num, den, bn, bd)) {
            bi = i;
            bj = j;
            bn = num;
            bd = den;
          }
        }
      }
      if (bi < 0) break;
      X = X - q[bi] + q[bj];
      Y = bd;
      --y[bi];
      ++y[bj];
    }
  }
  for (int j = 0; j < N; ++j) out[j] = int8_t(load(j) < 0.f ? -y[j] : y[j]);
  return true;
}

}  // namespace pvq
