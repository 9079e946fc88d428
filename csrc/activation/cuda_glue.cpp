// CUDA glue of encode_activations: argument checks (shared with the CPU path), layout (contiguous,
// 16-byte aligned rows for the kernel's vector loads), the device's shared-memory limit, the launch on
// the current stream, and the CPU path's errors for flagged tokens. Outside CUDA-graph capture the
// glue reads the per-token flags back (one reduction) and raises the CPU path's ValueError; during
// capture it cannot synchronize, so a token with NaN/Inf comes out as all-zero codes (scale 0), as
// the CPU kernel writes before it raises.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "activation/args.h"
#include "activation/launchers.h"
#include "common/cuda_glue.h"
#include "hadamard/args.h"

namespace pvq_cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> encode_activations_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& signs, const at::Tensor& levels, int64_t D, int64_t K,
    int64_t gain_bits) {
  const ActivationShape s = check_encode_activations_args(x, signs, levels, D, K, gain_bits);
  const c10::cuda::CUDAGuard guard(x.device());
  const std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  std::vector<int64_t> gshape = lead;
  gshape.push_back(s.groups);
  at::Tensor pulses = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor index = at::empty(gshape, x.options().dtype(at::kLong));
  at::Tensor gain = at::empty(gshape, x.options().dtype(at::kByte));
  at::Tensor scale = at::empty(lead, x.options().dtype(at::kHalf));
  if (s.tokens == 0) return {pulses, index, gain, scale};

  const size_t smem = encode_activations_smem_bytes(s.n, s.D) + encode_activations_static_smem_bytes();
  int smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.get_device()));
  TORCH_CHECK_VALUE(smem <= size_t(smem_optin), "pvq_cuda.encode_activations: n=", s.n, " with D=", s.D, " needs ",
                    smem, " bytes of shared memory per block, but ", x.device(), " allows at most ", smem_optin,
                    "; encode these activations on the CPU or use a larger D");

  at::Tensor x2 = x.reshape({-1, s.n}).contiguous();
  // A contiguous view can start at an odd offset (x[1:]); the kernel's 16-byte loads need an
  // aligned start, which a fresh allocation has.
  if (reinterpret_cast<uintptr_t>(x2.data_ptr()) % 16 != 0) x2 = x2.clone(at::MemoryFormat::Contiguous);
  const at::Tensor sg = signs_as_float(signs);
  const at::Tensor lv = levels.contiguous();
  at::Tensor flags = at::empty({s.tokens}, x.options().dtype(at::kInt));
  const ActivationCodes out{pulses.data_ptr<int8_t>(), index.data_ptr<int64_t>(), gain.data_ptr<uint8_t>(),
                            reinterpret_cast<uint16_t*>(scale.data_ptr<at::Half>()), flags.data_ptr<int>()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(launch_encode_activations(split_tables_on(x2), x2.data_ptr(), float_kind_of(x2.scalar_type()),
                                           sg.defined() ? sg.data_ptr<float>() : nullptr, lv.data_ptr<float>(),
                                           s.levels, s.tokens, s.n, s.D, s.K, out, stream));
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture == cudaStreamCaptureStatusNone && flags.any().item<bool>()) report_bad_token(x2, flags);
  return {pulses, index, gain, scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(pvq_cuda, CUDA, m) { m.impl("encode_activations", &encode_activations_cuda); }

}  // namespace pvq_cuda
