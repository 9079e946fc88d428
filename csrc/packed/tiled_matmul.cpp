#include "packed/tiled_matmul.h"

#include <algorithm>

#include "hadamard/launchers.h"
#include "packed/launchers.h"

namespace pvq_cuda {

int64_t dense_tile_rows(int64_t rows, int64_t cols, int64_t tile_weights) {
  const int64_t whole_tiles = tile_weights / cols / pvq::kTileRows * pvq::kTileRows;
  return std::min(rows, std::max<int64_t>(pvq::kTileRows, whole_tiles));
}

cudaError_t matmul_by_dense_tiles(const pvq::SplitTables& tables, const pvq::PackedLayer& layer, int D, FloatKind kind,
                                  int64_t tile_rows, void* dense, const TileGemm& gemm, cudaStream_t stream) {
  for (int64_t r0 = 0; r0 < layer.rows; r0 += tile_rows) {
    const int64_t r1 = std::min(layer.rows, r0 + tile_rows);
    cudaError_t err = launch_dequantize(tables, layer, D, r0, r1, dense, kind, stream);
    if (err == cudaSuccess) err = gemm(r0, r1);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t grad_input_to_input_basis(int64_t M, int64_t cols, FloatKind kind, const GradInputBuffers& b,
                                      cudaStream_t stream) {
  if (M <= 0) return cudaSuccess;
  // (grad Ŵ') R, R = H diag(signs) / sqrt(n): the transform first, without signs, then the signs
  // (hadamard's own signs would multiply before H).
  const float* z = b.z;
  if (b.signs != nullptr) {
    const cudaError_t err = launch_hadamard(b.z, b.rotated, FloatKind::kFloat32, nullptr, M, cols, stream);
    if (err != cudaSuccess) return err;
    z = b.rotated;
  }
  return launch_signed_cast(z, b.signs, M, cols, b.out, kind, stream);
}

cudaError_t grad_input_by_dense_tiles(const pvq::SplitTables& tables, const pvq::PackedLayer& layer, int D,
                                      FloatKind kind, int64_t M, int64_t tile_rows, void* dense, const TileGemm& gemm,
                                      const GradInputBuffers& b, cudaStream_t stream) {
  if (M <= 0) return cudaSuccess;
  const cudaError_t err = matmul_by_dense_tiles(tables, layer, D, kind, tile_rows, dense, gemm, stream);
  if (err != cudaSuccess) return err;
  return grad_input_to_input_basis(M, layer.groups * D, kind, b, stream);
}

}  // namespace pvq_cuda
