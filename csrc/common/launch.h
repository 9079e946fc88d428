// Kernel launches and occupancy, for every launcher. A launch is <<<>>> under nvcc and
// pvq_emulation::launch under the host emulator (tests/cuda_emulation compiles the .cu files with
// g++, which cannot parse <<<>>>); either way the launch's error comes back from one place.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <utility>

namespace pvq_cuda {

template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t stream,
                          Args&&... args) {
#if defined(PVQ_CUDA_EMULATION)
  pvq_emulation::launch(kernel, grid, block, dynamic_smem, stream, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, dynamic_smem, stream>>>(std::forward<Args>(args)...);
#endif
  return cudaGetLastError();
}

// SMs of the current device.
inline cudaError_t current_sm_count(int* sms) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
  return err;
}

// How many blocks of this kernel instance fit on one SM at `threads` threads and `dynamic_smem`
// bytes of dynamic shared memory: the runtime counts its registers, static and dynamic shared memory,
// warps and block slots. cudaErrorInvalidConfiguration when not even one fits.
template <typename... Params>
cudaError_t resident_blocks_per_sm(void (*kernel)(Params...), int threads, size_t dynamic_smem, int* blocks) {
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel, threads, dynamic_smem);
  if (err != cudaSuccess) return err;
  return *blocks >= 1 ? cudaSuccess : cudaErrorInvalidConfiguration;
}

// A persistent grid for a grid-stride kernel over `items` (one per thread): every block that can be
// resident at once on every SM, never more blocks than the items need. Resident blocks pay a
// per-block setup (the decoders' shared-memory table fill) once each.
template <typename... Params>
cudaError_t persistent_grid(void (*kernel)(Params...), int64_t items, int threads, size_t dynamic_smem, int* blocks) {
  int sms = 0, per_sm = 0;
  cudaError_t err = current_sm_count(&sms);
  if (err == cudaSuccess) err = resident_blocks_per_sm(kernel, threads, dynamic_smem, &per_sm);
  if (err != cudaSuccess) return err;
  const int64_t needed = (items + threads - 1) / threads;
  *blocks = int(std::min<int64_t>(needed, int64_t(sms) * per_sm));
  return cudaSuccess;
}

}  // namespace pvq_cuda
