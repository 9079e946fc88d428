// CUDA glue of packed-layer ops: pvq_dequantize, pvq_matmul (fused GEMV for batches up to 16,
// dequantized tiles through cuBLAS above that) and its input gradient (fused up to 8 rows of grad,
// 4 at D=32; dequantized tiles through cuBLAS above). The matmul's body (rotated_matmul_cuda,
// packed/cuda_glue.h) also runs wa_matmul.
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cuda_glue.h"
#include "hadamard/args.h"
#include "hadamard/cuda_glue.h"
#include "packed/args.h"
#include "packed/cuda_glue.h"
#include "packed/launchers.h"
#include "packed/tiled_matmul.h"

namespace pvq_cuda {
namespace {

// Rows dequantized per cuBLAS call on the large-batch path: ~32 M weights (64 MB in fp16).
constexpr int64_t kTileWeights = int64_t(1) << 25;

at::Tensor dequantize_cuda(const at::Tensor& codes, const at::Tensor& row_scale, const at::Tensor& levels,
                           int64_t out_features, int64_t in_features, int64_t D, int64_t K, int64_t scale_bits) {
  const PackedShape s = check_packed_layer("pvq_cuda.pvq_dequantize", codes, row_scale, levels, out_features,
                                           in_features, D, K, scale_bits);
  const c10::cuda::CUDAGuard guard(codes.device());
  const at::Tensor c = codes.contiguous(), lv = levels.contiguous(), rs = row_scale.contiguous();
  at::Tensor out = at::empty({s.rows, s.cols}, codes.options().dtype(at::kFloat));
  C10_CUDA_CHECK(launch_dequantize(split_tables_on(c), packed_view(s, c, rs, lv), s.D, 0, s.rows, out.data_ptr(),
                                   FloatKind::kFloat32, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

at::Tensor rotated_matmul_cuda(at::Tensor x2, const PackedShape& s, const at::Tensor& codes,
                               const at::Tensor& row_scale, const at::Tensor& levels,
                               const std::optional<at::Tensor>& bias) {
  if (reinterpret_cast<uintptr_t>(x2.data_ptr()) % 16 != 0) x2 = x2.clone();  // the GEMV loads 16 B vectors
  const int64_t M = x2.size(0);
  const at::Tensor c = codes.contiguous(), lv = levels.contiguous(), rs = row_scale.contiguous();
  const pvq::PackedLayer layer = packed_view(s, c, rs, lv);
  const pvq::SplitTables tables = split_tables_on(c);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty({M, s.rows}, x2.options());
  if (M == 0) return out;

  std::optional<at::Tensor> b;
  if (bias) {
    const auto bt = bias->scalar_type();
    b = (bt == at::kFloat || bt == at::kHalf || bt == at::kBFloat16 ? *bias : bias->to(at::kFloat)).contiguous();
  }
  const FloatKind kind = float_kind_of(x2.scalar_type());
  if (M <= kGemvMaxBatch) {
    const FloatKind bias_kind = b ? float_kind_of(b->scalar_type()) : FloatKind::kFloat32;
    GemvPlan plan;
    C10_CUDA_CHECK(plan_gemv(layer, s.D, kind, bias_kind, M, &plan));
    at::Tensor workspace = at::empty({plan.workspace_floats}, x2.options().dtype(at::kFloat));
    C10_CUDA_CHECK(launch_gemv(tables, layer, s.D, x2.data_ptr(), kind, M, b ? b->data_ptr() : nullptr, bias_kind,
                               out.data_ptr(), workspace.data_ptr<float>(), plan, stream));
    return out;
  }
  // Large batch: the GEMM is compute-bound enough that cuBLAS on a decoded tile wins over a
  // scalar fused kernel; tiles keep the dense copy to ~64 MB.
  const int64_t tile_rows = dense_tile_rows(s.rows, s.cols, kTileWeights);
  at::Tensor dense = at::empty({tile_rows, s.cols}, x2.options());
  const TileGemm gemm = [&](int64_t r0, int64_t r1) {
    out.narrow(1, r0, r1 - r0).copy_(at::mm(x2, dense.narrow(0, 0, r1 - r0).t()));
    return cudaSuccess;  // torch reports its own errors by throwing
  };
  C10_CUDA_CHECK(matmul_by_dense_tiles(tables, layer, s.D, kind, tile_rows, dense.data_ptr(), gemm, stream));
  if (b) out.add_(b->to(out.scalar_type()));
  return out;
}

namespace {

at::Tensor matmul_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& row_scale,
                       const at::Tensor& levels, const std::optional<at::Tensor>& signs,
                       const std::optional<at::Tensor>& bias, int64_t out_features, int64_t D, int64_t K,
                       int64_t scale_bits) {
  // pvq_matmul is differentiable through its registered autograd formula: below it, the kernel's
  // own views and in-place writes must not be tracked (an input view made under no_grad, as in
  // activation checkpointing, would otherwise be refused).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const PackedShape s = check_matmul_args(x, codes, row_scale, levels, signs, bias, out_features, D, K, scale_bits);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = rotate_input(x.reshape({-1, s.cols}), signs).contiguous();
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = s.rows;
  return rotated_matmul_cuda(x2, s, codes, row_scale, levels, bias).reshape(sizes);
}

// grad_x = (grad Ŵ') R without a whole dense Ŵ': up to grad_gemv_max_batch(D) rows of grad, the
// fused kernel decodes Ŵ' in registers (packed/grad_input.cu); above, Ŵ' is dequantized a tile of
// rows at a time (the forward's ~64 MB tiles) and each tile's cuBLAS GEMM adds grad[:, tile] ·
// Ŵ'[tile, :] to the float32 accumulator. Either way z = grad Ŵ' is float32, and
// packed/tiled_matmul.cpp's grad_input_to_input_basis rotates it back and rounds once.
at::Tensor matmul_grad_input_cuda(const at::Tensor& grad, const at::Tensor& codes, const at::Tensor& row_scale,
                                  const at::Tensor& levels, const std::optional<at::Tensor>& signs,
                                  int64_t in_features, int64_t D, int64_t K, int64_t scale_bits) {
  // Below pvq_matmul's autograd formula (this op is its backward, and is also called directly):
  // the kernel's own views and in-place writes must not be tracked.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const PackedShape s = check_matmul_grad_args(grad, codes, row_scale, levels, signs, in_features, D, K, scale_bits);
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor g2 = grad.reshape({-1, s.rows}).contiguous();
  const int64_t M = g2.size(0);
  std::vector<int64_t> sizes(grad.sizes().begin(), grad.sizes().end());
  sizes.back() = s.cols;
  at::Tensor out = at::empty({M, s.cols}, g2.options());
  if (M == 0) return out.reshape(sizes);
  at::Tensor rotated, signs_f;
  if (signs) {
    check_hadamard_args(out, std::nullopt);  // the ValueError of the CPU op's unrotation for an unsupported n
    check_hadamard_fits("pvq_cuda.pvq_matmul_grad_input", s.cols, grad.device());
    rotated = at::empty({M, s.cols}, g2.options().dtype(at::kFloat));
    signs_f = signs_as_float(signs);
  }
  const at::Tensor c = codes.contiguous(), lv = levels.contiguous(), rs = row_scale.contiguous();
  const pvq::PackedLayer layer = packed_view(s, c, rs, lv);
  const pvq::SplitTables tables = split_tables_on(c);
  const FloatKind kind = float_kind_of(g2.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  if (M <= grad_gemv_max_batch(s.D)) {
    at::Tensor z = at::empty({M, s.cols}, g2.options().dtype(at::kFloat));  // written whole by the kernel
    const GradInputBuffers buffers{z.data_ptr<float>(), signs ? rotated.data_ptr<float>() : nullptr,
                                   signs ? signs_f.data_ptr<float>() : nullptr, out.data_ptr()};
    GradGemvPlan plan;
    C10_CUDA_CHECK(plan_grad_gemv(layer, s.D, kind, M, &plan));
    at::Tensor workspace = at::empty({plan.workspace_floats}, g2.options().dtype(at::kFloat));
    C10_CUDA_CHECK(launch_grad_gemv(tables, layer, s.D, g2.data_ptr(), kind, M, buffers.z,
                                    workspace.data_ptr<float>(), plan, stream));
    C10_CUDA_CHECK(grad_input_to_input_basis(M, s.cols, kind, buffers, stream));
    return out.reshape(sizes);
  }

  at::Tensor z = at::zeros({M, s.cols}, g2.options().dtype(at::kFloat));
  const GradInputBuffers buffers{z.data_ptr<float>(), signs ? rotated.data_ptr<float>() : nullptr,
                                 signs ? signs_f.data_ptr<float>() : nullptr, out.data_ptr()};
  const int64_t tile_rows = dense_tile_rows(s.rows, s.cols, kTileWeights);
  at::Tensor dense = at::empty({tile_rows, s.cols}, g2.options());
  const TileGemm gemm = [&](int64_t r0, int64_t r1) {
    const at::Tensor g_tile = g2.narrow(1, r0, r1 - r0), w_tile = dense.narrow(0, 0, r1 - r0);
    // fp16/bf16: cuBLAS's product in the activation type (as the forward's), summed over tiles in
    // float32 so that only one rounding per tile reaches the result.
    if (g2.scalar_type() == at::kFloat)
      z.addmm_(g_tile, w_tile);
    else
      z.add_(at::mm(g_tile, w_tile));
    return cudaSuccess;  // torch reports its own errors by throwing
  };
  C10_CUDA_CHECK(grad_input_by_dense_tiles(tables, layer, s.D, kind, M, tile_rows, dense.data_ptr(), gemm, buffers,
                                           stream));
  return out.reshape(sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(pvq_cuda, CUDA, m) {
  m.impl("pvq_dequantize", &dequantize_cuda);
  m.impl("pvq_matmul", &matmul_cuda);
  m.impl("pvq_matmul_grad_input", &matmul_grad_input_cuda);
}

}  // namespace pvq_cuda
