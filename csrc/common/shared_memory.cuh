// The block's dynamic shared memory (the launch's third <<<>>> argument) as a T*.
//
// One helper instead of `extern __shared__ T name[];` in each kernel: extern __shared__ arrays of
// different element types clash when a template declares them, and the host emulator
// (tests/cuda_emulation) cannot compile an extern __shared__ array at all (its __shared__ must mean
// `static` for static shared memory); through this call it gives each block fresh, exactly sized,
// poisoned memory.
#pragma once
#include <cuda_runtime.h>

namespace pvq_cuda {

template <typename T>
__device__ __forceinline__ T* dynamic_shared_memory() {
#if defined(PVQ_CUDA_EMULATION)
  return static_cast<T*>(pvq_emulation::dynamic_shared_memory());
#else
  extern __shared__ __align__(16) unsigned char pvq_dynamic_smem[];
  return reinterpret_cast<T*>(pvq_dynamic_smem);
#endif
}

}  // namespace pvq_cuda
