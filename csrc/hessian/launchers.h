// Host entry point of the Hessian accumulation kernel (torch-free).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/float_kind.h"

namespace pvq_cuda {

// H[n, n] (fp32, row-major) += x^T x for x[tokens, n] of `kind` (fp16 or bf16 only).
cudaError_t launch_hessian_accumulate(float* H, const void* x, FloatKind kind, int64_t tokens, int n,
                                      cudaStream_t stream);

}  // namespace pvq_cuda
