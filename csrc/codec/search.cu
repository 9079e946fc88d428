// PVQ search: x[..., D] (fp32/fp16/bf16) -> nearest pyramid point in angle, one thread per group.
// The search itself is pvq::search_group, the same integer-exact code the CPU runs, so codes agree
// bit for bit. Cost is O(D) for the projection, < D greedy passes of O(D), and a few O(D^2)
// pulse-move passes: roughly a thousand instructions per group at D=8 and ~16x that at D=32, with
// the per-group arrays indexed dynamically (local memory). A warp-cooperative search for large D
// belongs to the activation-coding work, where search sits on the inference path.
#include <type_traits>

#include "common/dispatch.h"
#include "codec/launchers.h"
#include "common/float_io.cuh"
#include "common/grid.cuh"
#include "codec/status.cuh"
#include "common/launch.h"

namespace pvq_cuda {
namespace {

constexpr int kThreads = 128;

template <int D, typename T>
__global__ void __launch_bounds__(kThreads) search_kernel(const T* __restrict__ x, int8_t* __restrict__ pulses,
                                                          int64_t groups, int K, int* status) {
  int bad = kStatusOk;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    float v[D];
#pragma unroll
    for (int j = 0; j < D; ++j) v[j] = to_float(x[g * D + j]);
    int8_t y[D];
    if (!pvq::search_group<D>([&](int j) { return v[j]; }, K, y)) bad = kStatusBadData;
    store_group<D>(pulses + g * D, y);
  }
  report_status(status, bad);
}

template <typename T>
cudaError_t launch_typed(const T* x, int8_t* pulses, int64_t groups, int D, int K, int* status, cudaStream_t stream) {
  return pvq::dispatch_group_size(D, [&](auto Dc) {
    constexpr int N = decltype(Dc)::value;
    int blocks = 0;
    const cudaError_t err = persistent_grid(search_kernel<N, T>, groups, kThreads, 0, &blocks);
    if (err != cudaSuccess) return err;
    return launch_kernel(search_kernel<N, T>, blocks, kThreads, 0, stream, x, pulses, groups, K, status);
  });
}

}  // namespace

cudaError_t launch_search(const void* x, FloatKind kind, int8_t* pulses, int64_t groups, int D, int K, int* status,
                          cudaStream_t stream) {
  if (groups == 0) return cudaSuccess;
  return dispatch_float_kind(kind, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return launch_typed(static_cast<const T*>(x), pulses, groups, D, K, status, stream);
  });
}

}  // namespace pvq_cuda
