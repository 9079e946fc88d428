// CPU path of hessian_accumulate_: the Gram matrix in fp64 (BLAS), added to H with one rounding.
// fp64 keeps the result within ~1e-7 of exact at any token count; the CPU is never where large
// calibrations run, so the 2x cost over fp32 is the right trade.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "hessian_args.h"

namespace pvq_cuda {
namespace {

void hessian_accumulate_cpu(const at::Tensor& H, const at::Tensor& x) {
  const int64_t n = check_hessian_args(H, x);
  const at::Tensor x2 = x.reshape({-1, n}).to(at::kDouble);
  if (x2.size(0) == 0) return;
  H.copy_(at::addmm(H.to(at::kDouble), x2.t(), x2));
}

}  // namespace

TORCH_LIBRARY_IMPL(pvq_cuda, CPU, m) { m.impl("hessian_accumulate_", &hessian_accumulate_cpu); }

}  // namespace pvq_cuda
