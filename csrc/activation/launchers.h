// Host entry points of the activation kernels: plain C++ over raw pointers, so the .cu files stay free
// of torch headers and the torch glue (activation/cuda_glue.cpp) stays free of CUDA kernels.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "codec/pyramid.h"
#include "common/float_kind.h"

namespace pvq_cuda {

// Flags the encoder writes per token (0 when the token is fine), the CPU kernel's kNonFinite and
// kScaleOverflow: the glue reports the first flagged token with the CPU path's message.
enum TokenFlag : int { kTokenNonFinite = 1, kTokenScaleOverflow = 2 };

// The outputs of encode_activations, each contiguous: pulses [tokens][n], index and gain
// [tokens][n / D], scale [tokens] (fp16 bits), flags [tokens].
struct ActivationCodes {
  int8_t* pulses;
  int64_t* index;
  uint8_t* gain;
  uint16_t* scale;
  int* flags;
};

// Dynamic shared memory one block of the encoder needs for hidden size n and group size D (a
// supported n, D | n). Over 48 KB the launcher opts in; the glue first checks the device allows it.
size_t encode_activations_smem_bytes(int64_t n, int D);

// The encoder's static shared memory (the gain levels and their midpoints): a block needs this on
// top of the dynamic part, within the device's per-block opt-in limit.
size_t encode_activations_static_smem_bytes();

// activation/activation_code.h's code of every token of x [tokens][n] (16-byte aligned,
// contiguous), in the basis rotated by H_n · diag(signs) / sqrt(n) (signs: n floats or nullptr),
// with `levels` (level_count floats, 2^gain_bits) of the gain code; bit for bit the CPU kernel's.
// Tokens holding NaN/Inf get flag kTokenNonFinite and all-zero codes, as on the CPU.
cudaError_t launch_encode_activations(const pvq::SplitTables& tables, const void* x, FloatKind kind,
                                      const float* signs, const float* levels, int level_count, int64_t tokens,
                                      int64_t n, int D, int K, const ActivationCodes& out, cudaStream_t stream);

// Coded activations as wa_matmul takes them, each contiguous: pulses [tokens][n] (16-byte aligned
// rows), gain codes [tokens][n / D], scale [tokens] (fp16 bits), and the level_count gain levels.
struct CodedActivations {
  const int8_t* pulses;
  const uint8_t* gain;
  const uint16_t* scale;
  const float* levels;
  int level_count;
};

// x̂' [tokens][n] in fp32 (16-byte aligned): each group of D decoded as factor · y with the CPU
// kernel's factor (activation_code.h: group_factor), bit for bit. bad [tokens][n / D] is 1 where a
// group's sum |y| is not K or its gain code is >= level_count (that group decodes to zeros), else 0.
cudaError_t launch_decode_activations(const pvq::SplitTables& tables, const CodedActivations& in, int64_t tokens,
                                      int64_t n, int D, int K, float* out, uint8_t* bad, cudaStream_t stream);

}  // namespace pvq_cuda
