// Dequantize a packed PVQ layer (rotated basis) into fp32/fp16/bf16 rows. It feeds cuBLAS for large
// batches (a tile of rows at a time, so the dense copy stays small) and PVQWeight.dequantize().
//
// One warp per chunk (32 rows x 1 group column): the chunk's B words are read once, coalesced,
// each lane decodes its row's group and writes D contiguous values (16 B at D=8 in fp16, a whole
// sector at fp32). The leaf prefix lives in shared memory as in decode.cu.
#include <type_traits>

#include "common/dispatch.h"
#include "common/float_io.cuh"
#include "common/grid.cuh"
#include "common/launch.h"
#include "common/shared_memory.cuh"
#include "packed/launchers.h"

namespace pvq_cuda {
namespace {

constexpr int kThreads = 256;
constexpr size_t kLeafSmemBytes = 46 * 1024;  // k <= 11 at K >= 11 (see decode.cu)

template <int D, typename T>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(pvq::SplitTables t, pvq::PackedLayer p,
                                                              int64_t row_begin, int64_t row_end,
                                                              T* __restrict__ out, int smem_leaf_k) {
  stage_leaf_table(t, dynamic_shared_memory<uint32_t>(), smem_leaf_k);
  const int lane = threadIdx.x & 31;
  // The tiles that hold rows [row_begin, row_end); the range need not start or end on a tile.
  const int64_t first_tile = row_begin / pvq::kTileRows;
  const int64_t chunks = ((row_end - 1) / pvq::kTileRows - first_tile + 1) * p.groups;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int64_t cols = p.groups * D;
  for (int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; c < chunks; c += warps) {
    const int64_t tile = first_tile + c / p.groups, j = c % p.groups;
    const int64_t row = tile * pvq::kTileRows + lane;
    if (row < row_begin || row >= row_end) continue;
    const uint32_t* chunk = p.words + (tile * p.groups + j) * p.bits;
    int8_t y[D];
    const float scale = pvq::decode_group<D>(t, p, pvq::chunk_code(chunk, lane, p.bits), y) *
                        pvq::half_bits_to_float(p.row_scale[row]);
    T* dst = out + (row - row_begin) * cols + j * D;
#pragma unroll
    for (int d = 0; d < D; ++d) dst[d] = from_float<T>(scale * float(y[d]));
  }
}

}  // namespace

cudaError_t launch_dequantize(const pvq::SplitTables& tables, const pvq::PackedLayer& layer, int D, int64_t row_begin,
                              int64_t row_end, void* out, FloatKind out_kind, cudaStream_t stream) {
  if (row_end <= row_begin) return cudaSuccess;
  const int smem_leaf_k = leaf_prefix_k(D, layer.K, kLeafSmemBytes);
  const size_t smem = leaf_prefix_bytes(smem_leaf_k);
  const int64_t tiles = (row_end - 1) / pvq::kTileRows - row_begin / pvq::kTileRows + 1;
  const int64_t threads_needed = tiles * layer.groups * 32;  // a warp per chunk
  return dispatch_float_kind(out_kind, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return pvq::dispatch_group_size(D, [&](auto Dc) {
      constexpr int N = decltype(Dc)::value;
      int blocks = 0;
      const cudaError_t err = persistent_grid(dequantize_kernel<N, T>, threads_needed, kThreads, smem, &blocks);
      if (err != cudaSuccess) return err;
      return launch_kernel(dequantize_kernel<N, T>, blocks, kThreads, smem, stream, tables, layer, row_begin, row_end,
                           static_cast<T*>(out), smem_leaf_k);
    });
  });
}

}  // namespace pvq_cuda
