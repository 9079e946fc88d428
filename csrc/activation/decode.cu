// CUDA kernel of the W+A product's activation side: coded activations (pulses, gain code, per-token
// scale) decoded to fp32 x̂' in the rotated basis, with the validity checks of the CPU kernel. The
// glue (activation/cuda_glue.cpp) then multiplies x̂' with the packed layer by the same kernels as
// pvq_matmul (the fused decode-GEMV up to 16 tokens, dequantized tiles through cuBLAS above).
//
// Why decode the activations instead of a kernel of integer pulse dot products (paper.md §7):
// - Per weight the GEMV's cost is its weight decoder (bench/results/kernel-budget-*.md: 28.9
//   instructions a weight at batch 1, pvq-3.25, of which the dot product is one FFMA per token).
//   Activations decoded once per token cost n multiplies per token, nothing per weight; the GEMV's
//   inner loop stays exactly the fp32 pvq_matmul's.
// - An integer-dot variant in that loop would keep the pulses as floats (the staged decoder's pair
//   table yields floats; integer sums of |y| <= 127 products are exact in fp32 up to 2^24) and add
//   per group and token one load of the activation factor and one multiply: +2/D instructions a
//   weight per token, for no gain in accuracy (the float64 bound holds either way, tested).
// - What would pay is dp4a (4 products an instruction) at batch >= 4, where the FFMAs are a third
//   of the count; it needs an int8 pair table and byte packing in the decoder (not done).
//
// Arithmetic: each group's factor is group_factor(scale, level[c], |y|^2) as the CPU kernel's
// activation_factors computes it, and x̂'_d = factor * y_d in one float product, so x̂' is the same
// float32 value the CPU path's factors give (tests check it bit for bit). A group whose sum |y| is
// not act_K, or whose gain code is past the levels, decodes to zeros and is flagged in `bad`.
//
// One thread per group (grid-stride, persistent grid); the D pulses are one vector load at
// D = 4, 8, 16 (the glue gives 16-byte aligned rows), the D floats vector stores.
#include <cuda_runtime.h>

#include <cstdint>

#include "activation/activation_code.h"
#include "activation/launchers.h"
#include "codec/pyramid.h"
#include "common/dispatch.h"
#include "common/launch.h"
#include "packed/packed_layer.h"

namespace pvq_cuda {
namespace {

constexpr int kThreads = 256;

// The D pulses of a group starting at p (aligned to min(D, 16) bytes), widened to int.
template <int D>
__device__ __forceinline__ void load_pulses(const int8_t* __restrict__ p, int (&y)[D]) {
  if constexpr (D >= 4 && D <= 16) {
    constexpr int kWords = D / 4;
    uint32_t w[kWords];
    if constexpr (kWords == 4) {
      const uint4 v = *reinterpret_cast<const uint4*>(p);
      w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
    } else if constexpr (kWords == 2) {
      const uint2 v = *reinterpret_cast<const uint2*>(p);
      w[0] = v.x, w[1] = v.y;
    } else {
      w[0] = *reinterpret_cast<const uint32_t*>(p);
    }
#pragma unroll
    for (int d = 0; d < D; ++d) y[d] = int(int8_t(uint8_t(w[d / 4] >> (8 * (d % 4)))));
  } else {
#pragma unroll
    for (int d = 0; d < D; ++d) y[d] = p[d];
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads)
    decode_activations_kernel(pvq::SplitTables t, const int8_t* __restrict__ pulses, const uint8_t* __restrict__ gain,
                              const uint16_t* __restrict__ scale, const float* __restrict__ levels, int level_count,
                              int64_t groups, int64_t groups_per_token, int K, float* __restrict__ out,
                              uint8_t* __restrict__ bad) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < groups; e += stride) {
    int y[D];
    load_pulses<D>(pulses + e * D, y);
    int k = 0, sq = 0;
#pragma unroll
    for (int d = 0; d < D; ++d) {
      k += y[d] < 0 ? -y[d] : y[d];
      sq += y[d] * y[d];
    }
    const int c = gain[e];
    const bool ok = k == K && c < level_count;
    // Out-of-range indices are never read: sq <= K^2 and c < level_count when ok.
    const float f = ok ? pvq::act::group_factor(pvq::half_bits_to_float(scale[e / groups_per_token]), levels[c], t, sq)
                       : 0.f;
    float* o = out + e * D;
    if constexpr (D % 4 == 0) {
#pragma unroll
      for (int q = 0; q < D / 4; ++q)
        reinterpret_cast<float4*>(o)[q] =
            make_float4(pvq::act::mul_rn(f, float(y[4 * q])), pvq::act::mul_rn(f, float(y[4 * q + 1])),
                        pvq::act::mul_rn(f, float(y[4 * q + 2])), pvq::act::mul_rn(f, float(y[4 * q + 3])));
    } else {
#pragma unroll
      for (int d = 0; d < D; ++d) o[d] = pvq::act::mul_rn(f, float(y[d]));
    }
    bad[e] = ok ? 0 : 1;
  }
}

}  // namespace

cudaError_t launch_decode_activations(const pvq::SplitTables& tables, const CodedActivations& in, int64_t tokens,
                                      int64_t n, int D, int K, float* out, uint8_t* bad, cudaStream_t stream) {
  if (tokens < 0 || D < 1 || n % D != 0 || in.level_count < 1 || in.level_count > 256) return cudaErrorInvalidValue;
  const int64_t groups = tokens * (n / D);
  if (groups == 0) return cudaSuccess;
  return pvq::dispatch_group_size(D, [&](auto Dc) {
    constexpr int N = decltype(Dc)::value;
    int blocks = 0;
    const cudaError_t err = persistent_grid(decode_activations_kernel<N>, groups, kThreads, 0, &blocks);
    if (err != cudaSuccess) return err;
    return launch_kernel(decode_activations_kernel<N>, blocks, kThreads, 0, stream, tables, in.pulses, in.gain,
                         in.scale, in.levels, in.level_count, groups, n / D, K, out, bad);
  });
}

}  // namespace pvq_cuda
