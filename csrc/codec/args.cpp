#include "codec/args.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "codec/split_tables.h"

namespace pvq_cuda {

uint64_t check_codec_limits(const char* op, int64_t D, int64_t K) {
  TORCH_CHECK_VALUE(pvq::group_level(D) >= 0, op, ": D must be one of 1, 2, 4, 8, 16, 32, got D=", D);
  TORCH_CHECK_VALUE(K >= 1 && K <= pvq::kMaxK, op, ": K must be in [1, ", pvq::kMaxK, "], got K=", K);
  const uint64_t V = pvq::pyramid_count(D, K);
  TORCH_CHECK_VALUE(V != pvq::kSaturated && pvq::index_bits(V) <= pvq::kMaxIndexBits, op,
                    ": ceil(log2 V(D,K)) must be <= ", pvq::kMaxIndexBits, " so that an index fits int64, ",
                    "but V(", D, ",", K, ") needs more bits; lower K");
  return V;
}

namespace {

void check_dense(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, op, ": ", arg, " must be a dense (strided) tensor");
  TORCH_CHECK_VALUE(t.device().is_cpu() || t.device().is_cuda(), op, ": ", arg,
                    " must be on a CPU or CUDA device, got ", t.device());
}

}  // namespace

uint64_t check_search_args(const at::Tensor& x, int64_t K) {
  check_dense("pvq_cuda.search", "x", x);
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
                   "pvq_cuda.search: x must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK_VALUE(x.dim() >= 1, "pvq_cuda.search: x must have shape [..., D], got a 0-d tensor");
  return check_codec_limits("pvq_cuda.search", x.size(-1), K);
}

uint64_t check_encode_args(const at::Tensor& pulses, int64_t K) {
  check_dense("pvq_cuda.encode", "pulses", pulses);
  const auto st = pulses.scalar_type();
  TORCH_CHECK_TYPE(st == at::kChar || st == at::kShort || st == at::kInt || st == at::kLong,
                   "pvq_cuda.encode: pulses must be int8, int16, int32 or int64, got ", st);
  TORCH_CHECK_VALUE(pulses.dim() >= 1, "pvq_cuda.encode: pulses must have shape [..., D], got a 0-d tensor");
  return check_codec_limits("pvq_cuda.encode", pulses.size(-1), K);
}

uint64_t check_decode_args(const at::Tensor& index, int64_t D, int64_t K) {
  check_dense("pvq_cuda.decode", "index", index);
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "pvq_cuda.decode: index must be int64, got ",
                   index.scalar_type());
  return check_codec_limits("pvq_cuda.decode", D, K);
}

void check_metric_moves_args(const at::Tensor& pulses, const at::Tensor& w_metric, const at::Tensor& y_metric,
                             const at::Tensor& fit_num, const at::Tensor& fit_den, const at::Tensor& w_sign,
                             const at::Tensor& metric) {
  constexpr const char* op = "pvq_cuda._metric_moves";
  TORCH_CHECK_VALUE(pulses.dim() == 2, op, ": pulses must have shape [rows, D], got ", pulses.sizes());
  const int64_t rows = pulses.size(0), D = pulses.size(1);
  TORCH_CHECK_VALUE(pvq::group_level(D) >= 0, op, ": D must be one of 1, 2, 4, 8, 16, 32, got D=", D);
  const std::pair<const char*, const at::Tensor*> args[] = {
      {"pulses", &pulses}, {"w_metric", &w_metric}, {"y_metric", &y_metric}, {"fit_num", &fit_num},
      {"fit_den", &fit_den}, {"w_sign", &w_sign}, {"metric", &metric}};
  for (const auto& [name, t] : args) {
    check_dense(op, name, *t);
    TORCH_CHECK_TYPE(t->scalar_type() == at::kDouble, op, ": ", name, " must be float64, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t->device());
  }
  for (const auto& [name, t] : {args[1], args[2], args[5]})
    TORCH_CHECK_VALUE(t->sizes() == pulses.sizes(), op, ": ", name, " must have the shape of pulses [", rows, ", ", D,
                      "], got ", t->sizes());
  for (const auto& [name, t] : {args[3], args[4]})
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == rows, op, ": ", name, " must have shape [", rows, "], got ",
                      t->sizes());
  TORCH_CHECK_VALUE(metric.dim() == 2 && metric.size(0) == D && metric.size(1) == D, op, ": metric must have shape [",
                    D, ", ", D, "], got ", metric.sizes());
}

at::Tensor pulses_as_int8(const at::Tensor& pulses, int64_t K) {
  at::Tensor p = pulses.reshape({-1, pulses.size(-1)});
  if (p.scalar_type() != at::kChar) {
    // Narrowing first would wrap 256 to 0 and hide the error: check the range in the wide type.
    const at::Tensor bad = (p < -K) | (p > K);
    if (bad.any().item<bool>()) report_bad_pulses(p, K);
    p = p.to(at::kChar);
  }
  return p.contiguous();
}

void report_nonfinite(const at::Tensor& x2d) {
  const int64_t row = at::logical_not(at::isfinite(x2d)).any(1).nonzero().select(1, 0)[0].item<int64_t>();
  TORCH_CHECK_VALUE(false, "pvq_cuda.search: x must be finite, but group ", row, " (of ", x2d.size(0),
                    ", flattened over the leading dims) holds NaN or Inf");
  __builtin_unreachable();
}

void report_bad_pulses(const at::Tensor& pulses2d, int64_t K) {
  const at::Tensor sums = pulses2d.to(at::kLong).abs().sum(1);
  const at::Tensor bad = (sums != K) | ((pulses2d < -K) | (pulses2d > K)).any(1);
  const int64_t row = bad.nonzero().select(1, 0)[0].item<int64_t>();
  TORCH_CHECK_VALUE(false, "pvq_cuda.encode: every row of pulses must satisfy sum |y| == K=", K,
                    ", but row ", row, " (flattened over the leading dims) has sum |y| = ",
                    sums[row].item<int64_t>());
  __builtin_unreachable();
}

void report_bad_index(const at::Tensor& index1d, uint64_t V, int64_t D, int64_t K) {
  const at::Tensor bad = (index1d < 0) | (index1d > int64_t(V - 1));
  const int64_t pos = bad.nonzero().select(1, 0)[0].item<int64_t>();
  TORCH_CHECK_VALUE(false, "pvq_cuda.decode: index must be in [0, V(", D, ",", K, ") = ", V,
                    "), but element ", pos, " (flattened) is ", index1d[pos].item<int64_t>());
  __builtin_unreachable();
}

}  // namespace pvq_cuda
