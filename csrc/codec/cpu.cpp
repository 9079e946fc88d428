// CPU kernels of the codec ops: the reference path. Work is split over groups with
// at::parallel_for; each group runs the shared split-order code of codec/pyramid.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "common/dispatch.h"
#include "codec/split_tables.h"
#include "codec/args.h"

namespace pvq_cuda {
namespace {

// Groups per task: ~0.1-0.3 ms of decode on one core, so small calls stay on the calling thread
// (an OpenMP fork costs a scheduler slice when the cores are shared, see packed/cpu.cpp).
constexpr int64_t kGrain = int64_t(1) << 15;

std::vector<int64_t> with_last(at::IntArrayRef leading, int64_t last) {
  std::vector<int64_t> s(leading.begin(), leading.end());
  s.push_back(last);
  return s;
}

at::Tensor search_cpu(const at::Tensor& x, int64_t K) {
  check_search_args(x, K);
  const int64_t D = x.size(-1);
  const at::Tensor x2 = x.reshape({-1, D}).contiguous();
  const int64_t groups = x2.size(0);
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kChar));
  int8_t* po = out.data_ptr<int8_t>();
  std::atomic<bool> nonfinite{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x2.scalar_type(), "pvq_search_cpu", [&] {
    const scalar_t* px = x2.data_ptr<scalar_t>();
    pvq::dispatch_group_size(int(D), [&](auto Dc) {
      constexpr int N = decltype(Dc)::value;
      at::parallel_for(0, groups, kGrain / N, [&](int64_t begin, int64_t end) {
        for (int64_t g = begin; g < end; ++g) {
          const scalar_t* row = px + g * N;
          if (!pvq::search_group<N>([&](int j) { return float(row[j]); }, int(K), po + g * N))
            nonfinite.store(true, std::memory_order_relaxed);
        }
      });
    });
  });
  if (nonfinite.load()) report_nonfinite(x2);
  return out;
}

at::Tensor encode_cpu(const at::Tensor& pulses, int64_t K) {
  check_encode_args(pulses, K);
  const int64_t D = pulses.size(-1);
  const at::Tensor p = pulses_as_int8(pulses, K);
  const int64_t groups = p.size(0);
  const at::IntArrayRef lead = pulses.sizes().slice(0, pulses.dim() - 1);
  at::Tensor out = at::empty(lead, pulses.options().dtype(at::kLong));
  const int8_t* pp = p.data_ptr<int8_t>();
  int64_t* po = out.data_ptr<int64_t>();
  const pvq::SplitTables t = pvq::host_split_tables().view();
  std::atomic<bool> bad{false};
  pvq::dispatch_group_size(int(D), [&](auto Dc) {
    constexpr int N = decltype(Dc)::value;
    at::parallel_for(0, groups, kGrain / N, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const int8_t* y = pp + g * N;
        if (pvq::abs_sum<N>(y) != K) {
          po[g] = -1;
          bad.store(true, std::memory_order_relaxed);
        } else {
          po[g] = int64_t(pvq::encode_node<N>(t, y, int(K)));
        }
      }
    });
  });
  if (bad.load()) report_bad_pulses(p, K);
  return out;
}

at::Tensor decode_cpu(const at::Tensor& index, int64_t D, int64_t K) {
  const uint64_t V = check_decode_args(index, D, K);
  const at::Tensor idx = index.contiguous();
  const int64_t groups = idx.numel();
  at::Tensor out = at::empty(with_last(index.sizes(), D), index.options().dtype(at::kChar));
  const int64_t* pi = idx.data_ptr<int64_t>();
  int8_t* po = out.data_ptr<int8_t>();
  const pvq::SplitTables t = pvq::host_split_tables().view();
  std::atomic<bool> bad{false};
  pvq::dispatch_group_size(int(D), [&](auto Dc) {
    constexpr int N = decltype(Dc)::value;
    at::parallel_for(0, groups, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const uint64_t i = uint64_t(pi[g]);
        if (i >= V) {  // negative indices wrap to >= 2^63 >= V
          for (int j = 0; j < N; ++j) po[g * N + j] = 0;
          bad.store(true, std::memory_order_relaxed);
        } else {
          pvq::decode_node<N>(t, i, int(K), po + g * N);
        }
      }
    });
  });
  if (bad.load()) report_bad_index(idx.reshape({-1}), V, D, K);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pvq_cuda, CPU, m) {
  m.impl("search", &search_cpu);
  m.impl("encode", &encode_cpu);
  m.impl("decode", &decode_cpu);
}

}  // namespace pvq_cuda
