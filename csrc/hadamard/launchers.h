// Host entry point of the CUDA Hadamard kernel: plain C++ over raw pointers, so hadamard.cu stays
// free of torch headers and the torch glue (hadamard/cuda_glue.cpp) stays free of CUDA kernels.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/float_kind.h"

namespace pvq_cuda {

// Dynamic shared memory one block needs for rows of length n (a supported n), at most 132 KB
// (n = 32768). Over 48 KB the launcher opts in; the glue first checks the device allows it.
size_t hadamard_smem_bytes(int64_t n);

// y[r] = H_n · diag(signs) · x[r] / sqrt(n) for `rows` contiguous rows of length n, with
// pvq::hadamard::split_size(n).m != 0. x and y must be 16-byte aligned and must not overlap;
// signs is nullptr (all +1) or n floats. Returns the launch's error, if any.
cudaError_t launch_hadamard(const void* x, void* y, FloatKind kind, const float* signs, int64_t rows,
                            int64_t n, cudaStream_t stream);

}  // namespace pvq_cuda
