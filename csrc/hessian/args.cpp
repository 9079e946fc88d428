#include "hessian/args.h"

#include <c10/util/Exception.h>

namespace pvq_cuda {

int64_t check_hessian_args(const at::Tensor& H, const at::Tensor& x) {
  const char* op = "pvq_cuda.hessian_accumulate_";
  TORCH_CHECK_TYPE(H.scalar_type() == at::kFloat, op, ": H must be float32, got ", H.scalar_type());
  TORCH_CHECK_VALUE(H.dim() == 2 && H.size(0) == H.size(1) && H.size(0) >= 1, op,
                    ": H must be a square [n, n] matrix, got ", H.sizes());
  TORCH_CHECK_VALUE(H.is_contiguous(), op, ": H must be contiguous (it is updated in place)");
  const int64_t n = H.size(0);
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
                   ": x must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == n, op, ": x must have shape [..., ", n, "] to match H, got ",
                    x.sizes());
  TORCH_CHECK_VALUE(x.device() == H.device(), op, ": x is on ", x.device(), " but H is on ", H.device());
  return n;
}

}  // namespace pvq_cuda
