// CUDA glue of the activation ops: argument checks (shared with the CPU path), layout (contiguous,
// 16-byte aligned rows for the kernels' vector loads), the launches on the current stream, and the
// CPU path's errors for what a kernel flagged.
// - encode_activations: the device's shared-memory limit, then the fused encoder. Outside CUDA-graph
//   capture the glue reads the per-token flags back (one reduction) and raises the CPU path's
//   ValueError; during capture it cannot synchronize, so a token with NaN/Inf comes out as all-zero
//   codes (scale 0), as the CPU kernel writes before it raises.
// - wa_matmul: the activations decoded to fp32 x̂' (activation/decode.cu says why), then the packed
//   layer's product as pvq_matmul runs it (packed/cuda_glue.h). Invalid activation groups raise the
//   CPU path's ValueError outside capture and count as zeros during it. As pvq_matmul on CUDA, a
//   corrupt weight code decodes to zero weights (packed/packed_layer.h) where the CPU op raises.
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
#include "packed/cuda_glue.h"

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

at::Tensor wa_matmul_cuda(const at::Tensor& pulses, const at::Tensor& gain, const at::Tensor& scale,
                          const at::Tensor& act_levels, const at::Tensor& codes, const at::Tensor& row_scale,
                          const at::Tensor& levels, const std::optional<at::Tensor>& bias, int64_t out_features,
                          int64_t D, int64_t K, int64_t scale_bits, int64_t act_D, int64_t act_K) {
  const PackedShape s = check_wa_matmul_args(pulses, gain, scale, act_levels, codes, row_scale, levels, bias,
                                             out_features, D, K, scale_bits, act_D, act_K);
  const c10::cuda::CUDAGuard guard(pulses.device());
  const int64_t n = s.cols;
  at::Tensor px = pulses.reshape({-1, n}).contiguous();
  if (reinterpret_cast<uintptr_t>(px.data_ptr()) % 16 != 0) px = px.clone();  // the decoder's vector loads
  const int64_t M = px.size(0), Ga = n / act_D;
  const at::Tensor pg = gain.reshape({M, Ga}).contiguous(), ps = scale.reshape({M}).contiguous();
  const at::Tensor alv = act_levels.contiguous();
  at::Tensor xhat = at::empty({M, n}, px.options().dtype(at::kFloat));
  at::Tensor bad = at::empty({M, Ga}, px.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const CodedActivations in{px.data_ptr<int8_t>(), pg.data_ptr<uint8_t>(),
                            reinterpret_cast<const uint16_t*>(ps.data_ptr<at::Half>()), alv.data_ptr<float>(),
                            int(alv.size(0))};
  C10_CUDA_CHECK(launch_decode_activations(split_tables_on(px), in, M, n, int(act_D), int(act_K),
                                           xhat.data_ptr<float>(), bad.data_ptr<uint8_t>(), stream));
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (M > 0 && capture == cudaStreamCaptureStatusNone && bad.any().item<bool>())
    report_bad_activation_codes(px, pg, act_D, act_K, alv.size(0));
  std::vector<int64_t> sizes(pulses.sizes().begin(), pulses.sizes().end());
  sizes.back() = s.rows;
  return rotated_matmul_cuda(xhat, s, codes, row_scale, levels, bias).reshape(sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(pvq_cuda, CUDA, m) {
  m.impl("encode_activations", &encode_activations_cuda);
  m.impl("wa_matmul", &wa_matmul_cuda);
}

}  // namespace pvq_cuda
