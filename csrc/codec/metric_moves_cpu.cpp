// CPU kernel of _metric_moves, one pass of the metric pulse search (codec/metric_moves.h). Rows
// are independent; a row's D² candidate moves are scored in registers instead of the [rows, D, D]
// float64 tensors the torch scoring builds (quantization/quantize.py), which on a 2-core CPU spent
// most of a searched layer's time in memory traffic and per-op overhead.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "codec/args.h"
#include "codec/metric_moves.h"
#include "common/dispatch.h"

namespace pvq_cuda {
namespace {

// Rows per task: at least 2^17 candidate scores (512 rows at D=16, a few tenths of a millisecond on
// one core), so the small later passes, which rescan the few rows that moved, stay on the calling
// thread.
constexpr int64_t kGrainScores = int64_t(1) << 17;

std::tuple<at::Tensor, at::Tensor> metric_moves_cpu(const at::Tensor& pulses, const at::Tensor& w_metric,
                                                    const at::Tensor& y_metric, const at::Tensor& fit_num,
                                                    const at::Tensor& fit_den, const at::Tensor& w_sign,
                                                    const at::Tensor& metric) {
  check_metric_moves_args(pulses, w_metric, y_metric, fit_num, fit_den, w_sign, metric);
  const int64_t rows = pulses.size(0), D = pulses.size(1);
  const at::Tensor y = pulses.contiguous(), Mw = w_metric.contiguous(), My = y_metric.contiguous();
  const at::Tensor num = fit_num.contiguous(), den = fit_den.contiguous(), sgn = w_sign.contiguous();
  const at::Tensor M = metric.contiguous();
  at::Tensor better = at::empty({rows}, pulses.options().dtype(at::kBool));
  at::Tensor moved = at::empty({rows, D}, pulses.options());
  const double *py = y.data_ptr<double>(), *pMw = Mw.data_ptr<double>(), *pMy = My.data_ptr<double>();
  const double *pnum = num.data_ptr<double>(), *pden = den.data_ptr<double>(), *ps = sgn.data_ptr<double>();
  const double* pM = M.data_ptr<double>();
  bool* pb = better.data_ptr<bool>();
  double* po = moved.data_ptr<double>();
  pvq::dispatch_group_size(int(D), [&](auto Dc) {
    constexpr int N = decltype(Dc)::value;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainScores / (N * N)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t o = r * N;
        pb[r] = pvq::best_pulse_move<N>(py + o, pMw + o, pMy + o, pnum[r], pden[r], ps + o, pM, po + o);
      }
    });
  });
  return {better, moved};
}

}  // namespace

TORCH_LIBRARY_IMPL(pvq_cuda, CPU, m) { m.impl("_metric_moves", &metric_moves_cpu); }

}  // namespace pvq_cuda
