// Argument checks and error reports shared by the CPU and CUDA codec kernels. Every failure is a
// Python exception (ValueError / TypeError) that names the op, the argument and what was expected.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace pvq_cuda {

// Validates D and K against the codec limits and returns V(D, K).
uint64_t check_codec_limits(const char* op, int64_t D, int64_t K);

// Each returns V(D, K) and leaves the tensor checks done.
uint64_t check_search_args(const at::Tensor& x, int64_t K);
uint64_t check_encode_args(const at::Tensor& pulses, int64_t K);
uint64_t check_decode_args(const at::Tensor& index, int64_t D, int64_t K);

// _metric_moves: pulses, w_metric, y_metric, w_sign float64 [rows, D] with D a codec group size;
// fit_num, fit_den float64 [rows]; metric float64 [D, D]; all on the CPU.
void check_metric_moves_args(const at::Tensor& pulses, const at::Tensor& w_metric, const at::Tensor& y_metric,
                             const at::Tensor& fit_num, const at::Tensor& fit_den, const at::Tensor& w_sign,
                             const at::Tensor& metric);

// int8 pulses, [groups, D], contiguous; other integer dtypes are range-checked before narrowing.
at::Tensor pulses_as_int8(const at::Tensor& pulses, int64_t K);

// Called after a kernel flagged bad data: find the first offending row and raise ValueError.
[[noreturn]] void report_nonfinite(const at::Tensor& x2d);
[[noreturn]] void report_bad_pulses(const at::Tensor& pulses2d, int64_t K);
[[noreturn]] void report_bad_index(const at::Tensor& index1d, uint64_t V, int64_t D, int64_t K);

}  // namespace pvq_cuda
