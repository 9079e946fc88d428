// Argument checks of hessian_accumulate_, shared by its CPU and CUDA kernels.
#pragma once
#include <ATen/core/Tensor.h>

namespace pvq_cuda {

// Validates H (fp32 [n, n], contiguous) and x ([..., n], fp32/fp16/bf16, on H's device); returns n.
int64_t check_hessian_args(const at::Tensor& H, const at::Tensor& x);

}  // namespace pvq_cuda
