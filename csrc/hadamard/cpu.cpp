// CPU kernel of hadamard_transform: the reference path. Rows are split over threads with
// at::parallel_for; each row is widened to fp32 once (float64 rows stay float64), transformed by
// hadamard/row_transform.h, and rounded to the output dtype once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "hadamard/hadamard_matrix.h"
#include "hadamard/row_transform.h"
#include "hadamard/args.h"

namespace pvq_cuda {
namespace {

// About 16K elements per task (~30 µs of work on one core): enough to amortize a task's start.
constexpr int64_t kGrainElements = 16384;
// Rows are widened and narrowed in blocks of about 64K elements (256 KB of fp32, L2-resident) by
// ATen's vectorized dtype conversion: converting one element at a time through c10::Half costs
// more than the whole transform.
constexpr int64_t kBlockElements = 65536;

// T: the arithmetic type, float for float32/16-bit rows (the CUDA kernel's), double for float64.
template <typename T>
void transform_rows(const at::Tensor& x2, const at::Tensor& out2, const float* ps, pvq::hadamard::Split split) {
  const int64_t n = x2.size(1), rows = x2.size(0);
  const float* table = pvq::hadamard::dense_table(split.m);
  // float: the same float 1/sqrt(n) as the CUDA kernel; double: 1/sqrt(n) in double.
  const T scale = std::is_same_v<T, float> ? T(pvq::hadamard::transform_scale(n)) : T(1.0 / std::sqrt(double(n)));
  const int m = split.m, log_p = split.log_p;
  const int64_t P = int64_t(1) << log_p;
  const auto dtype = std::is_same_v<T, float> ? at::kFloat : at::kDouble;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / n), [&](int64_t begin, int64_t end) {
    // hadamard_transform is differentiable through its registered autograd formula: below it, the
    // block's views and in-place writes must not be tracked. Worker threads do not inherit the
    // caller's dispatch state, so each sets it (without this, an input that requires grad and
    // spans several threads' chunks raised "a view was created in no_grad mode ...").
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int64_t block_rows = std::min(end - begin, std::max<int64_t>(1, kBlockElements / n));
    at::Tensor block = at::empty({block_rows, n}, x2.options().dtype(dtype));
    std::vector<T> tmp(m > 1 ? size_t(block_rows * n) : 0);
    for (int64_t r0 = begin; r0 < end; r0 += block_rows) {
      const int64_t rc = std::min(block_rows, end - r0);
      at::Tensor b = block.narrow(0, 0, rc);
      b.copy_(x2.narrow(0, r0, rc));  // widen to T (any input strides)
      T* pb = b.data_ptr<T>();
      for (int64_t r = 0; r < rc; ++r) {
        T* v = pb + r * n;
        if (ps)
          for (int64_t i = 0; i < n; ++i) v[i] *= ps[i];
        pvq::hadamard::sylvester_chunks(v, m, log_p);
      }
      if (m > 1 && P >= 64) {
        // Each row's chunks are long enough to vectorize over b directly.
        for (int64_t r = 0; r < rc; ++r) {
          pvq::hadamard::small_hadamard(table, m, P, pb + r * n, tmp.data());
          std::copy(tmp.begin(), tmp.begin() + n, pb + r * n);
        }
      } else if (m > 1) {
        // Short chunks (576 = 36·16): gather the block to [m][rows·2^p] so that the H_m sweeps run
        // over rc·2^p contiguous columns instead of 2^p. The per-element sums are unchanged.
        const at::Tensor t = b.view({rc, m, P}).transpose(0, 1).contiguous();
        pvq::hadamard::small_hadamard(table, m, rc * P, t.data_ptr<T>(), tmp.data());
        b.view({rc, m, P}).copy_(at::from_blob(tmp.data(), {m, rc, P}, b.options()).transpose(0, 1));
      }
      b.mul_(scale);                    // the same float product as the CUDA kernel's v * scale
      out2.narrow(0, r0, rc).copy_(b);  // round once to the output dtype
    }
  });
}

at::Tensor hadamard_transform_cpu(const at::Tensor& x, const std::optional<at::Tensor>& signs) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in transform_rows' workers
  const pvq::hadamard::Split split = check_hadamard_args(x, signs);
  const int64_t n = x.size(-1);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return out;
  const at::Tensor s = signs_as_float(signs);
  const float* ps = s.defined() ? s.data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kDouble)
    transform_rows<double>(x.reshape({-1, n}), out.view({-1, n}), ps, split);
  else
    transform_rows<float>(x.reshape({-1, n}), out.view({-1, n}), ps, split);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pvq_cuda, CPU, m) { m.impl("hadamard_transform", &hadamard_transform_cpu); }

}  // namespace pvq_cuda
