// Online PVQ coding of activations (paper.md §7) and the W+A group dot product: the arithmetic that
// defines the codes, shared by the CPU kernels (g++) and the CUDA kernels (nvcc). Torch-free.
//
// A token x [n] (one activation row) is coded in the layer's rotated basis x' = R x (the weight's
// own rotation, R = H S / sqrt(n), computed exactly as hadamard_transform computes it in fp32),
// cut into G = n / D groups of D:
//   pulses  y_j    = search(x'_j, K)                         (the codec's search, bit for bit)
//   index  i_j     = encode(y_j, K)                          (split order, the codec's encode)
//   gain   s_j     = <x'_j, y_j> / |y_j|                     (least squares, >= 0: y follows x's signs)
//   code   c_j     = #{k : mid_k < s_j / r}, r = |x'|,  mid_k = (level_k + level_k+1) / 2
//   scale  a       = fp16( sum_j level[c_j] s_j / sum_j level[c_j]^2 )   (least squares over the token)
// and decodes to  x̂'_j = a · level[c_j] · y_j / |y_j|.  The levels are the Lloyd–Max levels for the
// Beta law of a group's energy share (format/gain.py), as for weights.
//
// Every floating-point step below is written out with its rounding: products and sums as separate
// IEEE operations (mul_rn / add_rn: never contracted into an FMA, which nvcc would do by default
// and g++ would do with -march=native), reductions over groups in one fixed pairwise tree
// (tree_sum). So a CPU kernel and a CUDA kernel that follow these definitions agree bit for bit,
// and tests/reference_activation.py reproduces them with torch ops.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "codec/pyramid.h"

namespace pvq::act {

// In device code the round-to-nearest intrinsics, which nvcc never fuses into an FMA; in the CUDA
// emulator (tests/cuda_emulation, where PVQ_DEVICE_CODE is on too) those intrinsics are plain
// operators compiled with -ffp-contract=off, so the device branch is the one it tests. Host code
// (the CPU kernels, g++) uses plain operators, compiled with -ffp-contract=off (CMakeLists.txt),
// which round the same way.
PVQ_HD float mul_rn(float a, float b) {
#if PVQ_DEVICE_CODE
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
PVQ_HD float add_rn(float a, float b) {
#if PVQ_DEVICE_CODE
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
PVQ_HD double dmul_rn(double a, double b) {
#if PVQ_DEVICE_CODE
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
PVQ_HD double dadd_rn(double a, double b) {
#if PVQ_DEVICE_CODE
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// The fixed reduction tree over v[0..G): for stride 1, 2, 4, ...: v[i] += v[i + stride] for every
// i that is a multiple of 2·stride with i + stride < G. The sum ends in v[0]. (A CUDA block runs
// the same strides in shared memory, one level per __syncthreads.)
PVQ_HD double tree_sum(double* v, int G) {
  for (int stride = 1; stride < G; stride <<= 1)
    for (int i = 0; i + stride < G; i += 2 * stride) v[i] = dadd_rn(v[i], v[i + stride]);
  return G > 0 ? v[0] : 0.0;
}

// IEEE binary16 bits of a float, rounded to nearest even; overflow gives ±Inf (callers reject it).
PVQ_HD uint16_t float_to_half_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));  // Inf / NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520: rounds past the largest half
  if (a < 0x38800000u) {
    // Below 2^-14: a subnormal half, m · 2^-24 with m = round(|f| · 2^24), ties to even.
    if (a < 0x33000000u) return uint16_t(sign);  // below 2^-25: rounds to zero
    const int e = int(a >> 23);                  // biased exponent, 102..112
    const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
    const int shift = 126 - e;                   // |f| 2^24 = mant 2^(e - 126 - ... ) : drop `shift` bits
    const uint32_t q = mant >> shift, rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    const uint32_t m = q + (rem > half || (rem == half && (q & 1u)) ? 1u : 0u);
    return uint16_t(sign | m);
  }
  // Normal: keep 10 of the 23 mantissa bits, ties to even; a carry rolls into the exponent.
  const uint32_t rebased = a - (uint32_t(112) << 23);  // exponent bias 127 -> 15
  const uint32_t q = rebased >> 13, rem = rebased & 0x1fffu;
  const uint32_t h = q + (rem > 0x1000u || (rem == 0x1000u && (q & 1u)) ? 1u : 0u);
  return uint16_t(sign | h);
}

// One group of D rotated activations: pulses, index, |y|^2, the least-squares gain and the
// group's sum of squares. Returns false (pulses zero) when the group holds NaN or Inf.
template <int D>
PVQ_HD bool code_group(const SplitTables& t, const float* x, int K, int8_t* y, uint64_t* index, float* gain,
                       double* energy) {
  if (!search_group<D>([&](int j) { return x[j]; }, K, y)) return false;
  *index = encode_node<D>(t, y, K);
  float dot = 0.f;
  int sq = 0;
  double e = 0.0;
  for (int d = 0; d < D; ++d) {
    dot = add_rn(dot, mul_rn(x[d], float(y[d])));
    sq += int(y[d]) * int(y[d]);
    e = dadd_rn(e, dmul_rn(double(x[d]), double(x[d])));
  }
  *gain = mul_rn(dot, t.inv_norm[sq]);
  *energy = e;
  return true;
}

// The gain code of a group: how many midpoints lie below gain / norm (0 for a zero token), found
// by bisection over the increasing midpoints (torch.bucketize's rule).
PVQ_HD int gain_code(float gain, float norm, const float* mid, int levels) {
  if (!(norm > 0.f)) return 0;
  const float ratio = gain / norm;
  int lo = 0, hi = levels - 1;  // the answer lies in [lo, hi]
  while (lo < hi) {
    const int m = (lo + hi) / 2;
    if (mid[m] < ratio)
      lo = m + 1;
    else
      hi = m;
  }
  return lo;
}

// The midpoints between consecutive levels, mid[k] = (level[k] + level[k+1]) / 2 in float.
PVQ_HD void midpoints(const float* level, int levels, float* mid) {
  for (int k = 0; k + 1 < levels; ++k) mid[k] = add_rn(level[k], level[k + 1]) * 0.5f;
}

// The per-token scale from the two least-squares sums (each a tree_sum over the groups of
// level[c_j]·s_j and level[c_j]^2, in double), as fp16 bits; 0 when den is 0. An Inf result
// (the scale past fp16's range) is for the caller to reject.
PVQ_HD uint16_t token_scale_bits(double num, double den) {
  return den > 0.0 ? float_to_half_bits(float(num / den)) : uint16_t(0);
}

// The decoded factor of a group, a · level[c] / |y| (x̂'_j = factor · y_j), in float; the W+A
// product uses the same value.
PVQ_HD float group_factor(float scale, float level, const SplitTables& t, int sq) {
  return mul_rn(mul_rn(scale, level), t.inv_norm[sq]);
}

}  // namespace pvq::act
