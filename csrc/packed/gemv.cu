// Fused decode + matmul for small batches (M <= 16): out = x W'^T, with W' never written anywhere.
//
// Design (numbers for the default pvq-3.25: D=16, K=30, B=52 bits a group; pvq8-3.25, D=8, K=16,
// has B=26; layout in packed/packed_layer.h):
// - Lane l of a warp owns row 32t + l of tile t and walks group columns j. The chunk of column j
//   is one coalesced read of B words (208 B at B=52), and every lane needs the same D activations,
//   so no lane ever exchanges data with another until the end and there is no reduction inside the
//   loop. The block converts the activations of a window of group columns to fp32 in shared memory
//   once (coalesced), and lanes read them back as 16-byte broadcasts: at batch 16 this replaced 16
//   conversions a weight per lane (bench/results/kernel-budget-2026-12-02.md).
// - Decoder, two of them (the template's STAGED flag; plan_gemv picks):
//   * staged (K <= kStagedMaxK, every preset): packed/staged_decode.cuh. The block stages the
//     layer's per-K records in shared memory (29.5 KB at D=16, K=30); per group the 16-, 8- and
//     4-nodes each take a guide bucket, a short compare walk and one multiply-high division, and the
//     eight 2-leaves are one 8-byte read each of a float pair table. No data-dependent branch but
//     the walks (a warp issues a walk step when any lane needs it).
//   * tables (any K): codec/pyramid.h's decode_node on the global tables, 4-leaves from a
//     shared-memory prefix of small k, larger leaves split 4 -> 2+2 (both paths in most warps).
//   Instructions per weight of each, from the SASS: bench/results/kernel-budget-*.md.
// - Per group: D pulses as floats, one dot product with the activations per batch row, then one
//   multiply by the group's scale (level[gain] / |y|) into the row's accumulator.
// - Parallelism: a 4096-row layer has only 128 tiles, so columns are split S ways. S minimises the
//   rounds of work items a resident block runs, per split (each warp keeping >= 4 chunks), and the
//   grid is sized so that every block runs the same number of work items: no tail round.
//   Warps of a block share a tile and a split, interleaving columns; they reduce through shared
//   memory and write one fp32 partial per (split, batch row, row). A second tiny kernel sums the S
//   partials, applies the row scale and bias and casts: deterministic, unlike atomics.
// - Shared memory is filled by every resident block, so its size counts against the weight traffic:
//   the staged records load 14.7 KB a block from L2 at pvq-3.25 (the other 15.1 KB, the pair table, the
//   block computes), about 0.6x a 4096x4096 layer's code bytes over 2 blocks on each of 132 SMs
//   (bench/kernel_budget.py reports it); 16 warps a block halve that against 8;
//   the tables decoder's leaf prefix is capped at 1/4 of the layer's bytes over all blocks (4-40 KB).
#include <algorithm>
#include <type_traits>

#include "common/dispatch.h"
#include "common/float_io.cuh"
#include "common/grid.cuh"
#include "common/launch.h"
#include "common/shared_memory.cuh"
#include "packed/launchers.h"
#include "packed/staged_decode.cuh"

namespace pvq_cuda {
namespace {

constexpr int kWarps = 16;
constexpr int kThreads = kWarps * 32;
constexpr int kFinalizeThreads = 256;
constexpr double kMinLeafBytes = 4096, kMaxLeafBytes = 40960;  // the leaf prefix budget's range

// Group columns a warp decodes between two activation stagings: enough that the window of every
// batch bound holds 8-16 KB of fp32 activations at D=16 (kWarps x rounds x D x MAXM floats).
__host__ __device__ constexpr int window_rounds(int maxm) { return maxm >= 16 ? 1 : 8 / maxm; }

// Shared memory the kernel needs past its decoder's tables: cross-warp sums, then the activation window.
constexpr size_t gemv_work_bytes(int D, int maxm) {
  return (size_t(kWarps) * maxm * 32 + size_t(kWarps) * window_rounds(maxm) * D * maxm) * sizeof(float);
}

// Where the cross-warp sums start past a leaf prefix of k: 16-byte aligned, as the float4 reads of the
// activation window after them need.
inline size_t leaf_prefix_end(int k) { return (leaf_prefix_bytes(k) + 15) / 16 * 16; }

template <int D, int MAXM, typename T, bool STAGED>
__global__ void __launch_bounds__(kThreads) gemv_kernel(pvq::SplitTables t, pvq::PackedLayer p, StagedLayout s,
                                                        int smem_leaf_k, const T* __restrict__ x, int M,
                                                        float* __restrict__ partial, int splits) {
  constexpr int kWindow = kWarps * window_rounds(MAXM);  // group columns per activation window
  unsigned char* const smem = dynamic_shared_memory<unsigned char>();
  float* red;
  if constexpr (STAGED) {
    red = reinterpret_cast<float*>(smem + s.bytes);
    stage_records<D>(t, s, smem);
  } else {
    red = reinterpret_cast<float*>(smem) + (smem_leaf_k >= 0 ? (t.leaf_base[smem_leaf_k + 1] + 3) / 4 * 4 : 0);
    stage_leaf_table(t, reinterpret_cast<uint32_t*>(smem), smem_leaf_k);
  }
  float* const window = red + kWarps * MAXM * 32;  // [MAXM][kWindow * D] fp32 activations
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t cols = p.groups * D;
  const int64_t per_split = (p.groups + splits - 1) / splits;
  const int64_t items = (p.rows + pvq::kTileRows - 1) / pvq::kTileRows * splits;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t tile = item / splits;
    const int split = int(item % splits);
    const int64_t j_end = p.groups < (split + 1) * per_split ? p.groups : (split + 1) * per_split;
    const int64_t row = tile * pvq::kTileRows + lane;
    float acc[MAXM];
#pragma unroll
    for (int m = 0; m < MAXM; ++m) acc[m] = 0.f;
    for (int64_t j0 = split * per_split; j0 < j_end; j0 += kWindow) {
      // The window's activations, converted once for the block (coalesced), instead of every lane
      // loading and converting the same D values for every group.
      const int width = int(j_end - j0 < kWindow ? j_end - j0 : kWindow) * D;
      __syncthreads();  // the previous window (or the tables' fill) is done with
      for (int e = threadIdx.x; e < M * kWindow * D; e += kThreads) {
        const int m = e / (kWindow * D), c = e - m * (kWindow * D);
        window[e] = c < width ? to_float(x[m * cols + j0 * D + c]) : 0.f;
      }
      __syncthreads();
      if (row < p.rows) {
        for (int w = warp; w * D < width; w += kWarps) {
          const int64_t j = j0 + w;
          const uint64_t code = pvq::chunk_code(p.words + (tile * p.groups + j) * p.bits, lane, p.bits);
          float y[D], scale;
          if constexpr (STAGED) {
            scale = staged_decode_group<D>(smem, s, t, p, code, y);
          } else {
            int8_t q[D];
            scale = pvq::decode_group<D>(t, p, code, q);
#pragma unroll
            for (int d = 0; d < D; ++d) y[d] = float(q[d]);
          }
#pragma unroll
          for (int m = 0; m < MAXM; ++m) {
            if (m < M) {
              // A broadcast read (every lane the same address), 16-byte aligned: the window starts on 16 bytes.
              float a[D];
              const float* src = window + m * (kWindow * D) + w * D;
              if constexpr (D % 4 == 0) {
#pragma unroll
                for (int q = 0; q < D / 4; ++q) {
                  const float4 v = reinterpret_cast<const float4*>(src)[q];
                  a[4 * q] = v.x;
                  a[4 * q + 1] = v.y;
                  a[4 * q + 2] = v.z;
                  a[4 * q + 3] = v.w;
                }
              } else {
#pragma unroll
                for (int d = 0; d < D; ++d) a[d] = src[d];
              }
              float dot = 0.f;
#pragma unroll
              for (int d = 0; d < D; ++d) dot = fmaf(y[d], a[d], dot);
              acc[m] = fmaf(scale, dot, acc[m]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int m = 0; m < MAXM; ++m) red[(warp * MAXM + m) * 32 + lane] = acc[m];
    __syncthreads();
    if (warp == 0 && row < p.rows) {
      for (int m = 0; m < M; ++m) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) v += red[(w * MAXM + m) * 32 + lane];
        partial[(int64_t(split) * M + m) * p.rows + row] = v;
      }
    }
    __syncthreads();  // red is reused by the next item
  }
}

template <typename T, typename B>
__global__ void finalize_kernel(const float* __restrict__ partial, int splits, int64_t M, int64_t rows,
                                const uint16_t* __restrict__ row_scale, const B* __restrict__ bias,
                                T* __restrict__ out) {
  const int64_t total = M * rows;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = e % rows;
    float v = 0.f;
    for (int s = 0; s < splits; ++s) v += partial[s * total + e];
    v *= pvq::half_bits_to_float(row_scale[r]);
    if (bias != nullptr) v += to_float(bias[r]);
    out[e] = from_float<T>(v);
  }
}

// The rows of x a kernel instance handles: 1, up to 4, or up to kGemvMaxBatch (acc[] is sized by it).
int batch_bound(int64_t M) { return M <= 1 ? 1 : (M <= 4 ? 4 : kGemvMaxBatch); }

// Calls f(kernel, (T*)nullptr) with the GEMV kernel instance for (D, x's type T, batch bound, decoder).
template <typename F>
cudaError_t with_gemv_kernel(int D, FloatKind kind, int maxm, bool staged, F&& f) {
  return dispatch_float_kind(kind, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return pvq::dispatch_group_size(D, [&](auto Dc) {
      constexpr int N = decltype(Dc)::value;
      if (staged) {
        if (maxm == 1) return f(gemv_kernel<N, 1, T, true>, type);
        if (maxm == 4) return f(gemv_kernel<N, 4, T, true>, type);
        return f(gemv_kernel<N, kGemvMaxBatch, T, true>, type);
      }
      if (maxm == 1) return f(gemv_kernel<N, 1, T, false>, type);
      if (maxm == 4) return f(gemv_kernel<N, 4, T, false>, type);
      return f(gemv_kernel<N, kGemvMaxBatch, T, false>, type);
    });
  });
}

// Calls f(kernel, (T*)nullptr, (Bt*)nullptr) with the finalize kernel instance for (out's type T,
// bias's type Bt).
template <typename F>
cudaError_t with_finalize_kernel(FloatKind kind, FloatKind bias_kind, F&& f) {
  return dispatch_float_kind(kind, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return dispatch_float_kind(bias_kind, [&](auto* btype) {
      using Bt = std::remove_pointer_t<decltype(btype)>;
      return f(finalize_kernel<T, Bt>, type, btype);
    });
  });
}

// Blocks of `kernel` resident per SM at `smem` bytes of dynamic shared memory, after allowing it that
// much (above 48 KB a kernel must opt in: 16 warps' cross-warp sums at batch 16 alone are 32 KB).
template <typename Kernel>
cudaError_t resident_blocks_with(Kernel kernel, size_t smem, int* per_sm) {
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  return resident_blocks_per_sm(kernel, kThreads, smem, per_sm);
}

// Splits the tiles' columns among the resident blocks, then sizes a grid that gives every block the
// same number of work items, give or take one (no tail round of a few blocks). A block's time is
// about rounds / S tiles' worth of columns (rounds = ceil(tiles * S / resident)), so S is the one
// that minimises it, the smallest on a tie (fewer partial sums), each warp keeping >= 4 chunks.
// Taking S = resident / tiles instead left blocks idle whenever tiles do not divide the resident
// blocks: 128 tiles on an A100's 216 gave S = 1 (128 blocks, 0.59 would be ideal; S = 3 runs 0.67),
// 344 tiles (11008 rows) on an H100's 264 gave 2 rounds where S = 3 takes 1.33.
void split_work(const pvq::PackedLayer& layer, int64_t resident, GemvPlan* p) {
  const int64_t tiles = (layer.rows + pvq::kTileRows - 1) / pvq::kTileRows;
  const int64_t most = std::max<int64_t>(1, layer.groups / (4 * kWarps));
  // S <= resident bounds the search (rounds / S never goes below tiles / resident anyway).
  const int64_t limit = std::min<int64_t>(most, std::max<int64_t>(1, resident));
  int64_t best = 1, best_rounds = (tiles + resident - 1) / resident;
  for (int64_t s = 2; s <= limit; ++s) {
    const int64_t rounds = (tiles * s + resident - 1) / resident;
    if (rounds * best < best_rounds * s) best = s, best_rounds = rounds;  // rounds / s < best_rounds / best
  }
  p->splits = int(best);
  const int64_t items = tiles * best;
  p->blocks = int((items + best_rounds - 1) / best_rounds);
}

}  // namespace

cudaError_t plan_gemv(const pvq::PackedLayer& layer, int D, FloatKind kind, FloatKind bias_kind, int64_t M,
                      GemvPlan* plan) {
  if (M < 1 || M > kGemvMaxBatch) return cudaErrorInvalidValue;
  GemvPlan p;
  p.maxm = batch_bound(M);
  p.staged = layer.K <= kStagedMaxK;
  const size_t work_bytes = gemv_work_bytes(D, p.maxm);
  int sms = 0, per_sm = 0;
  cudaError_t err = current_sm_count(&sms);
  if (err != cudaSuccess) return err;
  if (p.staged) {
    p.table_bytes = size_t(staged_layout(D, layer.K).bytes);
    p.smem = p.table_bytes + work_bytes;
    err = with_gemv_kernel(D, kind, p.maxm, true, [&](auto kernel, auto*) {
      return resident_blocks_with(kernel, p.smem, &per_sm);
    });
    if (err != cudaSuccess) return err;
    split_work(layer, int64_t(sms) * per_sm, &p);
  } else {
    // Resident blocks at the largest leaf prefix the budget below can pick: a smaller prefix only
    // lets more blocks in, so the grid sized from this stays resident.
    const size_t largest_smem = leaf_prefix_end(leaf_prefix_k(D, layer.K, size_t(kMaxLeafBytes))) + work_bytes;
    err = with_gemv_kernel(D, kind, p.maxm, false, [&](auto kernel, auto*) {
      return resident_blocks_with(kernel, largest_smem, &per_sm);
    });
    if (err != cudaSuccess) return err;
    split_work(layer, int64_t(sms) * per_sm, &p);
    // Leaf prefix budget: every block refills it, so keep the refill under 1/4 of the layer's bytes.
    const int64_t tiles = (layer.rows + pvq::kTileRows - 1) / pvq::kTileRows;
    const double weight_bytes = double(tiles) * double(layer.groups) * layer.bits * 4.0;
    const size_t budget = size_t(std::clamp(weight_bytes / (4.0 * p.blocks), kMinLeafBytes, kMaxLeafBytes));
    p.smem_leaf_k = leaf_prefix_k(D, layer.K, budget);
    p.table_bytes = leaf_prefix_end(p.smem_leaf_k);
    p.smem = p.table_bytes + work_bytes;
  }
  err = with_finalize_kernel(kind, bias_kind, [&](auto kernel, auto*, auto*) {
    return persistent_grid(kernel, M * layer.rows, kFinalizeThreads, 0, &p.finalize_blocks);
  });
  if (err != cudaSuccess) return err;
  p.workspace_floats = int64_t(p.splits) * M * layer.rows;
  *plan = p;
  return cudaSuccess;
}

cudaError_t launch_gemv(const pvq::SplitTables& tables, const pvq::PackedLayer& layer, int D, const void* x,
                        FloatKind kind, int64_t M, const void* bias, FloatKind bias_kind, void* out, float* workspace,
                        const GemvPlan& plan, cudaStream_t stream) {
  if (M <= 0) return cudaSuccess;
  if (M > plan.maxm) return cudaErrorInvalidValue;  // a plan made for a smaller batch
  const StagedLayout staged = plan.staged ? staged_layout(D, layer.K) : StagedLayout{};
  cudaError_t err = with_gemv_kernel(D, kind, plan.maxm, plan.staged, [&](auto kernel, auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return launch_kernel(kernel, plan.blocks, kThreads, plan.smem, stream, tables, layer, staged, plan.smem_leaf_k,
                         static_cast<const T*>(x), int(M), workspace, plan.splits);
  });
  if (err != cudaSuccess) return err;
  return with_finalize_kernel(kind, bias_kind, [&](auto kernel, auto* type, auto* btype) {
    using T = std::remove_pointer_t<decltype(type)>;
    using Bt = std::remove_pointer_t<decltype(btype)>;
    return launch_kernel(kernel, plan.finalize_blocks, kFinalizeThreads, 0, stream, workspace, plan.splits, M,
                         layer.rows, layer.row_scale, static_cast<const Bt*>(bias), static_cast<T*>(out));
  });
}

}  // namespace pvq_cuda
