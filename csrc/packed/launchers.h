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

// Fused small-batch matmul: out[m, r] = row_scale[r] * sum_j <decode(r, j), x[m, jD:jD+D]> + bias[r],
// for M <= kGemvMaxBatch rows of x (row stride = in_features), x and out of `kind`, bias of
// `bias_kind` or null. `workspace` holds splits * M * rows floats (see gemv_workspace_floats).
cudaError_t launch_gemv(const pvq::SplitTables& tables, const pvq::PackedLayer& layer, int D, const void* x,
                        FloatKind kind, int64_t M, const void* bias, FloatKind bias_kind, void* out, float* workspace,
                        int splits, cudaStream_t stream);

// How many column splits the GEMV uses for this layer and batch, and its workspace size.
int gemv_splits(const pvq::PackedLayer& layer);
int64_t gemv_workspace_floats(const pvq::PackedLayer& layer, int64_t M, int splits);

}  // namespace pvq_cuda
