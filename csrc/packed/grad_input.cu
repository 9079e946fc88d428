// The last step of pvq_matmul_grad_input on CUDA: the float32 accumulator z = grad · Ŵ' (rows in the
// weights' rotated basis, summed tile by tile in packed/tiled_matmul.cpp) goes back to the input
// basis and to the gradient's dtype.
//
// y = (x Rᵀ) Ŵ'ᵀ with R = H · diag(signs) / sqrt(n), so dL/dx = (grad Ŵ') R and row-wise that is
// diag(signs) · H · z / sqrt(n): the Hadamard kernel without signs (they would come before H), then
// this kernel, which multiplies by the signs and rounds once to the output type. Unrotated layers
// only round. Memory bound and tiny next to the GEMMs: one grid-stride pass, a thread an element.
#include <type_traits>

#include "common/float_io.cuh"
#include "common/launch.h"
#include "packed/launchers.h"

namespace pvq_cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) signed_cast_kernel(const float* __restrict__ z,
                                                                const float* __restrict__ signs, int64_t rows,
                                                                int64_t cols, T* __restrict__ out) {
  const int64_t total = rows * cols;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const float v = z[e];
    out[e] = from_float<T>(signs != nullptr ? signs[e % cols] * v : v);
  }
}

}  // namespace

cudaError_t launch_signed_cast(const float* z, const float* signs, int64_t rows, int64_t cols, void* out,
                               FloatKind out_kind, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  return dispatch_float_kind(out_kind, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    int blocks = 0;
    const cudaError_t err = persistent_grid(signed_cast_kernel<T>, rows * cols, kThreads, 0, &blocks);
    if (err != cudaSuccess) return err;
    return launch_kernel(signed_cast_kernel<T>, blocks, kThreads, 0, stream, z, signs, rows, cols,
                         static_cast<T*>(out));
  });
}

}  // namespace pvq_cuda
