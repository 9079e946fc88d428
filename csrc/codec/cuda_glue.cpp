// CUDA glue of the codec ops: argument checks (shared with the CPU path), allocation, the current
// stream, and error reporting. Kernels flag bad data in a status word; outside CUDA-graph capture
// the glue reads it back (one 4-byte copy) and raises the same ValueError as the CPU path. During
// capture it cannot synchronize, so bad rows come out as documented sentinels instead
// (decode: zero pulses; encode: -1; search: zero pulses).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "codec/args.h"
#include "codec/launchers.h"
#include "common/cuda_glue.h"

namespace pvq_cuda {
namespace {

bool status_flagged(const at::Tensor& status, cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return false;
  return status.item<int>() != kStatusOk;
}

at::Tensor search_cuda(const at::Tensor& x, int64_t K) {
  check_search_args(x, K);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t D = x.size(-1);
  const at::Tensor x2 = x.reshape({-1, D}).contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor status = at::zeros({1}, x.options().dtype(at::kInt));
  const FloatKind kind = float_kind_of(x2.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(launch_search(x2.data_ptr(), kind, out.data_ptr<int8_t>(), x2.size(0), int(D), int(K),
                               status.data_ptr<int>(), stream));
  if (status_flagged(status, stream)) report_nonfinite(x2);
  return out;
}

at::Tensor encode_cuda(const at::Tensor& pulses, int64_t K) {
  check_encode_args(pulses, K);
  const c10::cuda::CUDAGuard guard(pulses.device());
  const int64_t D = pulses.size(-1);
  const at::Tensor p = pulses_as_int8(pulses, K);
  at::Tensor out = at::empty(pulses.sizes().slice(0, pulses.dim() - 1), pulses.options().dtype(at::kLong));
  at::Tensor status = at::zeros({1}, pulses.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(launch_encode(split_tables_on(p), p.data_ptr<int8_t>(), out.data_ptr<int64_t>(), p.size(0), int(D),
                               int(K), status.data_ptr<int>(), stream));
  if (status_flagged(status, stream)) report_bad_pulses(p, K);
  return out;
}

at::Tensor decode_cuda(const at::Tensor& index, int64_t D, int64_t K) {
  const uint64_t V = check_decode_args(index, D, K);
  const c10::cuda::CUDAGuard guard(index.device());
  const at::Tensor idx = index.contiguous();
  std::vector<int64_t> sizes(index.sizes().begin(), index.sizes().end());
  sizes.push_back(D);
  at::Tensor out = at::empty(sizes, index.options().dtype(at::kChar));
  at::Tensor status = at::zeros({1}, index.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(launch_decode(split_tables_on(idx), idx.data_ptr<int64_t>(), out.data_ptr<int8_t>(), idx.numel(),
                               int(D), int(K), V, status.data_ptr<int>(), stream));
  if (status_flagged(status, stream)) report_bad_index(idx.reshape({-1}), V, D, K);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pvq_cuda, CUDA, m) {
  m.impl("search", &search_cuda);
  m.impl("encode", &encode_cuda);
  m.impl("decode", &decode_cuda);
}

}  // namespace pvq_cuda
