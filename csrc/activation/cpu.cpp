// CPU kernels of the activation ops: the online activation encoder (rotate, search, index, gain per
// token; activation/activation_code.h defines every step) and the W+A matmul, whose group dot
// products are integer (int8 pulses, int16 products, int32 sums) times float gain products.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "activation/activation_code.h"
#include "activation/args.h"
#include "codec/split_tables.h"
#include "common/dispatch.h"
#include "hadamard/args.h"
#include "hadamard/hadamard_matrix.h"
#include "hadamard/row_transform.h"
#include "packed/packed_layer.h"

namespace pvq_cuda {
namespace {

// Tokens are widened to fp32 in blocks of about this many elements (ATen's vectorized conversion),
// as the Hadamard kernel does; each task takes at least ~kGrainElements of them.
constexpr int64_t kBlockElements = 65536;
constexpr int64_t kGrainElements = 16384;

// Flags per token (reported by report_bad_token).
constexpr int kNonFinite = 1, kScaleOverflow = 2;

template <int D>
void encode_rows(const ActivationShape& s, const pvq::SplitTables& tables, const float* signs, const float* lv,
                 const at::Tensor& x2, int8_t* pulses, int64_t* index, uint8_t* gain, uint16_t* scale, int* flags) {
  const int64_t n = s.n, G = s.groups;
  const float tscale = pvq::hadamard::transform_scale(n);
  float mid[256];
  pvq::act::midpoints(lv, s.levels, mid);
  at::parallel_for(0, s.tokens, std::max<int64_t>(1, kGrainElements / n), [&](int64_t begin, int64_t end) {
    const int64_t block_rows = std::min(end - begin, std::max<int64_t>(1, kBlockElements / n));
    at::Tensor block = at::empty({block_rows, n}, x2.options().dtype(at::kFloat));
    std::vector<float> tmp(n), gains(G);
    std::vector<double> energy(G), num(G), den(G);
    for (int64_t r0 = begin; r0 < end; r0 += block_rows) {
      const int64_t rc = std::min(block_rows, end - r0);
      at::Tensor b = block.narrow(0, 0, rc);
      b.copy_(x2.narrow(0, r0, rc));  // widen to fp32 (any input strides)
      for (int64_t r = 0; r < rc; ++r) {
        const int64_t t = r0 + r;
        float* v = b.data_ptr<float>() + r * n;
        pvq::hadamard::rotate_row(v, signs, s.split.m, s.split.log_p, tscale, tmp.data());
        int8_t* y = pulses + t * n;
        bool finite = true;
        for (int64_t j = 0; j < G && finite; ++j) {
          uint64_t idx = 0;
          finite = pvq::act::code_group<D>(tables, v + j * D, s.K, y + j * D, &idx, &gains[j], &energy[j]);
          index[t * G + j] = int64_t(idx);
        }
        if (!finite) {
          std::fill(y, y + n, int8_t(0));
          std::fill(index + t * G, index + (t + 1) * G, int64_t(0));
          std::fill(gain + t * G, gain + (t + 1) * G, uint8_t(0));
          scale[t] = 0;
          flags[t] = kNonFinite;
          continue;
        }
        const float norm = float(std::sqrt(pvq::act::tree_sum(energy.data(), int(G))));
        for (int64_t j = 0; j < G; ++j) {
          const int c = pvq::act::gain_code(gains[j], norm, mid, s.levels);
          gain[t * G + j] = uint8_t(c);
          num[j] = pvq::act::dmul_rn(double(lv[c]), double(gains[j]));
          den[j] = pvq::act::dmul_rn(double(lv[c]), double(lv[c]));
        }
        const uint16_t h = pvq::act::token_scale_bits(pvq::act::tree_sum(num.data(), int(G)),
                                                      pvq::act::tree_sum(den.data(), int(G)));
        scale[t] = h;
        if ((h & 0x7c00u) == 0x7c00u) flags[t] = kScaleOverflow;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> encode_activations_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& signs, const at::Tensor& levels, int64_t D, int64_t K,
    int64_t gain_bits) {
  const ActivationShape s = check_encode_activations_args(x, signs, levels, D, K, gain_bits);
  const std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  std::vector<int64_t> gshape = lead;
  gshape.push_back(s.groups);
  at::Tensor pulses = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor index = at::empty(gshape, x.options().dtype(at::kLong));
  at::Tensor gain = at::empty(gshape, x.options().dtype(at::kByte));
  at::Tensor scale = at::empty(lead, x.options().dtype(at::kHalf));
  if (s.tokens == 0) return {pulses, index, gain, scale};
  const at::Tensor x2 = x.reshape({-1, s.n});
  const at::Tensor sg = signs_as_float(signs);
  const at::Tensor lv = levels.contiguous();
  at::Tensor flags = at::zeros({s.tokens}, x.options().dtype(at::kInt));
  const pvq::SplitTables tables = pvq::host_split_tables().view();
  pvq::dispatch_group_size(s.D, [&](auto Dc) {
    constexpr int N = decltype(Dc)::value;
    encode_rows<N>(s, tables, sg.defined() ? sg.data_ptr<float>() : nullptr, lv.data_ptr<float>(), x2,
                   pulses.data_ptr<int8_t>(), index.data_ptr<int64_t>(), gain.data_ptr<uint8_t>(),
                   reinterpret_cast<uint16_t*>(scale.data_ptr<at::Half>()), flags.data_ptr<int>());
  });
  if (flags.any().item<bool>()) report_bad_token(x2, flags);
  return {pulses, index, gain, scale};
}

// ------------------------------------------------------------------------------------------------
// W+A matmul. Both operands are pulses with a float factor per group: the weight group (r, j)
// decodes to fw · y_w with fw = level[gain] / |y_w| (times the row scale), the activation group to
// fx · y_x with fx = a · act_level[c] / |y_x|. With d = min(D, act_D) every block of d columns lies
// in one group of each, so
//     out[t, r] = row_scale[r] · Σ_blocks (fx · fw) · <y_x, y_w>_block,
// the block dot product exact in integers (|y| <= 127: int16 products, int32 sums).
// ------------------------------------------------------------------------------------------------

// Activation factors fx [M, G_a] and the checks that pulses and codes are valid: false when a
// group's sum |y| != act_K or a gain code is past the levels (the caller reports which).
bool activation_factors(const int8_t* px, const uint8_t* pg, const uint16_t* ps, const float* lv, int nlevels,
                        int64_t M, int64_t n, int act_D, int act_K, float* fx) {
  const pvq::SplitTables tables = pvq::host_split_tables().view();
  const int64_t Ga = n / act_D;
  std::atomic<bool> bad{false};
  at::parallel_for(0, M, std::max<int64_t>(1, kGrainElements / n), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float a = pvq::half_bits_to_float(ps[t]);
      for (int64_t j = 0; j < Ga; ++j) {
        const int8_t* y = px + t * n + j * act_D;
        int k = 0, sq = 0;
        for (int d = 0; d < act_D; ++d) {
          k += y[d] < 0 ? -int(y[d]) : int(y[d]);
          sq += int(y[d]) * int(y[d]);
        }
        const int c = pg[t * Ga + j];
        if (k != act_K || c >= nlevels) {
          bad.store(true, std::memory_order_relaxed);
          fx[t * Ga + j] = 0.f;
          continue;
        }
        fx[t * Ga + j] = pvq::act::group_factor(a, lv[c], tables, sq);
      }
    }
  });
  return !bad.load();
}

// One tile: wt [n][32] the decoded weight pulses (column-major in the lanes), fw [G][32] the weight
// factors, for M tokens; acc [M][32]. kBlock = min(D, act_D) columns share both factors.
template <int kBlock>
__attribute__((always_inline)) inline void wa_tile(const int8_t* wt, const float* fw, int w_shift, const int8_t* px,
                                                   const float* fx, int a_shift, int64_t Ga, int64_t M, int64_t n,
                                                   float* acc) {
  constexpr int L = pvq::kTileRows;
  const int64_t blocks = n / kBlock;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* x = px + m * n;
    const float* f = fx + m * Ga;
    float a[L] = {};
    for (int64_t b = 0; b < blocks; ++b) {
      int32_t dot[L] = {};
      for (int d = 0; d < kBlock; ++d) {
        const int16_t xv = x[b * kBlock + d];
        const int8_t* w = wt + (b * kBlock + d) * L;
        for (int l = 0; l < L; ++l) dot[l] += int16_t(xv * int16_t(w[l]));  // |product| <= 127 * 128
      }
      const float fxb = f[b >> a_shift];
      const float* fwb = fw + (b >> w_shift) * L;
      for (int l = 0; l < L; ++l) a[l] = pvq::act::add_rn(a[l], pvq::act::mul_rn(pvq::act::mul_rn(fxb, fwb[l]),
                                                                                 float(dot[l])));
    }
    std::copy(a, a + L, acc + m * L);
  }
}

// The tile loop compiled twice: for AVX2 (16 int16 lanes: ~18 G multiply-adds/s per core on the
// dev machine's EPYC, against ~2-6 for the SSE2 baseline the package is built for) and for any
// x86-64, picked at run time. Both round identically (no FMA: activation_code.h).
template <int kBlock>
__attribute__((noinline)) void wa_tile_baseline(const int8_t* wt, const float* fw, int w_shift, const int8_t* px,
                                                const float* fx, int a_shift, int64_t Ga, int64_t M, int64_t n,
                                                float* acc) {
  wa_tile<kBlock>(wt, fw, w_shift, px, fx, a_shift, Ga, M, n, acc);
}

#if defined(__x86_64__)
template <int kBlock>
__attribute__((target("avx2"), noinline)) void wa_tile_avx2(const int8_t* wt, const float* fw, int w_shift,
                                                            const int8_t* px, const float* fx, int a_shift, int64_t Ga,
                                                            int64_t M, int64_t n, float* acc) {
  wa_tile<kBlock>(wt, fw, w_shift, px, fx, a_shift, Ga, M, n, acc);
}

template <int kBlock>
auto wa_tile_for_this_cpu() {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  return avx2 ? wa_tile_avx2<kBlock> : wa_tile_baseline<kBlock>;
}
#else
template <int kBlock>
auto wa_tile_for_this_cpu() {
  return wa_tile_baseline<kBlock>;
}
#endif

int log2_int(int v) { return v <= 1 ? 0 : __builtin_ctz(unsigned(v)); }

at::Tensor wa_matmul_cpu(const at::Tensor& pulses, const at::Tensor& gain, const at::Tensor& scale,
                         const at::Tensor& act_levels, const at::Tensor& codes, const at::Tensor& row_scale,
                         const at::Tensor& levels, const std::optional<at::Tensor>& bias, int64_t out_features,
                         int64_t D, int64_t K, int64_t scale_bits, int64_t act_D, int64_t act_K) {
  const PackedShape s = check_wa_matmul_args(pulses, gain, scale, act_levels, codes, row_scale, levels, bias,
                                             out_features, D, K, scale_bits, act_D, act_K);
  const int64_t n = s.cols;
  const at::Tensor px = pulses.reshape({-1, n}).contiguous();
  const int64_t M = px.size(0), Ga = n / act_D;
  const at::Tensor pg = gain.reshape({M, Ga}).contiguous(), ps = scale.reshape({M}).contiguous();
  const at::Tensor alv = act_levels.contiguous();
  at::Tensor fx = at::empty({M, Ga}, px.options().dtype(at::kFloat));
  if (!activation_factors(px.data_ptr<int8_t>(), pg.data_ptr<uint8_t>(),
                          reinterpret_cast<const uint16_t*>(ps.data_ptr<at::Half>()), alv.data_ptr<float>(),
                          int(alv.size(0)), M, n, int(act_D), int(act_K), fx.data_ptr<float>()))
    report_bad_activation_codes(px, pg, act_D, act_K, alv.size(0));
  const at::Tensor c = codes.contiguous(), lv = levels.contiguous(), rs = row_scale.contiguous();
  const pvq::PackedLayer layer = packed_view(s, c, rs, lv);
  at::Tensor out = at::empty({M, s.rows}, px.options().dtype(at::kFloat));
  std::atomic<bool> corrupt{false};
  const int block = int(std::min(D, act_D));
  const int w_shift = log2_int(int(D) / block), a_shift = log2_int(int(act_D) / block);
  const pvq::SplitTables tables = pvq::host_split_tables().view();
  float* po = out.data_ptr<float>();
  const int8_t* xp = px.data_ptr<int8_t>();
  const float* fxp = fx.data_ptr<float>();
  constexpr int L = pvq::kTileRows;
  // One task per tile at least; a tile's work is M * 32 * n multiply-adds.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, M * L * n));
  at::parallel_for(0, M ? s.tiles : 0, grain, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> wt(n * L);
    std::vector<float> fw(s.groups * L), acc(M * L);
    for (int64_t t = begin; t < end; ++t) {
      const int rows_here = int(std::min<int64_t>(L, s.rows - t * L));
      std::fill(wt.begin(), wt.end(), int8_t(0));
      std::fill(fw.begin(), fw.end(), 0.f);
      pvq::dispatch_group_size(s.D, [&](auto Dc) {
        constexpr int N = decltype(Dc)::value;
        for (int64_t j = 0; j < s.groups; ++j) {
          const uint32_t* chunk = layer.words + (t * s.groups + j) * s.bits;
          for (int l = 0; l < rows_here; ++l) {
            int8_t y[N];
            const uint64_t code = pvq::chunk_code(chunk, l, s.bits);
            if (!pvq::code_valid(layer, code)) corrupt.store(true, std::memory_order_relaxed);
            fw[j * L + l] = pvq::decode_group<N>(tables, layer, code, y);
            for (int d = 0; d < N; ++d) wt[(j * N + d) * L + l] = y[d];
          }
        }
      });
      pvq::dispatch_group_size(block, [&](auto Bc) {
        constexpr int B = decltype(Bc)::value;
        wa_tile_for_this_cpu<B>()(wt.data(), fw.data(), w_shift, xp, fxp, a_shift, Ga, M, n, acc.data());
      });
      for (int l = 0; l < rows_here; ++l) {
        const int64_t row = t * L + l;
        const float rsf = pvq::half_bits_to_float(layer.row_scale[row]);
        for (int64_t m = 0; m < M; ++m) po[m * s.rows + row] = pvq::act::mul_rn(acc[m * L + l], rsf);
      }
    }
  });
  TORCH_CHECK_VALUE(!corrupt.load(), "pvq_cuda.wa_matmul: codes hold a group index >= V(D=", s.D, ", K=", s.K, ") = ",
                    s.count, ": they are corrupt or were packed for another D, K or scale_bits");
  if (bias) out.add_(bias->to(at::kFloat));
  std::vector<int64_t> sizes(pulses.sizes().begin(), pulses.sizes().end());
  sizes.back() = s.rows;
  return out.reshape(sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(pvq_cuda, CPU, m) {
  m.impl("encode_activations", &encode_activations_cpu);
  m.impl("wa_matmul", &wa_matmul_cpu);
}

}  // namespace pvq_cuda
