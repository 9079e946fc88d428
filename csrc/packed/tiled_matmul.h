// The large-batch paths of pvq_matmul and of its input gradient, torch-free: the layer is
// dequantized a tile of rows at a time into a dense buffer that a GEMM multiplies, so the dense
// copy stays small at any layer size. The glue passes at::mm (cuBLAS) as the GEMM; the emulation
// tests pass a host GEMM, which is how these loops run without a GPU.
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
// the activation type). The forward sets out[:, r0:r1] = x · dense[0 : r1 - r0]ᵀ; the input
// gradient adds grad[:, r0:r1] · dense[0 : r1 - r0] to its float32 accumulator.
using TileGemm = std::function<cudaError_t(int64_t r0, int64_t r1)>;

// Every tile of `tile_rows` rows (dense holds tile_rows * cols values of `kind`), in order.
cudaError_t matmul_by_dense_tiles(const pvq::SplitTables& tables, const pvq::PackedLayer& layer, int D, FloatKind kind,
                                  int64_t tile_rows, void* dense, const TileGemm& gemm, cudaStream_t stream);

// The input gradient's buffers, all on the device. z and rotated are [M, cols] float32.
struct GradInputBuffers {
  float* z;             // grad · Ŵ' (rotated basis): zeroed by the caller for the tile GEMMs to accumulate
                        // into, or written whole by launch_grad_gemv
  float* rotated;       // scratch for H z, used only when signs is not null
  const float* signs;   // the layer's cols ±1 signs, or null for an unrotated layer
  void* out;            // [M, cols] of `kind`: the gradient with respect to the (unrotated) input
};

// The input gradient's last step, shared by the fused and the tiled path: out = diag(signs) · H ·
// z / sqrt(cols) per row (rotated layers; cols must be a size launch_hadamard takes) or z, rounded
// once to `kind`, for M rows of b.z.
cudaError_t grad_input_to_input_basis(int64_t M, int64_t cols, FloatKind kind, const GradInputBuffers& b,
                                      cudaStream_t stream);

// pvq_matmul's input gradient for M rows of grad: z = Σ_tiles grad[:, tile] · Ŵ'[tile, :] through
// matmul_by_dense_tiles (gemm accumulates into b.z), then grad_input_to_input_basis.
cudaError_t grad_input_by_dense_tiles(const pvq::SplitTables& tables, const pvq::PackedLayer& layer, int D,
                                      FloatKind kind, int64_t M, int64_t tile_rows, void* dense, const TileGemm& gemm,
                                      const GradInputBuffers& b, cudaStream_t stream);

}  // namespace pvq_cuda
