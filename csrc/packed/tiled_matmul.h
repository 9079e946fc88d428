// The large-batch path of pvq_matmul, torch-free: the layer is dequantized a tile of rows at a time
// into a dense buffer that a GEMM multiplies, so the dense copy stays small at any layer size. The
// glue passes at::mm (cuBLAS) as the GEMM; the emulation tests pass a host GEMM, which is how this
// loop runs without a GPU.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <functional>

#include "common/float_kind.h"
#include "packed/packed_layer.h"

namespace pvq_cuda {

// Rows per dense tile: a multiple of 32 (dequantize works on whole 32-row tiles) holding about
// `tile_weights` weights, at least 32 rows, and never more than the layer has.
int64_t dense_tile_rows(int64_t rows, int64_t cols, int64_t tile_weights);

// Called once per tile, after its rows [r0, r1) are in `dense` (row r at dense + (r - r0) * cols, of
// the activation type): it must set out[:, r0:r1] = x · dense[0 : r1 - r0]ᵀ.
using TileGemm = std::function<cudaError_t(int64_t r0, int64_t r1)>;

// Every tile of `tile_rows` rows (dense holds tile_rows * cols values of `kind`), in order.
cudaError_t matmul_by_dense_tiles(const pvq::SplitTables& tables, const pvq::PackedLayer& layer, int D, FloatKind kind,
                                  int64_t tile_rows, void* dense, const TileGemm& gemm, cudaStream_t stream);

}  // namespace pvq_cuda
