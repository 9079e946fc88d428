// Device helpers shared by the codec and packed-layer kernels: the shared-memory leaf table and int8
// group loads and stores.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "codec/pyramid.h"
#include "codec/split_tables.h"

namespace pvq_cuda {

// The largest k such that the 4-leaf words of every k' <= k (for pyramids of at most K pulses)
// fit in `max_bytes` of shared memory; -1 when D < 4 or nothing fits. Leaves above it split 2+2.
inline int leaf_prefix_k(int D, int K, size_t max_bytes) {
  if (D < 4) return -1;
  const std::vector<uint32_t>& base = pvq::host_split_tables().leaf_base;
  const int kmax = K < pvq::kHostLeafMaxK ? K : pvq::kHostLeafMaxK;
  int k = -1;
  while (k < kmax && base[k + 2] * sizeof(uint32_t) <= max_bytes) ++k;
  return k;
}

inline size_t leaf_prefix_bytes(int k) {
  return k < 0 ? 0 : pvq::host_split_tables().leaf_base[k + 1] * sizeof(uint32_t);
}

// Copies the leaf prefix into shared memory and points the tables at it (all threads call this).
__device__ __forceinline__ void stage_leaf_table(pvq::SplitTables& t, uint32_t* smem, int k) {
  if (k >= 0) {
    const uint32_t n = t.leaf_base[k + 1];
    for (uint32_t e = threadIdx.x; e < n; e += blockDim.x) smem[e] = t.leaf[e];
    __syncthreads();
  }
  t.leaf = smem;
  t.leaf_max_k = k;
}

// Stores one group of D int8 pulses with the widest aligned store (rows start at g*D bytes).
template <int D>
__device__ __forceinline__ void store_group(int8_t* dst, const int8_t (&y)[D]) {
  if constexpr (D >= 4) {
    uint32_t w[D / 4];
#pragma unroll
    for (int q = 0; q < D / 4; ++q)
      w[q] = uint32_t(uint8_t(y[4 * q])) | uint32_t(uint8_t(y[4 * q + 1])) << 8 |
             uint32_t(uint8_t(y[4 * q + 2])) << 16 | uint32_t(uint8_t(y[4 * q + 3])) << 24;
    if constexpr (D == 4) {
      *reinterpret_cast<uint32_t*>(dst) = w[0];
    } else if constexpr (D == 8) {
      *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
    } else {
#pragma unroll
      for (int q = 0; q < D / 4; q += 4)
        *reinterpret_cast<uint4*>(dst + 4 * q) = make_uint4(w[q], w[q + 1], w[q + 2], w[q + 3]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < D; ++j) dst[j] = y[j];
  }
}

// Loads one group of D int8 pulses (the mirror of store_group).
template <int D>
__device__ __forceinline__ void load_group(const int8_t* src, int8_t (&y)[D]) {
  if constexpr (D >= 4) {
    uint32_t w[D / 4];
    if constexpr (D == 4) {
      w[0] = *reinterpret_cast<const uint32_t*>(src);
    } else if constexpr (D == 8) {
      const uint2 v = *reinterpret_cast<const uint2*>(src);
      w[0] = v.x;
      w[1] = v.y;
    } else {
#pragma unroll
      for (int q = 0; q < D / 4; q += 4) {
        const uint4 v = *reinterpret_cast<const uint4*>(src + 4 * q);
        w[q] = v.x;
        w[q + 1] = v.y;
        w[q + 2] = v.z;
        w[q + 3] = v.w;
      }
    }
#pragma unroll
    for (int j = 0; j < D; ++j) y[j] = int8_t(w[j / 4] >> (8 * (j % 4)));
  } else {
#pragma unroll
    for (int j = 0; j < D; ++j) y[j] = src[j];
  }
}

}  // namespace pvq_cuda
