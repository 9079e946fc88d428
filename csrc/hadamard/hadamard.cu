// CUDA kernel of hadamard_transform: y = H_n · diag(s) · x / sqrt(n) along rows of n = m · 2^p
// (index i = a·2^p + b; hadamard/hadamard_matrix.h has the matrices).
//
// Design (numbers for an H100 SXM: 3.35 TB/s, 132 SMs, ~1.75 GHz):
// - The op is memory bound: 3.35e12 / (132 · 1.75e9) = 14.5 bytes per clock per SM, and an fp16
//   element costs 4 bytes (2 read, 2 written), so each SM must finish 3.6 elements per clock (fp32:
//   1.8) to run at copy speed. The costs below are sized against that 3.6.
// - A block of 256 threads owns a tile of whole rows, kTileTarget = 8192 = 256 · 32 elements (one
//   row when n > 8192), staged in shared memory as fp32 (33 KB).
// - Load: thread t reads 16-byte vectors t, t + 256, … of the tile (fully coalesced), widens them to
//   fp32, applies the signs, and runs the first 3 (fp16/bf16: 8 per vector) or 2 (fp32: 4) butterfly
//   stages in registers, as a vector holds consecutive b.
// - Passes: each further group of up to 5 bits of b is one shared-memory pass: a thread reads a
//   window of 32 elements at stride 2^lo, runs the butterflies in registers and writes them back;
//   8192 = 256 · 32, so each thread has one window per pass. Why not warp shuffles: a SHFL and a
//   32-bit LDS or STS each issue at one warp instruction per clock per SM, but a shuffle moves one
//   bit of the transform and a store + load pair moves five: 5 instructions per element against 2.
//   n = 4096 (fp16): bits 0–2 in the load, 3–7 and 8–11 in two passes; the last pass writes to
//   global memory directly, so shared memory carries 4 + 8 + 4 = 16 bytes per element, 8 elements
//   per clock at 128 bytes per clock (2.2× the 3.6 needed); n = 16384 takes a third pass (24 bytes,
//   5.3 per clock). The FADDs are p per element (n = 16384: 128 lanes / 14 = 9 per clock). So for
//   n ≤ 16384 neither shared memory nor the FP32 pipe should be the first limit; latency is.
// - Occupancy and latency: a window keeps 32 values and their 32 addresses live (ptxas issues the
//   32 LDS back to back), 117–134 registers per thread unconstrained, so kMinBlocks = 2 caps them
//   at 128 (2 blocks, 16 warps per SM; m = 1 spills 20 bytes on sm_90a), while a cap of 3 blocks
//   spills 200+ bytes per thread. Latency is hidden by the size of each block's load burst
//   instead: 16 KB (fp16) or 32 KB (fp32) per tile, against the ~20 KB per SM that Little's law
//   asks for (3.35 TB/s × ~0.8 µs / 132). Prefetching the next tile during the passes is the
//   obvious next step if the two blocks leave gaps.
// - Bank conflicts: element i lives at smem[i + i/32]. One pad word per 32 makes every access here
//   conflict-free: the load's scatter (lane ℓ writes 8ℓ + e, bank 8(ℓ mod 4) + ℓ/4 + e + const;
//   fp32: 4(ℓ mod 8) + ℓ/8 + e + const), a window pass of stride 2^lo ≥ 32 (a warp touches 32
//   consecutive words of one padded row) and of stride 2^lo < 32 (the pad moves the lanes'
//   sub-rows apart: bank = ℓ + const). The H_m pass reads 32 consecutive b per warp when 2^p ≥ 32.
// - H_m: after the b passes a thread takes one column b of a row, holds its m values (≤ 60 floats)
//   in registers and writes the m outputs. The ±1 signs are compile-time constants (template
//   arguments folded from the constexpr construction), so each of the m·m terms is one FADD/FSUB
//   and no table is read at all. That is m adds per element: m = 12 costs 12 (about 10 elements per
//   clock), m = 60 costs 60 (2.1 per clock), so fp16 rows with m ≥ 36 are compute bound. The 2×2
//   block structure of Paley II would halve that; left for the tuning issue, as is fusing the last
//   b pass into the H_m pass.
// - Stores: the last pass and the H_m pass store scalars, but whenever the stride (2^lo, or 2^p in
//   the H_m pass) is ≥ 32 a warp's store covers 32 consecutive elements (64 or 128 bytes, whole
//   sectors); a smaller stride 2^lo stores runs of 2^lo elements that L2 merges into sectors.
// - Signs: one 4-byte L1-resident load per element (the n floats are shared by every row).
// - Rounding: each element is summed in fp32 in the CPU kernel's order (stages bit 0, 1, …, then
//   H_m over increasing a'), scaled by the same float 1/sqrt(n), and rounded once.
// - n = 32768: one row per block and 132 KB of shared memory, so one block (8 warps) per SM; this
//   size is latency bound and will miss the copy-speed target. n ≥ 12288 needs the > 48 KB opt-in.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <numeric>
#include <utility>

#include "common/launch.h"
#include "common/shared_memory.cuh"
#include "hadamard/hadamard_matrix.h"
#include "hadamard/launchers.h"

namespace pvq_cuda {
namespace {

namespace hm = pvq::hadamard;

constexpr int kThreads = 256;           // 8 warps
constexpr int kMinBlocks = 2;           // per SM: caps registers at 128 (see the design notes)
constexpr int kLogWindow = 5;           // bits of b per shared-memory pass
constexpr int kWindow = 1 << kLogWindow;
constexpr int kTileTarget = kThreads * kWindow;  // elements per tile: one window per thread and pass
constexpr size_t kDefaultSmem = 48 * 1024;       // above this a kernel must opt in

// Element i of a tile sits at smem[padded(i)]: one pad word per 32 (bank-conflict argument above).
__device__ __forceinline__ int padded(int i) { return i + (i >> 5); }

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

// Writes the M outputs of one column: dst[a · stride] = H_m[a] · t · scale, rounded to T.
template <typename T, int M, int... As>
__device__ __forceinline__ void hm_column(const float (&t)[M], float scale, T* dst, int stride,
                                          std::integer_sequence<int, As...>) {
  ((dst[As * stride] = Io<T>::from_float(hm_row<M, As>(t, std::make_integer_sequence<int, M>{}) * scale)), ...);
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

struct Params {
  const void* x;        // rows × n, contiguous, 16-byte aligned
  void* y;              // rows × n, contiguous, 16-byte aligned, not overlapping x
  const float* signs;   // n floats, or nullptr for all +1
  int64_t rows;
  int64_t tiles;        // ceil(rows / rows_per_tile)
  int n;
  int log_p;            // n = M << log_p
  int rows_per_tile;    // rows_per_tile · n is a multiple of 32: tiles start 16-byte aligned
  float scale;          // transform_scale(n)
};

template <typename T, int kM>
__global__ void __launch_bounds__(kThreads, kMinBlocks) hadamard_kernel(const Params prm) {
  float* const smem = dynamic_shared_memory<float>();
  constexpr int kLogVec = Io<T>::kLogVec;
  constexpr int kVec = 1 << kLogVec;
  const T* __restrict__ x = static_cast<const T*>(prm.x);
  T* __restrict__ y = static_cast<T*>(prm.y);
  const int n = prm.n;
  const int log_p = prm.log_p;
  const int in_load = log_p < kLogVec ? log_p : kLogVec;  // b bits finished inside a vector
  // n ≤ one vector's reach and no H_m: the load pass finishes the transform, no shared memory.
  const bool direct = kM == 1 && log_p <= kLogVec;

  for (int64_t tile = blockIdx.x; tile < prm.tiles; tile += gridDim.x) {
    const int64_t row0 = tile * prm.rows_per_tile;
    const int64_t rows_left = prm.rows - row0;
    const int rows_here = rows_left < prm.rows_per_tile ? int(rows_left) : prm.rows_per_tile;
    const int cnt = rows_here * n;  // elements in this tile, a multiple of n and so of 2^log_p
    const T* xt = x + row0 * n;
    T* yt = y + row0 * n;

    // 1. Load: vectors t, t + kThreads, …; the last vector of the last tile may be partial.
    const int nvec = (cnt + kVec - 1) >> kLogVec;
    for (int v = threadIdx.x; v < nvec; v += kThreads) {
      const int i0 = v << kLogVec;
      const bool full = i0 + kVec <= cnt;
      float r[kVec];
      if (full) {
        Io<T>::unpack(__ldg(reinterpret_cast<const uint4*>(xt + i0)), r);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) r[e] = i0 + e < cnt ? Io<T>::to_float(xt[i0 + e]) : 0.0f;
      }
      if (prm.signs != nullptr) {
        int col = i0 % n;  // a vector may cross a row end when n < 64
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          r[e] *= __ldg(prm.signs + col);
          col = col + 1 == n ? 0 : col + 1;
        }
      }
      // i0 is a multiple of kVec, so bits below kLogVec of i0 + e are those of e, and bits below
      // log_p are b: stages 0 .. in_load-1 pair elements of the same vector and the same chunk.
      butterflies<kLogVec>(r, 0, in_load);
      if (direct) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) r[e] *= prm.scale;
        if (full) {
          *reinterpret_cast<uint4*>(yt + i0) = Io<T>::pack(r);
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e)
            if (i0 + e < cnt) yt[i0 + e] = Io<T>::from_float(r[e]);
        }
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e)
          if (i0 + e < cnt) smem[padded(i0 + e)] = r[e];
      }
    }
    if (direct) continue;  // block-uniform, and shared memory was never touched
    __syncthreads();

    // 2. Passes over b bits [s, s + w), w ≤ 5, inside the 5-bit window [lo, lo + 5). The window
    // is pushed down to end at log_p when fewer than 5 bits remain, so that for 2^p ≥ 32 it stays
    // inside b and never reaches past the tile. Windows partition the tile; a pair of butterfly
    // partners differs only in bits below log_p, so both lie below cnt or neither does.
    for (int s = in_load; s < log_p; s += kLogWindow) {
      const int w = log_p - s < kLogWindow ? log_p - s : kLogWindow;
      int lo = log_p - kLogWindow < s ? log_p - kLogWindow : s;
      lo = lo < 0 ? 0 : lo;
      const bool out = kM == 1 && s + w == log_p;  // the last pass writes the output
      // Only a tile with a partial window (2^p < 32 and a row count that is not a multiple of
      // 32 / gcd(n, 32): the last tile) needs the bounds checks; the common path has none.
      if ((cnt & ((kWindow << lo) - 1)) == 0)
        window_pass<T, false>(smem, yt, cnt, lo, s - lo, s - lo + w, out, prm.scale);
      else
        window_pass<T, true>(smem, yt, cnt, lo, s - lo, s - lo + w, out, prm.scale);
      __syncthreads();  // the next pass, the H_m pass or the next tile's load reuse these words
    }

    // 3. H_m along a: thread c takes column b of row r of the tile, all m values in registers.
    if constexpr (kM > 1) {
      const int cols = rows_here << log_p;
      for (int c = threadIdx.x; c < cols; c += kThreads) {
        const int i0 = (c >> log_p) * n + (c & ((1 << log_p) - 1));
        float t[kM];
#pragma unroll
        for (int a = 0; a < kM; ++a) t[a] = smem[padded(i0 + (a << log_p))];
        hm_column<T, kM>(t, prm.scale, yt + i0, 1 << log_p, std::make_integer_sequence<int, kM>{});
      }
      __syncthreads();  // before the next tile's load overwrites shared memory
    }
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

struct Plan {
  int m = 0;
  int log_p = 0;
  int rows_per_tile = 0;
  size_t smem = 0;  // bytes, for the shared-memory path
};

Plan plan_for(int64_t n) {
  const hm::Split split = hm::split_size(n);
  Plan plan;
  if (split.m == 0) return plan;
  plan.m = split.m;
  plan.log_p = split.log_p;
  plan.rows_per_tile = tile_rows(n);
  const int64_t cap = int64_t(plan.rows_per_tile) * n;
  plan.smem = size_t(cap + (cap - 1) / 32) * sizeof(float);  // padded(cap - 1) + 1 words
  return plan;
}

template <typename T, int kM>
cudaError_t launch_typed(const Params& prm, bool use_smem, size_t smem, cudaStream_t stream) {
  const size_t bytes = use_smem ? smem : 0;
  if (bytes > kDefaultSmem) {
    const cudaError_t err =
        cudaFuncSetAttribute(hadamard_kernel<T, kM>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    if (err != cudaSuccess) return err;
  }
  const unsigned grid = unsigned(prm.tiles < INT_MAX ? prm.tiles : INT_MAX);  // the kernel strides over tiles
  return launch_kernel(hadamard_kernel<T, kM>, grid, kThreads, bytes, stream, prm);
}

template <typename T>
cudaError_t launch_dtype(const Params& prm, int m, size_t smem, cudaStream_t stream) {
  const bool use_smem = !(m == 1 && prm.log_p <= Io<T>::kLogVec);
  switch (m) {
    case 1: return launch_typed<T, 1>(prm, use_smem, smem, stream);
    case 12: return launch_typed<T, 12>(prm, use_smem, smem, stream);
    case 20: return launch_typed<T, 20>(prm, use_smem, smem, stream);
    case 28: return launch_typed<T, 28>(prm, use_smem, smem, stream);
    case 36: return launch_typed<T, 36>(prm, use_smem, smem, stream);
    case 52: return launch_typed<T, 52>(prm, use_smem, smem, stream);
    case 60: return launch_typed<T, 60>(prm, use_smem, smem, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

size_t hadamard_smem_bytes(int64_t n) { return plan_for(n).smem; }

cudaError_t launch_hadamard(const void* x, void* y, FloatKind kind, const float* signs, int64_t rows,
                            int64_t n, cudaStream_t stream) {
  const Plan plan = plan_for(n);
  if (plan.m == 0 || rows < 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  Params prm;
  prm.x = x;
  prm.y = y;
  prm.signs = signs;
  prm.rows = rows;
  prm.tiles = (rows + plan.rows_per_tile - 1) / plan.rows_per_tile;
  prm.n = int(n);
  prm.log_p = plan.log_p;
  prm.rows_per_tile = plan.rows_per_tile;
  prm.scale = hm::transform_scale(n);
  switch (kind) {
    case FloatKind::kFloat32: return launch_dtype<float>(prm, plan.m, plan.smem, stream);
    case FloatKind::kFloat16: return launch_dtype<__half>(prm, plan.m, plan.smem, stream);
    case FloatKind::kBFloat16: return launch_dtype<__nv_bfloat16>(prm, plan.m, plan.smem, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pvq_cuda
