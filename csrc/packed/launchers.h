// Host entry points of the packed-layer kernels (torch-free; see codec/launchers.h for why).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "packed/packed_layer.h"
#include "common/device_tables.h"
#include "common/float_kind.h"

namespace pvq_cuda {

// Largest batch the fused decode-GEMV kernel takes; larger batches dequantize tiles for cuBLAS.
constexpr int kGemvMaxBatch = 16;

// The float layer weight in the rotated basis, rows [row_begin, row_end), as `out_kind` into
// out[(row - row_begin) * cols + col].
cudaError_t launch_dequantize(const pvq::SplitTables& tables, const pvq::PackedLayer& layer, int D, int64_t row_begin,
                              int64_t row_end, void* out, FloatKind out_kind, cudaStream_t stream);

// How the fused GEMV runs a layer for a batch: from the device's SM count and the kernel instance's
// occupancy (cudaOccupancyMaxActiveBlocksPerMultiprocessor), so its persistent grid is resident.
struct GemvPlan {
  int maxm = 0;                  // the kernel instance's batch bound (1, 4 or kGemvMaxBatch)
  bool staged = false;           // the staged-records decoder (K <= kStagedMaxK), else the tables decoder
  int splits = 1;                // each tile's group columns are cut into this many work items
  int blocks = 0;                // the GEMV kernel's grid
  int smem_leaf_k = -1;          // tables decoder: leaf prefix staged in shared memory (-1: none)
  size_t table_bytes = 0;        // the decoder's tables in shared memory: staged records, or the leaf prefix
  size_t smem = 0;               // dynamic shared memory per block: the tables, cross-warp sums, activation window
  int finalize_blocks = 0;       // the finalize kernel's grid
  int64_t workspace_floats = 0;  // splits * M * rows partial sums
};
cudaError_t plan_gemv(const pvq::PackedLayer& layer, int D, FloatKind kind, FloatKind bias_kind, int64_t M,
                      GemvPlan* plan);

// Fused small-batch matmul: out[m, r] = row_scale[r] * sum_j <decode(r, j), x[m, jD:jD+D]> + bias[r],
// for M <= kGemvMaxBatch rows of x (row stride = in_features), x and out of `kind`, bias of
// `bias_kind` or null. `plan` comes from plan_gemv for the same arguments; `workspace` holds
// plan.workspace_floats floats.
cudaError_t launch_gemv(const pvq::SplitTables& tables, const pvq::PackedLayer& layer, int D, const void* x,
                        FloatKind kind, int64_t M, const void* bias, FloatKind bias_kind, void* out, float* workspace,
                        const GemvPlan& plan, cudaStream_t stream);

// Largest batch (rows of grad) the fused input-gradient kernel takes at group size D: its
// accumulators are batch x D floats a lane (8 up to D=16, 4 at D=32).
int grad_gemv_max_batch(int D);

// How the fused input gradient runs a layer for a batch (from the SM count and the kernel's occupancy).
struct GradGemvPlan {
  int maxm = 0;                  // the kernel instance's batch bound (1, 4 or 8)
  int splits = 1;                // the tiles are cut into this many ranges, one fp32 partial each
  int blocks = 0;                // the kernel's grid (a warp per work item: one column of one range)
  int smem_leaf_k = -1;          // leaf prefix staged in shared memory (-1: none)
  size_t smem = 0;               // dynamic shared memory per block (the leaf prefix)
  int sum_blocks = 0;            // the split sum's grid (splits > 1)
  int64_t workspace_floats = 0;  // splits * M * cols partial sums when splits > 1, else 0
};
cudaError_t plan_grad_gemv(const pvq::PackedLayer& layer, int D, FloatKind kind, int64_t M, GradGemvPlan* plan);

// Fused small-batch input gradient in the weights' rotated basis: z[m, c] = sum_r grad[m, r] Ŵ'[r, c]
// as float32, for M <= grad_gemv_max_batch(D) rows of grad (row stride = out_features) of `kind`.
// `plan` comes from plan_grad_gemv for the same arguments; `workspace` holds plan.workspace_floats.
cudaError_t launch_grad_gemv(const pvq::SplitTables& tables, const pvq::PackedLayer& layer, int D, const void* grad,
                             FloatKind kind, int64_t M, float* z, float* workspace, const GradGemvPlan& plan,
                             cudaStream_t stream);

// out[r, c] = signs[c] * z[r, c] (signs null: z[r, c]) rounded once to `out_kind`, for `rows`
// contiguous rows of `cols` floats: the input gradient's return to the input basis after the
// Hadamard transform (packed/grad_input.cu).
cudaError_t launch_signed_cast(const float* z, const float* signs, int64_t rows, int64_t cols, void* out,
                               FloatKind out_kind, cudaStream_t stream);

}  // namespace pvq_cuda
