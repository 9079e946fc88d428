#include "packed/tiled_matmul.h"

#include <algorithm>

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

}  // namespace pvq_cuda
