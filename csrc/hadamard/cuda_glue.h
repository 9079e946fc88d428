// A check the torch glue of every op that runs the CUDA Hadamard kernel shares (hadamard_transform,
// and pvq_matmul_grad_input's return to the input basis).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "hadamard/launchers.h"

namespace pvq_cuda {

// Rows of length n need hadamard_smem_bytes(n) of shared memory per block (132 KB at n = 32768):
// raises a ValueError naming `op` when `device` allows less, before any launch fails vaguely.
inline void check_hadamard_fits(const char* op, int64_t n, const c10::Device& device) {
  const size_t smem = hadamard_smem_bytes(n);
  int smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device.index()));
  TORCH_CHECK_VALUE(smem <= size_t(smem_optin), op, ": n=", n, " needs ", smem,
                    " bytes of shared memory per block for the Hadamard transform, but ", device, " allows at most ",
                    smem_optin, "; transform on the CPU or split n");
}

}  // namespace pvq_cuda
