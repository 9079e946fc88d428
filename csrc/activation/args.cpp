#include "activation/args.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "codec/args.h"
#include "codec/split_tables.h"

namespace pvq_cuda {

namespace {

constexpr const char* kEncode = "pvq_cuda.encode_activations";
constexpr const char* kMatmul = "pvq_cuda.wa_matmul";

void check_dense(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, op, ": ", arg, " must be a dense (strided) tensor, got layout ",
                    t.layout());
  TORCH_CHECK_VALUE(t.device().is_cpu() || t.device().is_cuda(), op, ": ", arg,
                    " must be on a CPU or CUDA device, got ", t.device());
}

void check_levels(const char* op, const char* arg, const at::Tensor& levels, int64_t count, const at::Tensor& x) {
  check_dense(op, arg, levels);
  TORCH_CHECK_TYPE(levels.scalar_type() == at::kFloat, op, ": ", arg, " must be float32, got ", levels.scalar_type());
  TORCH_CHECK_VALUE(levels.dim() == 1 && levels.size(0) == count, op, ": ", arg, " must have shape [", count,
                    "] (2^gain_bits gain levels), got ", levels.sizes());
  TORCH_CHECK_VALUE(levels.device() == x.device(), op, ": ", arg, " must be on ", x.device(), ", got ",
                    levels.device());
}

}  // namespace

ActivationShape check_encode_activations_args(const at::Tensor& x, const std::optional<at::Tensor>& signs,
                                              const at::Tensor& levels, int64_t D, int64_t K, int64_t gain_bits) {
  check_dense(kEncode, "x", x);
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, kEncode,
                   ": x must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK_VALUE(x.dim() >= 1, kEncode, ": x must have shape [..., n], got a 0-d tensor");
  check_codec_limits(kEncode, D, K);
  TORCH_CHECK_VALUE(gain_bits >= 0 && gain_bits <= 8, kEncode, ": gain_bits must be in [0, 8], got ", gain_bits);
  const int64_t n = x.size(-1);
  const pvq::hadamard::Split split = pvq::hadamard::split_size(n);
  TORCH_CHECK_VALUE(split.m != 0, kEncode, ": the hidden size n = x.size(-1) must be a Hadamard size m * 2^k with m in "
                    "{1, 12, 20, 28, 36, 52, 60} and n <= ", pvq::hadamard::kMaxN, ", got n=", n);
  TORCH_CHECK_VALUE(n % D == 0, kEncode, ": the hidden size n = x.size(-1) must be a multiple of D=", D, ", got n=", n);
  if (signs.has_value()) {
    check_dense(kEncode, "signs", *signs);
    TORCH_CHECK_TYPE(signs->scalar_type() == at::kFloat || signs->scalar_type() == at::kChar, kEncode,
                     ": signs must be float32 or int8, got ", signs->scalar_type());
    TORCH_CHECK_VALUE(signs->dim() == 1 && signs->size(0) == n, kEncode, ": signs must have shape [n] = [", n,
                      "], got ", signs->sizes());
    TORCH_CHECK_VALUE(signs->device() == x.device(), kEncode, ": signs must be on ", x.device(), ", got ",
                      signs->device());
  }
  check_levels(kEncode, "levels", levels, int64_t(1) << gain_bits, x);
  return {n ? x.numel() / n : 0, n, n / D, int(D), int(K), int(1 << gain_bits), split};
}

PackedShape check_wa_matmul_args(const at::Tensor& pulses, const at::Tensor& gain, const at::Tensor& scale,
                                 const at::Tensor& act_levels, const at::Tensor& codes, const at::Tensor& row_scale,
                                 const at::Tensor& levels, const std::optional<at::Tensor>& bias, int64_t out_features,
                                 int64_t D, int64_t K, int64_t scale_bits, int64_t act_D, int64_t act_K) {
  check_dense(kMatmul, "pulses", pulses);
  TORCH_CHECK_TYPE(pulses.scalar_type() == at::kChar, kMatmul, ": pulses must be int8, got ", pulses.scalar_type());
  TORCH_CHECK_VALUE(pulses.dim() >= 1, kMatmul, ": pulses must have shape [..., in_features], got a 0-d tensor");
  {
    // The hidden size first, by name: the in_features the layer's codes hold (when they fit).
    const uint64_t V = check_codec_limits(kMatmul, D, K);
    const int64_t bits = pvq::index_bits(V) + scale_bits;
    const int64_t per_group = (out_features + pvq::kTileRows - 1) / pvq::kTileRows * bits;
    if (out_features >= 1 && scale_bits >= 0 && scale_bits <= 8 && per_group > 0 && codes.numel() % per_group == 0) {
      const int64_t in_features = codes.numel() / per_group * D;
      TORCH_CHECK_VALUE(pulses.size(-1) == in_features, kMatmul, ": pulses must have shape [..., ", in_features,
                        "] (the layer's in_features), got ", pulses.sizes());
    }
  }
  const PackedShape s = check_packed_layer(kMatmul, codes, row_scale, levels, out_features, pulses.size(-1), D, K,
                                           scale_bits);
  check_codec_limits(kMatmul, act_D, act_K);
  TORCH_CHECK_VALUE(s.cols % act_D == 0, kMatmul, ": in_features (", s.cols, ") must be a multiple of act_D=", act_D);
  const std::vector<int64_t> lead(pulses.sizes().begin(), pulses.sizes().end() - 1);
  std::vector<int64_t> gshape = lead;
  gshape.push_back(s.cols / act_D);
  check_dense(kMatmul, "gain", gain);
  TORCH_CHECK_TYPE(gain.scalar_type() == at::kByte, kMatmul, ": gain must be uint8, got ", gain.scalar_type());
  TORCH_CHECK_VALUE(gain.sizes() == at::IntArrayRef(gshape), kMatmul, ": gain must have shape ",
                    at::IntArrayRef(gshape), " (one code per group of act_D=", act_D, "), got ", gain.sizes());
  check_dense(kMatmul, "scale", scale);
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kHalf, kMatmul, ": scale must be float16, got ", scale.scalar_type());
  TORCH_CHECK_VALUE(scale.sizes() == at::IntArrayRef(lead), kMatmul, ": scale must have shape ", at::IntArrayRef(lead),
                    " (one per token), got ", scale.sizes());
  TORCH_CHECK_VALUE(act_levels.dim() == 1 && act_levels.size(0) >= 1 && act_levels.size(0) <= 256 &&
                        (act_levels.size(0) & (act_levels.size(0) - 1)) == 0,
                    kMatmul, ": act_levels must have shape [2^gain_bits], gain_bits in [0, 8], got ",
                    act_levels.sizes());
  check_levels(kMatmul, "act_levels", act_levels, act_levels.size(0), pulses);
  for (const at::Tensor* t : {&gain, &scale, &codes})
    TORCH_CHECK_VALUE(t->device() == pulses.device(), kMatmul, ": pulses, gain, scale and the layer must be on one "
                      "device, got ", pulses.device(), " and ", t->device());
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.rows, kMatmul, ": bias must have shape [", s.rows,
                      "], got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->device() == pulses.device(), kMatmul, ": bias must be on ", pulses.device(), ", got ",
                      bias->device());
    TORCH_CHECK_TYPE(at::isFloatingType(bias->scalar_type()), kMatmul, ": bias must be floating point, got ",
                     bias->scalar_type());
  }
  return s;
}

void report_bad_token(const at::Tensor& x2d, const at::Tensor& flags) {
  const at::Tensor bad = flags.nonzero();
  const int64_t row = bad.select(1, 0)[0].item<int64_t>();
  const int flag = flags[row].item<int>();
  TORCH_CHECK_VALUE(flag != 1, kEncode, ": x must be finite, but token ", row, " (of ", x2d.size(0),
                    ", flattened over the leading dims) holds NaN or Inf");
  TORCH_CHECK_VALUE(false, kEncode, ": token ", row, " (flattened over the leading dims) has a norm of ",
                    x2d[row].to(at::kDouble).norm().item<double>(), ", past the float16 range (65504) of the "
                    "per-token scale; scale the activations down");
  __builtin_unreachable();
}

void report_bad_activation_codes(const at::Tensor& pulses2d, const at::Tensor& gain2d, int64_t act_D, int64_t act_K,
                                 int64_t levels) {
  const at::Tensor sums = pulses2d.view({pulses2d.size(0), -1, act_D}).to(at::kLong).abs().sum(-1);
  const at::Tensor bad_sum = (sums != act_K);
  if (bad_sum.any().item<bool>()) {
    const at::Tensor where = bad_sum.nonzero()[0];
    const int64_t t = where[0].item<int64_t>(), g = where[1].item<int64_t>();
    TORCH_CHECK_VALUE(false, kMatmul, ": every group of act_D=", act_D, " pulses must satisfy sum |y| == act_K=",
                      act_K, ", but token ", t, ", group ", g, " has sum |y| = ", sums[t][g].item<int64_t>());
  }
  const at::Tensor where = (gain2d.to(at::kLong) >= levels).nonzero()[0];
  TORCH_CHECK_VALUE(false, kMatmul, ": gain codes must be < ", levels, " (the act_levels), but token ",
                    where[0].item<int64_t>(), ", group ", where[1].item<int64_t>(), " holds ",
                    gain2d[where[0]][where[1]].item<int64_t>());
  __builtin_unreachable();
}

}  // namespace pvq_cuda
