#include "packed/args.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "codec/split_tables.h"
#include "codec/args.h"

namespace pvq_cuda {

PackedShape check_packed_layer(const char* op, const at::Tensor& codes, const at::Tensor& row_scale,
                               const at::Tensor& levels, int64_t out_features, int64_t in_features, int64_t D,
                               int64_t K, int64_t scale_bits) {
  const uint64_t V = check_codec_limits(op, D, K);
  TORCH_CHECK_VALUE(scale_bits >= 0 && scale_bits <= 8, op, ": scale_bits must be in [0, 8], got ", scale_bits);
  const int index_bits = pvq::index_bits(V);
  const int bits = index_bits + int(scale_bits);
  TORCH_CHECK_VALUE(bits <= 64, op, ": index bits + scale_bits must be <= 64, got ", bits);
  TORCH_CHECK_VALUE(out_features >= 1, op, ": out_features must be >= 1, got ", out_features);
  TORCH_CHECK_VALUE(in_features >= 1 && in_features % D == 0, op, ": in_features must be a positive multiple of D=",
                    D, ", got ", in_features);
  PackedShape s{out_features, in_features, in_features / D, (out_features + pvq::kTileRows - 1) / pvq::kTileRows,
                int(D), int(K), bits, index_bits, int(scale_bits), V};
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kInt, op, ": codes must be int32 words, got ", codes.scalar_type());
  TORCH_CHECK_VALUE(codes.numel() == s.tiles * s.groups * bits, op, ": codes must hold ", s.tiles * s.groups * bits,
                    " words (", s.tiles, " tiles x ", s.groups, " groups x ", bits, " bits), got ", codes.numel());
  TORCH_CHECK_TYPE(row_scale.scalar_type() == at::kHalf, op, ": row_scale must be float16, got ",
                   row_scale.scalar_type());
  TORCH_CHECK_VALUE(row_scale.dim() == 1 && row_scale.size(0) == out_features, op, ": row_scale must have shape [",
                    out_features, "], got ", row_scale.sizes());
  TORCH_CHECK_TYPE(levels.scalar_type() == at::kFloat, op, ": levels must be float32, got ", levels.scalar_type());
  TORCH_CHECK_VALUE(levels.dim() == 1 && levels.size(0) == (int64_t(1) << scale_bits), op,
                    ": levels must have shape [", int64_t(1) << scale_bits, "], got ", levels.sizes());
  TORCH_CHECK_VALUE(row_scale.device() == codes.device() && levels.device() == codes.device(), op,
                    ": codes, row_scale and levels must be on one device, got ", codes.device(), ", ",
                    row_scale.device(), ", ", levels.device());
  return s;
}

PackedShape check_matmul_args(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& row_scale,
                              const at::Tensor& levels, const std::optional<at::Tensor>& signs,
                              const std::optional<at::Tensor>& bias, int64_t out_features, int64_t D, int64_t K,
                              int64_t scale_bits) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "pvq_cuda.pvq_matmul: x must have shape [..., in_features], got a 0-d tensor");
  const PackedShape s = check_packed_layer("pvq_cuda.pvq_matmul", codes, row_scale, levels, out_features,
                                           x.size(-1), D, K, scale_bits);
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || (st == at::kDouble && x.is_cpu()),
                   "pvq_cuda.pvq_matmul: x must be float32, float16 or bfloat16 (float64 on CPU), got ", st, " on ",
                   x.device());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == s.cols, "pvq_cuda.pvq_matmul: x must have shape [..., ", s.cols,
                    "] (the layer's in_features), got ", x.sizes());
  TORCH_CHECK_VALUE(x.device() == codes.device(), "pvq_cuda.pvq_matmul: x is on ", x.device(),
                    " but the weight is on ", codes.device());
  if (signs) {
    TORCH_CHECK_VALUE(signs->dim() == 1 && signs->size(0) == s.cols, "pvq_cuda.pvq_matmul: signs must have shape [",
                      s.cols, "], got ", signs->sizes());
    TORCH_CHECK_VALUE(signs->device() == x.device(), "pvq_cuda.pvq_matmul: signs must be on ", x.device(), ", got ",
                      signs->device());
  }
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.rows, "pvq_cuda.pvq_matmul: bias must have shape [",
                      s.rows, "], got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->device() == x.device(), "pvq_cuda.pvq_matmul: bias must be on ", x.device(), ", got ",
                      bias->device());
    TORCH_CHECK_TYPE(at::isFloatingType(bias->scalar_type()), "pvq_cuda.pvq_matmul: bias must be floating point, got ",
                     bias->scalar_type());
  }
  return s;
}

PackedShape check_matmul_grad_args(const at::Tensor& grad, const at::Tensor& codes, const at::Tensor& row_scale,
                                   const at::Tensor& levels, const std::optional<at::Tensor>& signs,
                                   int64_t in_features, int64_t D, int64_t K, int64_t scale_bits) {
  const char* op = "pvq_cuda.pvq_matmul_grad_input";
  TORCH_CHECK_VALUE(grad.dim() >= 1, op, ": grad must have shape [..., out_features], got a 0-d tensor");
  TORCH_CHECK_VALUE(row_scale.dim() == 1, op, ": row_scale must have shape [out_features], got ", row_scale.sizes());
  const PackedShape s = check_packed_layer(op, codes, row_scale, levels, row_scale.size(0), in_features, D, K,
                                           scale_bits);
  const auto st = grad.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || (st == at::kDouble && grad.is_cpu()),
                   op, ": grad must be float32, float16 or bfloat16 (float64 on CPU), got ", st, " on ", grad.device());
  TORCH_CHECK_VALUE(grad.size(-1) == s.rows, op, ": grad must have shape [..., ", s.rows,
                    "] (the layer's out_features), got ", grad.sizes());
  TORCH_CHECK_VALUE(grad.device() == codes.device(), op, ": grad is on ", grad.device(), " but the weight is on ",
                    codes.device());
  if (signs) {
    TORCH_CHECK_VALUE(signs->dim() == 1 && signs->size(0) == s.cols, op, ": signs must have shape [", s.cols,
                      "], got ", signs->sizes());
    TORCH_CHECK_VALUE(signs->device() == grad.device(), op, ": signs must be on ", grad.device(), ", got ",
                      signs->device());
  }
  return s;
}

pvq::PackedLayer packed_view(const PackedShape& s, const at::Tensor& codes, const at::Tensor& row_scale,
                             const at::Tensor& levels) {
  return pvq::PackedLayer{reinterpret_cast<const uint32_t*>(codes.data_ptr<int32_t>()),
                          reinterpret_cast<const uint16_t*>(row_scale.data_ptr<at::Half>()),
                          levels.data_ptr<float>(),
                          s.rows,
                          s.groups,
                          s.bits,
                          s.index_bits,
                          s.K,
                          s.count};
}

namespace {

at::Tensor hadamard(const at::Tensor& x2d, const std::optional<at::Tensor>& signs) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pvq_cuda::hadamard_transform", "")
                             .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&)>();
  return op.call(x2d, signs);
}

}  // namespace

at::Tensor rotate_input(const at::Tensor& x2d, const std::optional<at::Tensor>& signs) {
  return signs ? hadamard(x2d, signs) : x2d;
}

at::Tensor unrotate_output(const at::Tensor& z2d, const std::optional<at::Tensor>& signs) {
  return signs ? hadamard(z2d, std::nullopt).mul_(signs->to(z2d.scalar_type())) : z2d;
}

}  // namespace pvq_cuda
