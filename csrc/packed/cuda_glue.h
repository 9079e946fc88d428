// The packed-layer product the torch glue of more than one op runs on CUDA: pvq_matmul, and
// wa_matmul once its activations are decoded (activation/cuda_glue.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "packed/args.h"

namespace pvq_cuda {

// x2 Ŵ'ᵀ + bias for x2 [M, in_features] already in the layer's rotated basis (contiguous, float32 /
// float16 / bfloat16), in x2's dtype: the fused decode-GEMV up to kGemvMaxBatch rows, dequantized
// tiles through cuBLAS above. x2 may be realigned (the GEMV loads 16-byte vectors). The layer
// tensors and bias were checked against s; the caller holds the device guard.
at::Tensor rotated_matmul_cuda(at::Tensor x2, const PackedShape& s, const at::Tensor& codes,
                               const at::Tensor& row_scale, const at::Tensor& levels,
                               const std::optional<at::Tensor>& bias);

}  // namespace pvq_cuda
