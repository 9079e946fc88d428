// CUDA kernel of encode_activations: each token is rotated, searched, indexed and gain-coded in one
// kernel, its activations never leaving shared memory in between. Every step is the CPU kernel's
// (activation/activation_code.h defines them), so the codes agree bit for bit.
//
// Design:
// - A block of 256 threads owns a tile of whole tokens, about 8192 elements (hadamard_tile's
//   tile_rows, so one token when n >= 8192), and loops over tiles (a persistent grid).
// - Rotate: the Hadamard kernel's own device code (hadamard/tile_transform.cuh): vector loads with
//   the signs and the first butterflies in registers, window passes in shared memory, the H_m pass
//   written back in place. The rotated tile stays in shared memory as fp32 (33 KB), unscaled; each
//   group multiplies its elements by 1/sqrt(n) as it reads them, the same float product the CPU's
//   rotate_row rounds.
// - Code: one thread per group of D (grid-stride over the tile's groups): the codec's search and
//   encode (codec/pyramid.h) and the least-squares gain (code_group). Pulses and indices go to
//   global memory; each group's gain (float) and energy (double) stay in shared memory.
// - Token sums: the token norm and the scale's two least-squares sums are tree_sum's fixed pairwise
//   tree, one level per barrier, over a shared double array of the tile's groups (reused for all
//   three sums), so they round exactly as the CPU's serial tree_sum.
// - Shared memory per tile: 33 KB of rotated activations + 12 bytes per group (D = 8: 12 KB;
//   D = 2: 49 KB) + 16 bytes per token. Small D at large n does not fit (D <= 4 at n = 32768 fits
//   no GPU; README lists the limits): the glue checks it and names the CPU path.
// - Registers (ptxas -v, sm_90a): uncapped, every instance takes 255 registers, so one block (8
//   warps) per SM; kMinBlocks = 2 caps them at 128, as for the Hadamard kernel, at the price of a
//   few spills: 12-16 bytes in the H_m pass, 4/52 bytes (stores/loads) at D = 16 and 140/376 bytes
//   in code_groups<32>; beyond the H_m pass's, none at the presets' D = 8 and 2. The search's
//   per-group arrays live in local memory either way (a stack frame of 96-608 bytes), as in
//   codec/search.cu.
// - Cost: search dominates (a few hundred to ~16k instructions per group, codec/search.cu); the
//   rotation is the Hadamard kernel's, designed to run near copy speed (hadamard.cu; not measured
//   yet). Nothing here is tuned: no GPU has run it, so the first GPU session should read
//   bench/bench_codec.py's tokens/s.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "activation/activation_code.h"
#include "activation/launchers.h"
#include "codec/pyramid.h"
#include "common/device_code.h"
#include "common/dispatch.h"
#include "common/float_io.cuh"
#include "common/grid.cuh"
#include "common/launch.h"
#include "common/shared_memory.cuh"
#include "hadamard/hadamard_matrix.h"
#include "hadamard/tile_transform.cuh"

namespace pvq_cuda {
namespace {

namespace ht = hadamard_tile;

constexpr int kThreads = ht::kThreads;  // the tile passes assume this block size
constexpr int kMinBlocks = 2;  // per SM: caps registers at 128 (the design notes above)
constexpr size_t kDefaultSmem = 48 * 1024;  // above this a kernel must opt in
constexpr int kMaxLevels = 256;             // 2^gain_bits, gain_bits <= 8

struct Params {
  const void* x;         // tokens × n, contiguous, 16-byte aligned
  const float* signs;    // n floats, or nullptr for all +1
  const float* levels;   // level_count gain levels, increasing
  ActivationCodes out;
  int64_t tokens;
  int64_t tiles;         // ceil(tokens / rows_per_tile)
  int n;
  int m;                 // n = m << log_p
  int log_p;
  int rows_per_tile;
  int K;
  int level_count;
  float scale;           // transform_scale(n)
};

// Where each array of a block's dynamic shared memory starts (bytes), for a tile of
// rows_per_tile tokens: doubles first (8-byte alignment), then floats and ints.
struct Layout {
  size_t energy;    // double [groups]: group energies, then the scale's two sums' terms
  size_t row_num;   // double [rows]: the scale's numerator per token
  size_t gains;     // float [groups]: least-squares gain, then the chosen level
  size_t row_norm;  // float [rows]: |x'| per token
  size_t row_flag;  // int [rows]: TokenFlag bits
  size_t tile;      // float [tile_words]: the rotated tile
  size_t bytes;
};

__host__ __device__ inline Layout layout_for(int n, int D, int rows) {
  const size_t groups = size_t(rows) * (n / D);
  Layout l;
  l.energy = 0;
  l.row_num = l.energy + groups * sizeof(double);
  l.gains = l.row_num + size_t(rows) * sizeof(double);
  l.row_norm = l.gains + groups * sizeof(float);
  l.row_flag = l.row_norm + size_t(rows) * sizeof(float);
  l.tile = l.row_flag + size_t(rows) * sizeof(int);
  l.bytes = l.tile + size_t(ht::tile_words(int64_t(rows) * n)) * sizeof(float);
  return l;
}

// tree_sum (activation_code.h) of each of `rows` consecutive runs of G doubles, all in parallel:
// the same pairs added at the same strides, one level per barrier. The sums end in v[r * G].
// Ends with a barrier when there is at least one level; callers put one before it.
__device__ __forceinline__ void tree_sums(double* v, int rows, int G) {
  for (int stride = 1; stride < G; stride <<= 1) {
    const int pairs = (G - stride + 2 * stride - 1) / (2 * stride);  // i = 2·stride·q with i + stride < G
    for (int item = threadIdx.x; item < rows * pairs; item += kThreads) {
      const int r = item / pairs;
      const int i = (item - r * pairs) * 2 * stride;
      double* run = v + int64_t(r) * G;
      run[i] = pvq::act::dadd_rn(run[i], run[i + stride]);
    }
    __syncthreads();
  }
}

// H_m of every column of the tile, written back in place (unscaled); each case is hadamard_tile's
// pass. Not inlined, and m a run-time value: the six unrolled H_m bodies (up to 3600 adds each)
// are compiled once and shared by all 18 kernel instances (dtype x D) instead of once per
// instance, which keeps ptxas's time for this file near the Hadamard kernel's. It runs once per
// tile, so the call costs nothing measurable.
__device__ PVQ_NOINLINE void hm_in_place(float* tile, int m, int rows_here, int n, int log_p) {
  const auto back = [&](int i, float v) { tile[ht::padded(i)] = v; };
  switch (m) {
    case 12: ht::hm_pass<12>(tile, rows_here, n, log_p, back); break;
    case 20: ht::hm_pass<20>(tile, rows_here, n, log_p, back); break;
    case 28: ht::hm_pass<28>(tile, rows_here, n, log_p, back); break;
    case 36: ht::hm_pass<36>(tile, rows_here, n, log_p, back); break;
    case 52: ht::hm_pass<52>(tile, rows_here, n, log_p, back); break;
    case 60: ht::hm_pass<60>(tile, rows_here, n, log_p, back); break;
    default: break;  // m = 1: no H_m factor
  }
}

// Step 2 of the kernel for one tile: each thread codes groups g = threadIdx.x + k·kThreads of the
// rotated tile (D floats each, times the transform's scale) with the codec's search and encode and
// the least-squares gain (activation_code.h's code_group); pulses and indices go out, gain and energy
// stay in shared memory, and a group holding NaN/Inf flags its token. Not inlined, and templated on
// D only, so the search is compiled once per D rather than once per dtype as well.
template <int D>
__device__ PVQ_NOINLINE void code_groups(const pvq::SplitTables& tables, const float* tile, float scale, int K,
                                         int groups, int G, int8_t* pulses, int64_t* index, float* gains,
                                         double* energy, int* row_flag) {
  for (int g = threadIdx.x; g < groups; g += kThreads) {
    const int i0 = g * D;
    float v[D];
#pragma unroll
    for (int d = 0; d < D; ++d) v[d] = pvq::act::mul_rn(tile[ht::padded(i0 + d)], scale);
    int8_t y[D];
    uint64_t idx = 0;
    float gain = 0.0f;
    double e = 0.0;
    const bool finite = pvq::act::code_group<D>(tables, v, K, y, &idx, &gain, &e);
    store_group<D>(pulses + i0, y);
    index[g] = int64_t(idx);
    gains[g] = gain;
    energy[g] = e;
    if (!finite) atomicOr(&row_flag[g / G], int(kTokenNonFinite));
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    encode_activations_kernel(const Params p, const pvq::SplitTables tables) {
  __shared__ float levels[kMaxLevels];  // encode_activations_static_smem_bytes() counts these two
  __shared__ float mid[kMaxLevels];
  unsigned char* const smem = dynamic_shared_memory<unsigned char>();
  const Layout lay = layout_for(p.n, D, p.rows_per_tile);
  double* const energy = reinterpret_cast<double*>(smem + lay.energy);
  double* const row_num = reinterpret_cast<double*>(smem + lay.row_num);
  float* const gains = reinterpret_cast<float*>(smem + lay.gains);
  float* const row_norm = reinterpret_cast<float*>(smem + lay.row_norm);
  int* const row_flag = reinterpret_cast<int*>(smem + lay.row_flag);
  float* const tile = reinterpret_cast<float*>(smem + lay.tile);

  constexpr int kLogVec = ht::Io<T>::kLogVec;
  constexpr int kVec = 1 << kLogVec;
  const int n = p.n, G = n / D, log_p = p.log_p;
  const int in_load = log_p < kLogVec ? log_p : kLogVec;  // b bits finished inside a vector
  const T* __restrict__ x = static_cast<const T*>(p.x);

  for (int k = threadIdx.x; k < p.level_count; k += kThreads) levels[k] = __ldg(p.levels + k);
  __syncthreads();
  if (threadIdx.x == 0) pvq::act::midpoints(levels, p.level_count, mid);  // read after the tile's barriers

  for (int64_t t = blockIdx.x; t < p.tiles; t += gridDim.x) {
    const int64_t row0 = t * p.rows_per_tile;
    const int64_t rows_left = p.tokens - row0;
    const int rows_here = rows_left < p.rows_per_tile ? int(rows_left) : p.rows_per_tile;
    const int cnt = rows_here * n;
    const int groups = rows_here * G;
    const T* xt = x + row0 * n;

    // 1. Rotate the tile into shared memory (hadamard_tile: the Hadamard kernel's passes).
    for (int r = threadIdx.x; r < rows_here; r += kThreads) row_flag[r] = 0;
    const int nvec = (cnt + kVec - 1) >> kLogVec;
    for (int v = threadIdx.x; v < nvec; v += kThreads) {
      const int i0 = v << kLogVec;
      float r[kVec];
      ht::load_vector<T>(xt, i0, cnt, n, p.signs, in_load, r);
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        if (i0 + e < cnt) tile[ht::padded(i0 + e)] = r[e];
    }
    __syncthreads();
    ht::sylvester_passes<T>(tile, static_cast<T*>(nullptr), cnt, log_p, in_load, false, 0.0f);
    if (p.m > 1) {
      hm_in_place(tile, p.m, rows_here, n, log_p);
      __syncthreads();
    }

    // 2. Code each group: pulses and index out, gain and energy kept.
    code_groups<D>(tables, tile, p.scale, p.K, groups, G, p.out.pulses + row0 * n, p.out.index + row0 * G, gains,
                   energy, row_flag);
    __syncthreads();

    // 3. Token norms, then each group's gain code and the scale numerator's terms.
    tree_sums(energy, rows_here, G);
    for (int r = threadIdx.x; r < rows_here; r += kThreads) row_norm[r] = float(sqrt(energy[int64_t(r) * G]));
    __syncthreads();
    for (int g = threadIdx.x; g < groups; g += kThreads) {
      const int r = g / G;
      const bool bad = row_flag[r] != 0;
      const int c = bad ? 0 : pvq::act::gain_code(gains[g], row_norm[r], mid, p.level_count);
      p.out.gain[row0 * G + g] = uint8_t(c);
      energy[g] = pvq::act::dmul_rn(double(levels[c]), double(gains[g]));
      gains[g] = levels[c];
      if (bad) {  // a token with NaN/Inf codes to zeros, as on the CPU (this thread wrote this group)
        const int8_t zeros[D] = {};
        store_group<D>(p.out.pulses + row0 * n + g * D, zeros);
        p.out.index[row0 * G + g] = 0;
      }
    }
    __syncthreads();
    tree_sums(energy, rows_here, G);
    for (int r = threadIdx.x; r < rows_here; r += kThreads) row_num[r] = energy[int64_t(r) * G];
    __syncthreads();

    // 4. The scale's denominator, then the per-token scale.
    for (int g = threadIdx.x; g < groups; g += kThreads)
      energy[g] = pvq::act::dmul_rn(double(gains[g]), double(gains[g]));
    __syncthreads();
    tree_sums(energy, rows_here, G);
    for (int r = threadIdx.x; r < rows_here; r += kThreads) {
      const int64_t token = row0 + r;
      if (row_flag[r] != 0) {
        p.out.scale[token] = 0;
        p.out.flags[token] = kTokenNonFinite;
        continue;
      }
      const uint16_t h = pvq::act::token_scale_bits(row_num[r], energy[int64_t(r) * G]);
      p.out.scale[token] = h;
      p.out.flags[token] = (h & 0x7c00u) == 0x7c00u ? kTokenScaleOverflow : 0;
    }
    __syncthreads();  // the next tile's flags, load and sums reuse shared memory
  }
}

template <typename T, int D>
cudaError_t launch_typed(const pvq::SplitTables& tables, const Params& p, size_t smem, cudaStream_t stream) {
  const auto kernel = encode_activations_kernel<T, D>;
  if (smem > kDefaultSmem) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  int blocks = 0;
  const cudaError_t err = persistent_grid(kernel, p.tiles * kThreads, kThreads, smem, &blocks);
  if (err != cudaSuccess) return err;
  return launch_kernel(kernel, blocks, kThreads, smem, stream, p, tables);
}

}  // namespace

size_t encode_activations_smem_bytes(int64_t n, int D) {
  return layout_for(int(n), D, ht::tile_rows(n)).bytes;
}

size_t encode_activations_static_smem_bytes() { return 2 * kMaxLevels * sizeof(float); }

cudaError_t launch_encode_activations(const pvq::SplitTables& tables, const void* x, FloatKind kind,
                                      const float* signs, const float* levels, int level_count, int64_t tokens,
                                      int64_t n, int D, int K, const ActivationCodes& out, cudaStream_t stream) {
  const pvq::hadamard::Split split = pvq::hadamard::split_size(n);
  if (split.m == 0 || tokens < 0 || D < 1 || n % D != 0 || level_count < 1 || level_count > kMaxLevels)
    return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  Params p;
  p.x = x;
  p.signs = signs;
  p.levels = levels;
  p.out = out;
  p.tokens = tokens;
  p.n = int(n);
  p.m = split.m;
  p.log_p = split.log_p;
  p.rows_per_tile = ht::tile_rows(n);
  p.tiles = (tokens + p.rows_per_tile - 1) / p.rows_per_tile;
  p.K = K;
  p.level_count = level_count;
  p.scale = pvq::hadamard::transform_scale(n);
  const size_t smem = encode_activations_smem_bytes(n, D);
  return dispatch_float_kind(kind, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return pvq::dispatch_group_size(D, [&](auto Dc) {
      return launch_typed<T, decltype(Dc)::value>(tables, p, smem, stream);
    });
  });
}

}  // namespace pvq_cuda
