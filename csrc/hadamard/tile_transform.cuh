// Device building blocks of the Hadamard transform over a tile of whole rows staged in shared memory,
// shared by hadamard_transform's kernel (hadamard/hadamard.cu, whose header comment gives the design
// and its numbers) and the activation encoder (activation/encode.cu), which rotates each token this
// way before coding it. Both round exactly as the CPU's rotate_row / hadamard_transform do: stages in
// the order bit 0, 1, …, then H_m summed over increasing a', one rounding per operation.
//
// Layout: a tile of rows_here · n elements, element i at smem[padded(i)] (one pad word per 32 makes
// every access below conflict-free; see hadamard.cu).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <numeric>
#include <utility>

#include "hadamard/hadamard_matrix.h"

namespace pvq_cuda::hadamard_tile {

namespace hm = pvq::hadamard;

constexpr int kThreads = 256;           // 8 warps: every kernel that runs these passes uses this block size
constexpr int kLogWindow = 5;           // bits of b per shared-memory pass
constexpr int kWindow = 1 << kLogWindow;
constexpr int kTileTarget = kThreads * kWindow;  // elements per tile: one window per thread and pass

// Element i of a tile sits at smem[padded(i)]: one pad word per 32 (bank-conflict argument in hadamard.cu).
__device__ __forceinline__ int padded(int i) { return i + (i >> 5); }

// Words of shared memory for a tile of cnt elements: padded(cnt - 1) + 1. Host and device: the
// activation encoder sizes its shared memory with it in the launcher and in the kernel.
__host__ __device__ constexpr int64_t tile_words(int64_t cnt) { return cnt + (cnt - 1) / 32; }

// Register conversions and 16-byte vector (un)packing per dtype; kLogVec = log2(elements per vector).
template <typename T>
struct Io;

template <>
struct Io<float> {
  static constexpr int kLogVec = 2;
  __device__ static float to_float(float v) { return v; }
  __device__ static float from_float(float v) { return v; }
  __device__ static void unpack(const uint4& w, float (&r)[4]) {
    r[0] = __uint_as_float(w.x);
    r[1] = __uint_as_float(w.y);
    r[2] = __uint_as_float(w.z);
    r[3] = __uint_as_float(w.w);
  }
  __device__ static uint4 pack(const float (&r)[4]) {
    return make_uint4(__float_as_uint(r[0]), __float_as_uint(r[1]), __float_as_uint(r[2]), __float_as_uint(r[3]));
  }
};

// fp16 and bf16 share the layout: 8 elements per vector, element 2q in the low half of word q.
// Self supplies the dtype's conversions (to_float, from_float, from_bits, to_bits).
template <typename Self>
struct Io16 {
  static constexpr int kLogVec = 3;
  __device__ static void unpack(const uint4& w, float (&r)[8]) {
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      r[2 * q] = Self::to_float(Self::from_bits((unsigned short)(words[q] & 0xffffu)));
      r[2 * q + 1] = Self::to_float(Self::from_bits((unsigned short)(words[q] >> 16)));
    }
  }
  __device__ static uint4 pack(const float (&r)[8]) {
    uint32_t words[4];
#pragma unroll
    for (int q = 0; q < 4; ++q)
      words[q] = uint32_t(Self::to_bits(Self::from_float(r[2 * q]))) |
                 uint32_t(Self::to_bits(Self::from_float(r[2 * q + 1]))) << 16;
    return make_uint4(words[0], words[1], words[2], words[3]);
  }
};

template <>
struct Io<__half> : Io16<Io<__half>> {
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ static __half from_bits(unsigned short b) { return __ushort_as_half(b); }
  __device__ static unsigned short to_bits(__half v) { return __half_as_ushort(v); }
};

template <>
struct Io<__nv_bfloat16> : Io16<Io<__nv_bfloat16>> {
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ static __nv_bfloat16 from_bits(unsigned short b) { return __ushort_as_bfloat16(b); }
  __device__ static unsigned short to_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
};

// Butterflies on the register-index bits [first, last) of r, in increasing bit order (the CPU's
// order). The bit loop unrolls, so every r[k] index is a constant and r stays in registers; the
// run-time bounds only switch whole stages on or off, uniformly across the block.
template <int kLog>
__device__ __forceinline__ void butterflies(float (&r)[1 << kLog], int first, int last) {
#pragma unroll
  for (int j = 0; j < kLog; ++j) {
    if (j < first || j >= last) continue;
#pragma unroll
    for (int k = 0; k < (1 << kLog); ++k) {
      if (k & (1 << j)) continue;
      const float u = r[k], w = r[k | (1 << j)];
      r[k] = u + w;
      r[k | (1 << j)] = u - w;
    }
  }
}

// The vector of elements i0 .. i0 + 2^kLogVec − 1 of a tile of cnt elements (zeros past cnt; i0 a
// multiple of the vector length), times the signs (col: i0's column), with the butterfly stages
// below in_load done. Returns whether the vector was whole. The sign product is __fmul_rn so that
// nvcc cannot fuse it into the first butterfly's add: the CPU rounds it on its own (any sign value).
template <typename T>
__device__ __forceinline__ bool load_vector(const T* xt, int i0, int cnt, int n, const float* signs, int in_load,
                                            float (&r)[1 << Io<T>::kLogVec]) {
  constexpr int kVec = 1 << Io<T>::kLogVec;
  const bool full = i0 + kVec <= cnt;
  if (full) {
    Io<T>::unpack(__ldg(reinterpret_cast<const uint4*>(xt + i0)), r);
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) r[e] = i0 + e < cnt ? Io<T>::to_float(xt[i0 + e]) : 0.0f;
  }
  if (signs != nullptr) {
    int col = i0 % n;  // a vector may cross a row end when n < 64
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      r[e] = __fmul_rn(r[e], __ldg(signs + col));
      col = col + 1 == n ? 0 : col + 1;
    }
  }
  // i0 is a multiple of kVec, so bits below kLogVec of i0 + e are those of e, and bits below
  // log_p are b: stages 0 .. in_load-1 pair elements of the same vector and the same chunk.
  butterflies<Io<T>::kLogVec>(r, 0, in_load);
  return full;
}

// The signs of H_m as compile-time constants: HmNegative<M, A, B>::value is a scalar constexpr, the
// one kind of host constant device code may use, folded from the constexpr construction.
template <int M>
struct HmTable {
  static constexpr hm::SignMatrix value = hm::paley2(M);
  static_assert(value.m == M, "m must be one of hadamard_matrix.h's kBases");
};

template <int M, int A, int B>
struct HmNegative {
  static constexpr bool value = HmTable<M>::value.negative(A, B);
};

// Σ_{a'} H_m[A][a'] · t[a'], in increasing a' (the CPU's order): one FADD or FSUB per term.
template <int M, int A, int... Bs>
__device__ __forceinline__ float hm_row(const float (&t)[M], std::integer_sequence<int, Bs...>) {
  float acc = 0.0f;
  ((acc = HmNegative<M, A, Bs>::value ? acc - t[Bs] : acc + t[Bs]), ...);
  return acc;
}

// store(a, H_m[a] · t) for every output a of one column.
template <int M, typename Store, int... As>
__device__ __forceinline__ void hm_column(const float (&t)[M], Store& store, std::integer_sequence<int, As...>) {
  (store(As, hm_row<M, As>(t, std::make_integer_sequence<int, M>{})), ...);
}

// The H_m pass along a: thread c takes column b of row r of the tile, holds its M values in
// registers, and hands each output to store(i, value), i its element index in the tile (the
// Hadamard kernel scales and writes to global memory; the encoder writes back to the same words,
// which only this thread reads).
template <int M, typename Store>
__device__ __forceinline__ void hm_pass(const float* smem, int rows_here, int n, int log_p, Store store) {
  const int cols = rows_here << log_p;
  for (int c = threadIdx.x; c < cols; c += kThreads) {
    const int i0 = (c >> log_p) * n + (c & ((1 << log_p) - 1));
    float t[M];
#pragma unroll
    for (int a = 0; a < M; ++a) t[a] = smem[padded(i0 + (a << log_p))];
    auto out = [&](int a, float v) { store(i0 + (a << log_p), v); };
    hm_column<M>(t, out, std::make_integer_sequence<int, M>{});
  }
}

// One shared-memory pass over a tile of cnt elements: window t holds the 32 elements
// base + k·2^lo (k < 32; base has zero bits lo..lo+4, its lower bits from t's low bits and its
// higher bits from the rest of t), gets the butterflies on register bits [first, last), and goes
// back to shared memory, or (out) scaled and rounded to the output. With padded(i) = i + i/32 and
// base's bits lo..lo+4 clear, padded(base + (k << lo)) = padded(base) + padded(k << lo): one base
// pointer per window plus per-k offsets that are the same for every thread.
template <typename T, bool kChecked>
__device__ __forceinline__ void window_pass(float* smem, T* yt, int cnt, int lo, int first, int last, bool out,
                                            float scale) {
  const int windows = ((cnt + (kWindow << lo) - 1) >> (lo + kLogWindow)) << lo;
  for (int t = threadIdx.x; t < windows; t += kThreads) {
    const int base = (t & ((1 << lo) - 1)) | ((t >> lo) << (lo + kLogWindow));
    float* win = smem + padded(base);
    float r[kWindow];
#pragma unroll
    for (int k = 0; k < kWindow; ++k) {
      const int kk = k << lo;
      r[k] = !kChecked || base + kk < cnt ? win[padded(kk)] : 0.0f;
    }
    butterflies<kLogWindow>(r, first, last);
    if (out) {
#pragma unroll
      for (int k = 0; k < kWindow; ++k) {
        const int kk = k << lo;
        if (!kChecked || base + kk < cnt) yt[base + kk] = Io<T>::from_float(r[k] * scale);
      }
    } else {
#pragma unroll
      for (int k = 0; k < kWindow; ++k) {
        const int kk = k << lo;
        if (!kChecked || base + kk < cnt) win[padded(kk)] = r[k];
      }
    }
  }
}

// The butterfly stages in_load .. log_p − 1 of every row of the tile, after the load pass left the
// tile in shared memory: each further group of up to 5 bits of b is one window pass. The window
// is pushed down to end at log_p when fewer than 5 bits remain, so that for 2^p ≥ 32 it stays
// inside b and never reaches past the tile. Windows partition the tile; a pair of butterfly
// partners differs only in bits below log_p, so both lie below cnt or neither does.
// last_to_output: the last pass writes yt (scaled, rounded to T) instead of shared memory.
// Ends with a barrier, so shared memory is ready for whatever comes next.
template <typename T>
__device__ __forceinline__ void sylvester_passes(float* smem, T* yt, int cnt, int log_p, int in_load,
                                                 bool last_to_output, float scale) {
  for (int s = in_load; s < log_p; s += kLogWindow) {
    const int w = log_p - s < kLogWindow ? log_p - s : kLogWindow;
    int lo = log_p - kLogWindow < s ? log_p - kLogWindow : s;
    lo = lo < 0 ? 0 : lo;
    const bool out = last_to_output && s + w == log_p;
    // Only a tile with a partial window (2^p < 32 and a row count that is not a multiple of
    // 32 / gcd(n, 32): the last tile) needs the bounds checks; the common path has none.
    if ((cnt & ((kWindow << lo) - 1)) == 0)
      window_pass<T, false>(smem, yt, cnt, lo, s - lo, s - lo + w, out, scale);
    else
      window_pass<T, true>(smem, yt, cnt, lo, s - lo, s - lo + w, out, scale);
    __syncthreads();  // the next pass, the H_m pass or the next tile's load reuse these words
  }
}

// Whole rows per tile, about kTileTarget elements. The count is a multiple of 32 / gcd(n, 32), so
// a full tile is a whole number of 32-element windows even when 2^p < 32 (only a partial last tile
// takes the checked pass), and every tile starts on a 16-byte boundary.
constexpr int tile_rows(int64_t n) {
  const int unit = 32 / std::gcd(int(n), 32);
  return n >= kTileTarget ? 1 : int(kTileTarget / n) / unit * unit;
}

// The rounding above never reaches zero, and n ≥ kTileTarget is always a multiple of 32.
constexpr bool tile_rows_valid() {
  for (int m : hm::kBases) {
    for (int64_t n = m; n <= hm::kMaxN; n *= 2)
      if (tile_rows(n) < 1 || (tile_rows(n) * n) % 32 != 0) return false;
  }
  return true;
}
static_assert(tile_rows_valid());

}  // namespace pvq_cuda::hadamard_tile
