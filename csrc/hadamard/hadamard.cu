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
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <utility>

#include "common/launch.h"
#include "common/shared_memory.cuh"
#include "hadamard/hadamard_matrix.h"
#include "hadamard/launchers.h"
#include "hadamard/tile_transform.cuh"

namespace pvq_cuda {
namespace {

using namespace hadamard_tile;  // the tile's building blocks (Io, load_vector, passes, hm_pass, tile_rows) and hm

constexpr int kMinBlocks = 2;           // per SM: caps registers at 128 (see the design notes)
constexpr size_t kDefaultSmem = 48 * 1024;       // above this a kernel must opt in

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
      float r[kVec];
      const bool full = load_vector<T>(xt, i0, cnt, n, prm.signs, in_load, r);
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

    // 2. Passes over the b bits the load left (tile_transform.cuh); with no H_m the last one writes
    // the output.
    sylvester_passes<T>(smem, yt, cnt, log_p, in_load, kM == 1, prm.scale);

    // 3. H_m along a: thread c takes column b of row r of the tile, all m values in registers.
    if constexpr (kM > 1) {
      hm_pass<kM>(smem, rows_here, n, log_p,
                  [&](int i, float v) { yt[i] = Io<T>::from_float(v * prm.scale); });
      __syncthreads();  // before the next tile's load overwrites shared memory
    }
  }
}

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
  plan.smem = size_t(tile_words(cap)) * sizeof(float);
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
