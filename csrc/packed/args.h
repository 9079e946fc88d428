// Argument checks shared by the CPU and CUDA kernels of packed PVQ layers.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "packed/packed_layer.h"

namespace pvq_cuda {

struct PackedShape {
  int64_t rows, cols, groups, tiles;
  int D, K, bits, index_bits, scale_bits;
  uint64_t count;  // V(D, K)
};

// Validates the layer tensors against (out_features, in_features, D, K, scale_bits); raises a
// ValueError / TypeError naming the argument otherwise.
PackedShape check_packed_layer(const char* op, const at::Tensor& codes, const at::Tensor& row_scale,
                               const at::Tensor& levels, int64_t out_features, int64_t in_features, int64_t D,
                               int64_t K, int64_t scale_bits);

// Every check of pvq_matmul (layer, x [..., in_features], signs, bias), for both devices.
PackedShape check_matmul_args(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& row_scale,
                              const at::Tensor& levels, const std::optional<at::Tensor>& signs,
                              const std::optional<at::Tensor>& bias, int64_t out_features, int64_t D, int64_t K,
                              int64_t scale_bits);

// Every check of pvq_matmul_grad_input (layer, grad [..., out_features], signs), for both devices.
PackedShape check_matmul_grad_args(const at::Tensor& grad, const at::Tensor& codes, const at::Tensor& row_scale,
                                   const at::Tensor& levels, const std::optional<at::Tensor>& signs,
                                   int64_t in_features, int64_t D, int64_t K, int64_t scale_bits);

// The layer view a kernel reads (pointers into the given contiguous tensors).
pvq::PackedLayer packed_view(const PackedShape& s, const at::Tensor& codes, const at::Tensor& row_scale,
                             const at::Tensor& levels);

// x rotated into the weights' basis, when the layer is rotated (through the hadamard_transform op).
at::Tensor rotate_input(const at::Tensor& x2d, const std::optional<at::Tensor>& signs);

// The inverse: z (rows in the weights' basis) back to the input basis, z R = signs * H z / sqrt(n).
at::Tensor unrotate_output(const at::Tensor& z2d, const std::optional<at::Tensor>& signs);

}  // namespace pvq_cuda
