// CUDA glue of hessian_accumulate_: 16-bit activations go to the tensor-core kernel; fp32
// activations (no exact tensor-core path) to an fp64 cuBLAS GEMM.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "hessian/args.h"
#include "common/cuda_glue.h"
#include "hessian/launchers.h"

namespace pvq_cuda {
namespace {

void hessian_accumulate_cuda(const at::Tensor& H, const at::Tensor& x) {
  const int64_t n = check_hessian_args(H, x);
  const c10::cuda::CUDAGuard guard(H.device());
  const at::Tensor x2 = x.reshape({-1, n}).contiguous();
  if (x2.size(0) == 0) return;
  if (x2.scalar_type() == at::kFloat) {
    const at::Tensor xd = x2.to(at::kDouble);
    H.copy_(at::addmm(H.to(at::kDouble), xd.t(), xd));
    return;
  }
  const FloatKind kind = float_kind_of(x2.scalar_type());
  C10_CUDA_CHECK(launch_hessian_accumulate(H.data_ptr<float>(), x2.data_ptr(), kind, x2.size(0), int(n),
                                           c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(pvq_cuda, CUDA, m) { m.impl("hessian_accumulate_", &hessian_accumulate_cuda); }

}  // namespace pvq_cuda
