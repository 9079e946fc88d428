// Argument checks of pvq_cuda.hadamard_transform, shared by the CPU and CUDA kernels. Every failure
// is a Python ValueError / TypeError naming the argument and what was expected.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "hadamard/hadamard_matrix.h"

namespace pvq_cuda {

// Checks x and signs; returns the split n = m · 2^p of n = x.size(-1).
pvq::hadamard::Split check_hadamard_args(const at::Tensor& x, const std::optional<at::Tensor>& signs);

// The signs as a contiguous float32 vector of ±1 on x's device (undefined when absent).
at::Tensor signs_as_float(const std::optional<at::Tensor>& signs);

}  // namespace pvq_cuda
