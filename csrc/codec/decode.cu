// PVQ decode: int64 split-order indices -> int8 pulses, one thread per group.
//
// Design (paper.md §2, notes/pvq_decoding.md §4b). A thread never walks coordinates one by one:
// at each node a 64-bucket guide table gives k1 (then ~0.1 extra compares on average at D=8,
// K=16), one multiply-high replaces the division by V(h, k-k1), and the two halves continue
// independently. 4-leaves come from a table in shared memory. Its prefix for k <= 11 is 11,969
// words = 46.8 KB (the most that fits the default 48 KB). On Gaussian data at D=8, K=16 a leaf
// holds 8 pulses on average and 93.7 % of leaves have k <= 11 (97.7 % have k <= 12, which would
// take 65 KB); fuller leaves split 4 -> 2+2 with the same tables. The table fill is paid once per
// resident block of the persistent grid (4 blocks of 48 KB fit an H100 SM's 228 KB). Whether 65 KB
// (fewer resident blocks, fewer split leaves) is faster is a measurement for the GPU tuning pass.
#include "common/dispatch.h"
#include "codec/launchers.h"
#include "common/grid.cuh"
#include "codec/status.cuh"
#include "common/launch.h"
#include "common/shared_memory.cuh"

namespace pvq_cuda {
namespace {

constexpr int kThreads = 256;
constexpr size_t kLeafSmemBytes = 48 * 1024;

template <int D>
__global__ void __launch_bounds__(kThreads) decode_kernel(pvq::SplitTables t, const int64_t* __restrict__ index,
                                                          int8_t* __restrict__ pulses, int64_t groups, int K,
                                                          uint64_t V, int smem_leaf_k, int* status) {
  stage_leaf_table(t, dynamic_shared_memory<uint32_t>(), smem_leaf_k);
  int bad = kStatusOk;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const uint64_t i = uint64_t(index[g]);
    int8_t y[D];
    if (i >= V) {  // negative indices wrap above V
#pragma unroll
      for (int j = 0; j < D; ++j) y[j] = 0;
      bad = kStatusBadData;
    } else {
      pvq::decode_node<D>(t, i, K, y);
    }
    store_group<D>(pulses + g * D, y);
  }
  report_status(status, bad);
}

}  // namespace

cudaError_t launch_decode(const pvq::SplitTables& tables, const int64_t* index, int8_t* pulses, int64_t groups,
                          int D, int K, uint64_t V, int* status, cudaStream_t stream) {
  if (groups == 0) return cudaSuccess;
  const int smem_leaf_k = leaf_prefix_k(D, K, kLeafSmemBytes);
  const size_t smem = leaf_prefix_bytes(smem_leaf_k);
  return pvq::dispatch_group_size(D, [&](auto Dc) {
    constexpr int N = decltype(Dc)::value;
    int blocks = 0;
    const cudaError_t err = persistent_grid(decode_kernel<N>, groups, kThreads, smem, &blocks);
    if (err != cudaSuccess) return err;
    return launch_kernel(decode_kernel<N>, blocks, kThreads, smem, stream, tables, index, pulses, groups, K, V,
                         smem_leaf_k, status);
  });
}

}  // namespace pvq_cuda
