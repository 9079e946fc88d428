// CUDA kernels of pvq_matmul_grad_input, grad_x = (grad Ŵ') R:
// - grad_gemv_kernel: the fused small-batch product z = grad Ŵ' (rows in the weights' rotated
//   basis), Ŵ' decoded in registers and never written anywhere (batches up to
//   grad_gemv_max_batch(D); larger ones use dequantized tiles and cuBLAS, packed/tiled_matmul.cpp);
// - split_sum_kernel: the sum of its per-split partials;
// - signed_cast_kernel: the return to the input basis and dtype after the Hadamard kernel.
//
// The fused product, transposed from the forward's GEMV (gemv.cu). Lane l of a warp still owns row
// 32t + l of tile t and decodes that row's group j from the chunk of column j (one coalesced read
// of B words), but now every lane contributes to the same D outputs z[m, jD : jD+D]: a warp owns
// one column j and walks a range of tiles, each lane accumulating acc[m][d] += grad[m, row] ·
// w[row, jD + d] for its own rows only (grad[m, 32t : 32t+32] is one coalesced load per m). Only
// after its last tile does the warp sum acc over its 32 lanes, M·D butterfly reductions of 5
// shuffles, so the reduction is amortised over the tiles of the range (at least 4 once the tiles
// are split; a layer of fewer tiles is one range). A 4096-column layer
// at D=16 has 256 columns only, so the tiles are cut into S ranges (S from the resident warps,
// as the GEMV cuts its columns); each (range, column) writes one fp32 partial and split_sum_kernel
// adds the S partials in a fixed order: deterministic, unlike atomics. The accumulators are M·D
// floats a lane, so the batch bound falls with D (128 floats at most: 8 rows up to D=16, 4 at D=32).
#include <algorithm>
#include <type_traits>

#include "common/dispatch.h"
#include "common/float_io.cuh"
#include "common/grid.cuh"
#include "common/launch.h"
#include "common/shared_memory.cuh"
#include "packed/launchers.h"

namespace pvq_cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kGemvThreads = kWarps * 32;
constexpr int kThreads = 256;                                  // the two elementwise kernels
constexpr int kMinTilesPerItem = 4;                            // amortises the closing reduction
constexpr double kMinLeafBytes = 4096, kMaxLeafBytes = 40960;  // the leaf prefix budget's range (gemv.cu)

template <int D, int MAXM, typename T>
__global__ void __launch_bounds__(kGemvThreads) grad_gemv_kernel(pvq::SplitTables t, pvq::PackedLayer p,
                                                                 const T* __restrict__ g, int M,
                                                                 float* __restrict__ partial, int splits,
                                                                 int smem_leaf_k) {
  stage_leaf_table(t, dynamic_shared_memory<uint32_t>(), smem_leaf_k);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t cols = p.groups * D;
  const int64_t tiles = (p.rows + pvq::kTileRows - 1) / pvq::kTileRows;
  const int64_t per_split = (tiles + splits - 1) / splits;
  const int64_t items = int64_t(splits) * p.groups;
  // Consecutive warps take consecutive columns of one tile range: their chunks are neighbours.
  for (int64_t item = int64_t(blockIdx.x) * kWarps + warp; item < items; item += int64_t(gridDim.x) * kWarps) {
    const int64_t j = item % p.groups;
    const int split = int(item / p.groups);
    const int64_t t_end = tiles < (split + 1) * per_split ? tiles : (split + 1) * per_split;
    float acc[MAXM][D];
#pragma unroll
    for (int m = 0; m < MAXM; ++m)
#pragma unroll
      for (int d = 0; d < D; ++d) acc[m][d] = 0.f;
    for (int64_t tile = split * per_split; tile < t_end; ++tile) {
      const int64_t row = tile * pvq::kTileRows + lane;
      if (row >= p.rows) continue;  // the last tile's missing rows add nothing
      const uint32_t* chunk = p.words + (tile * p.groups + j) * p.bits;
      int8_t y[D];
      const float scale = pvq::decode_group<D>(t, p, pvq::chunk_code(chunk, lane, p.bits), y);
      float w[D];
#pragma unroll
      for (int d = 0; d < D; ++d) w[d] = scale * float(y[d]);
      const float row_scale = pvq::half_bits_to_float(p.row_scale[row]);
#pragma unroll
      for (int m = 0; m < MAXM; ++m) {
        if (m < M) {
          // The row scale on grad's side, as the CPU kernel applies it (its exact adjoint of the forward).
          const float gm = to_float(g[m * p.rows + row]) * row_scale;
#pragma unroll
          for (int d = 0; d < D; ++d) acc[m][d] = fmaf(gm, w[d], acc[m][d]);
        }
      }
    }
    // Every lane of the warp is here (item is warp-uniform): sum each accumulator over the lanes.
#pragma unroll
    for (int m = 0; m < MAXM; ++m) {
      if (m < M) {
#pragma unroll
        for (int d = 0; d < D; ++d)
#pragma unroll
          for (int offset = 16; offset > 0; offset >>= 1)
            acc[m][d] += __shfl_xor_sync(0xffffffffu, acc[m][d], offset);
        if (lane == 0) {
          float* dst = partial + (int64_t(split) * M + m) * cols + j * D;
#pragma unroll
          for (int d = 0; d < D; ++d) dst[d] = acc[m][d];
        }
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads) split_sum_kernel(const float* __restrict__ partial, int splits,
                                                              int64_t total, float* __restrict__ z) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int s = 0; s < splits; ++s) v += partial[s * total + e];
    z[e] = v;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) signed_cast_kernel(const float* __restrict__ z,
                                                                const float* __restrict__ signs, int64_t rows,
                                                                int64_t cols, T* __restrict__ out) {
  const int64_t total = rows * cols;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const float v = z[e];
    out[e] = from_float<T>(signs != nullptr ? signs[e % cols] * v : v);
  }
}

// The rows of grad a kernel instance handles: 1, up to 4, or up to 8 (acc[] is sized by it).
int batch_bound(int64_t M) { return M <= 1 ? 1 : (M <= 4 ? 4 : 8); }

// Calls f(kernel, (T*)nullptr) with the instance for (D, grad's type T, batch bound); instances
// whose accumulators would pass 128 floats a lane (D=32 with 8 rows) do not exist.
template <typename F>
cudaError_t with_grad_gemv_kernel(int D, FloatKind kind, int maxm, F&& f) {
  return dispatch_float_kind(kind, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return pvq::dispatch_group_size(D, [&](auto Dc) -> cudaError_t {
      constexpr int N = decltype(Dc)::value;
      if (maxm == 1) return f(grad_gemv_kernel<N, 1, T>, type);
      if (maxm == 4) return f(grad_gemv_kernel<N, 4, T>, type);
      if constexpr (N * 8 <= 128) return f(grad_gemv_kernel<N, 8, T>, type);
      return cudaErrorInvalidValue;
    });
  });
}

}  // namespace

int grad_gemv_max_batch(int D) { return D >= 32 ? 4 : 8; }

cudaError_t plan_grad_gemv(const pvq::PackedLayer& layer, int D, FloatKind kind, int64_t M, GradGemvPlan* plan) {
  if (M < 1 || M > grad_gemv_max_batch(D)) return cudaErrorInvalidValue;
  GradGemvPlan p;
  p.maxm = batch_bound(M);
  int sms = 0, per_sm = 0;
  cudaError_t err = current_sm_count(&sms);
  if (err != cudaSuccess) return err;
  // Resident blocks at the largest leaf prefix the budget can pick (a smaller one only lets more in).
  const size_t largest_smem = leaf_prefix_bytes(leaf_prefix_k(D, layer.K, size_t(kMaxLeafBytes)));
  err = with_grad_gemv_kernel(D, kind, p.maxm, [&](auto kernel, auto*) {
    return resident_blocks_per_sm(kernel, kGemvThreads, largest_smem, &per_sm);
  });
  if (err != cudaSuccess) return err;
  const int64_t resident_warps = int64_t(sms) * per_sm * kWarps;
  const int64_t tiles = (layer.rows + pvq::kTileRows - 1) / pvq::kTileRows;
  const int64_t want = (resident_warps + layer.groups - 1) / layer.groups;
  const int64_t most = std::max<int64_t>(1, tiles / kMinTilesPerItem);
  p.splits = int(std::clamp<int64_t>(want, 1, most));
  const int64_t items = int64_t(p.splits) * layer.groups;
  p.blocks = int(std::min<int64_t>((items + kWarps - 1) / kWarps, int64_t(sms) * per_sm));
  // Leaf prefix budget: every block refills it, so keep the refill under 1/4 of the layer's bytes.
  const double weight_bytes = double(tiles) * double(layer.groups) * layer.bits * 4.0;
  const size_t budget = size_t(std::clamp(weight_bytes / (4.0 * p.blocks), kMinLeafBytes, kMaxLeafBytes));
  p.smem_leaf_k = leaf_prefix_k(D, layer.K, budget);
  p.smem = leaf_prefix_bytes(p.smem_leaf_k);
  if (p.splits > 1) {
    err = persistent_grid(split_sum_kernel, M * layer.groups * D, kThreads, 0, &p.sum_blocks);
    if (err != cudaSuccess) return err;
    p.workspace_floats = int64_t(p.splits) * M * layer.groups * D;
  }
  *plan = p;
  return cudaSuccess;
}

cudaError_t launch_grad_gemv(const pvq::SplitTables& tables, const pvq::PackedLayer& layer, int D, const void* grad,
                             FloatKind kind, int64_t M, float* z, float* workspace, const GradGemvPlan& plan,
                             cudaStream_t stream) {
  if (M <= 0) return cudaSuccess;
  if (M > plan.maxm) return cudaErrorInvalidValue;  // a plan made for a smaller batch
  float* partial = plan.splits > 1 ? workspace : z;
  cudaError_t err = with_grad_gemv_kernel(D, kind, plan.maxm, [&](auto kernel, auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return launch_kernel(kernel, plan.blocks, kGemvThreads, plan.smem, stream, tables, layer,
                         static_cast<const T*>(grad), int(M), partial, plan.splits, plan.smem_leaf_k);
  });
  if (err != cudaSuccess || plan.splits == 1) return err;
  return launch_kernel(split_sum_kernel, plan.sum_blocks, kThreads, 0, stream, static_cast<const float*>(workspace),
                       plan.splits, M * layer.groups * D, z);
}

cudaError_t launch_signed_cast(const float* z, const float* signs, int64_t rows, int64_t cols, void* out,
                               FloatKind out_kind, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  return dispatch_float_kind(out_kind, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    int blocks = 0;
    const cudaError_t err = persistent_grid(signed_cast_kernel<T>, rows * cols, kThreads, 0, &blocks);
    if (err != cudaSuccess) return err;
    return launch_kernel(signed_cast_kernel<T>, blocks, kThreads, 0, stream, z, signs, rows, cols,
                         static_cast<T*>(out));
  });
}

}  // namespace pvq_cuda
