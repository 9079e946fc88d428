#include "hadamard/args.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace pvq_cuda {

namespace {

constexpr const char* kOp = "pvq_cuda.hadamard_transform";

void check_dense(const char* arg, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, kOp, ": ", arg, " must be a dense (strided) tensor, got layout ",
                    t.layout());
  TORCH_CHECK_VALUE(t.device().is_cpu() || t.device().is_cuda(), kOp, ": ", arg,
                    " must be on a CPU or CUDA device, got ", t.device());
}

// Sparse tensors dispatch to the sparse backends, where the op would otherwise fail with the
// dispatcher's "Could not run ... with arguments from the 'SparseCPU' backend": run the checks
// there instead, so the raw op raises the same ValueError as the Python wrapper.
at::Tensor reject_sparse(const at::Tensor& x, const std::optional<at::Tensor>& signs) {
  check_hadamard_args(x, signs);
  TORCH_CHECK_VALUE(false, kOp, ": x and signs must be dense (strided) tensors");
  __builtin_unreachable();
}

}  // namespace

pvq::hadamard::Split check_hadamard_args(const at::Tensor& x, const std::optional<at::Tensor>& signs) {
  check_dense("x", x);
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || (st == at::kDouble && x.is_cpu()),
                   kOp, ": x must be float32, float16 or bfloat16 (float64 on CPU), got ", st, " on ", x.device());
  TORCH_CHECK_VALUE(x.dim() >= 1, kOp, ": x must have shape [..., n], got a 0-d tensor");
  const int64_t n = x.size(-1);
  const pvq::hadamard::Split split = pvq::hadamard::split_size(n);
  TORCH_CHECK_VALUE(split.m != 0, kOp, ": the last dimension n of x must be m * 2^k with m in {1, 12, 20, 28, 36, ",
                    "52, 60}, k >= 0 and n <= ", pvq::hadamard::kMaxN,
                    " (e.g. 4096, 576 = 36*16, 1536 = 12*128, 40 = 20*2), got n=", n);
  if (signs.has_value()) {
    const at::Tensor& s = *signs;
    check_dense("signs", s);
    TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat || s.scalar_type() == at::kChar, kOp,
                     ": signs must be float32 or int8, got ", s.scalar_type());
    TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == n, kOp, ": signs must have shape [n] = [", n,
                      "] (one ±1 per element of the last dimension of x), got ", s.sizes());
    TORCH_CHECK_VALUE(s.device() == x.device(), kOp, ": signs must be on the same device as x (", x.device(),
                      "), got ", s.device());
  }
  return split;
}

at::Tensor signs_as_float(const std::optional<at::Tensor>& signs) {
  if (!signs.has_value()) return at::Tensor();
  return signs->to(at::kFloat).contiguous();
}

TORCH_LIBRARY_IMPL(pvq_cuda, SparseCPU, m) { m.impl("hadamard_transform", &reject_sparse); }
TORCH_LIBRARY_IMPL(pvq_cuda, SparseCUDA, m) { m.impl("hadamard_transform", &reject_sparse); }
TORCH_LIBRARY_IMPL(pvq_cuda, SparseCsrCPU, m) { m.impl("hadamard_transform", &reject_sparse); }
TORCH_LIBRARY_IMPL(pvq_cuda, SparseCsrCUDA, m) { m.impl("hadamard_transform", &reject_sparse); }

}  // namespace pvq_cuda
