// CUDA glue of hadamard_transform: argument checks (shared with the CPU path), layout (contiguous,
// 16-byte aligned rows for the vector loads), the device's shared-memory limit, and the launch on
// the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "common/cuda_glue.h"
#include "hadamard/args.h"
#include "hadamard/cuda_glue.h"
#include "hadamard/launchers.h"

namespace pvq_cuda {
namespace {

at::Tensor hadamard_transform_cuda(const at::Tensor& x, const std::optional<at::Tensor>& signs) {
  check_hadamard_args(x, signs);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(-1);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return out;

  check_hadamard_fits("pvq_cuda.hadamard_transform", n, x.device());

  at::Tensor x2 = x.reshape({-1, n}).contiguous();
  // A contiguous view can still start at an odd offset (x[1:] of a contiguous tensor); the kernel's
  // 16-byte loads need an aligned start, which a fresh allocation has.
  if (reinterpret_cast<uintptr_t>(x2.data_ptr()) % 16 != 0) x2 = x2.clone(at::MemoryFormat::Contiguous);
  const at::Tensor s = signs_as_float(signs);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(launch_hadamard(x2.data_ptr(), out.data_ptr(), float_kind_of(x2.scalar_type()), s.defined() ? s.data_ptr<float>() : nullptr,
                                 x2.size(0), n, stream));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pvq_cuda, CUDA, m) { m.impl("hadamard_transform", &hadamard_transform_cuda); }

}  // namespace pvq_cuda
