// PVQ encode: int8 pulses -> int64 split-order indices, one thread per group. Encoding is O(D)
// multiply-adds with no data-dependent loop, so it streams at memory speed; the per-node offset
// and count tables are tiny and stay in L1.
#include "common/dispatch.h"
#include "codec/launchers.h"
#include "common/grid.cuh"
#include "codec/status.cuh"
#include "common/launch.h"

namespace pvq_cuda {
namespace {

constexpr int kThreads = 256;

template <int D>
__global__ void __launch_bounds__(kThreads) encode_kernel(pvq::SplitTables t, const int8_t* __restrict__ pulses,
                                                          int64_t* __restrict__ index, int64_t groups, int K,
                                                          int* status) {
  int bad = kStatusOk;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    int8_t y[D];
    load_group<D>(pulses + g * D, y);
    if (pvq::abs_sum<D>(y) != K) {
      index[g] = -1;
      bad = kStatusBadData;
    } else {
      index[g] = int64_t(pvq::encode_node<D>(t, y, K));
    }
  }
  report_status(status, bad);
}

}  // namespace

cudaError_t launch_encode(const pvq::SplitTables& tables, const int8_t* pulses, int64_t* index, int64_t groups,
                          int D, int K, int* status, cudaStream_t stream) {
  if (groups == 0) return cudaSuccess;
  return pvq::dispatch_group_size(D, [&](auto Dc) {
    constexpr int N = decltype(Dc)::value;
    int blocks = 0;
    const cudaError_t err = persistent_grid(encode_kernel<N>, groups, kThreads, 0, &blocks);
    if (err != cudaSuccess) return err;
    return launch_kernel(encode_kernel<N>, blocks, kThreads, 0, stream, tables, pulses, index, groups, K, status);
  });
}

}  // namespace pvq_cuda
