// Argument checks of the activation ops (encode_activations, wa_matmul), shared by the CPU and CUDA
// kernels. Every failure is a Python ValueError / TypeError naming the argument and what was expected.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "hadamard/hadamard_matrix.h"
#include "packed/args.h"

namespace pvq_cuda {

struct ActivationShape {
  int64_t tokens;  // rows of x (the leading dims flattened)
  int64_t n;       // hidden size: x.size(-1)
  int64_t groups;  // n / D
  int D, K, levels;
  pvq::hadamard::Split split;
};

// x [..., n] (float32/16/bf16), signs [n] or none, levels float32 [2^gain_bits]; D | n, n a
// supported Hadamard size, (D, K) within the codec's limits, gain_bits in [0, 8].
ActivationShape check_encode_activations_args(const at::Tensor& x, const std::optional<at::Tensor>& signs,
                                              const at::Tensor& levels, int64_t D, int64_t K, int64_t gain_bits);

// The coded activations (pulses int8 [..., n], gain uint8 [..., n/act_D], scale float16 [...], act_levels
// float32) against a packed layer (as pvq_matmul checks it); returns the layer's shape.
PackedShape check_wa_matmul_args(const at::Tensor& pulses, const at::Tensor& gain, const at::Tensor& scale,
                                 const at::Tensor& act_levels, const at::Tensor& codes, const at::Tensor& row_scale,
                                 const at::Tensor& levels, const std::optional<at::Tensor>& bias, int64_t out_features,
                                 int64_t D, int64_t K, int64_t scale_bits, int64_t act_D, int64_t act_K);

// Raised after a kernel flagged a token: NaN/Inf in x, or a scale past fp16's range.
[[noreturn]] void report_bad_token(const at::Tensor& x2d, const at::Tensor& flags);

// Raised after wa_matmul's kernel saw an activation group with sum |y| != act_K or a gain code
// past the levels.
[[noreturn]] void report_bad_activation_codes(const at::Tensor& pulses2d, const at::Tensor& gain2d, int64_t act_D,
                                              int64_t act_K, int64_t levels);

}  // namespace pvq_cuda
