// CPU kernels of packed PVQ layers: code packing, dequantization and the matmul (fused
// decode-and-dot for small batches, decoded row blocks + BLAS above). They read the layout of
// packed/packed_layer.h, tile by tile (32 rows) in parallel.
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "common/dispatch.h"
#include "codec/split_tables.h"
#include "codec/args.h"
#include "packed/args.h"

namespace pvq_cuda {
namespace {

// Tiles per task: at least ~64K group decodes (~0.5 ms) each, so that small layers stay on the
// calling thread; an OpenMP fork costs microseconds on a quiet machine but a scheduler slice
// (~10-20 ms, measured) when the cores are shared.
int64_t tile_grain(int64_t groups, int64_t batch = 1) {
  const int64_t per_tile = pvq::kTileRows * groups * std::max<int64_t>(batch, 1);
  return std::max<int64_t>(1, (int64_t(1) << 16) / per_tile);
}

void check_code_bits(const char* op, int64_t index_bits, int64_t scale_bits) {
  TORCH_CHECK_VALUE(index_bits >= 1 && index_bits <= pvq::kMaxIndexBits, op, ": index_bits must be in [1, ",
                    pvq::kMaxIndexBits, "], got ", index_bits);
  TORCH_CHECK_VALUE(scale_bits >= 0 && scale_bits <= 8 && index_bits + scale_bits <= 64, op,
                    ": scale_bits must be in [0, 8] with index_bits + scale_bits <= 64, got ", scale_bits);
}

at::Tensor pack_codes_cpu(const at::Tensor& index, const at::Tensor& gain, int64_t index_bits, int64_t scale_bits) {
  const char* op = "pvq_cuda._pack_codes";
  check_code_bits(op, index_bits, scale_bits);
  TORCH_CHECK_VALUE(index.dim() == 2 && gain.sizes() == index.sizes(), op,
                    ": index and gain must be [rows, groups] tensors of one shape, got ", index.sizes(), " and ",
                    gain.sizes());
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong && gain.scalar_type() == at::kLong, op,
                   ": index and gain must be int64");
  // index_bits may be 63, where 1 << 63 is negative: test the high bits instead.
  TORCH_CHECK_VALUE(((index < 0) | (at::bitwise_right_shift(index, index_bits) != 0)).any().item<bool>() == false, op,
                    ": index values must be in [0, 2^index_bits)");
  TORCH_CHECK_VALUE(((gain < 0) | (gain >= (int64_t(1) << scale_bits))).any().item<bool>() == false, op,
                    ": gain values must be in [0, 2^scale_bits)");
  const at::Tensor idx = index.contiguous(), g = gain.contiguous();
  const int64_t rows = idx.size(0), groups = idx.size(1);
  const int64_t tiles = (rows + pvq::kTileRows - 1) / pvq::kTileRows;
  const int B = int(index_bits + scale_bits);
  at::Tensor words = at::zeros({tiles * groups * B}, idx.options().dtype(at::kInt));
  uint32_t* w = reinterpret_cast<uint32_t*>(words.data_ptr<int32_t>());
  const int64_t* pi = idx.data_ptr<int64_t>();
  const int64_t* pg = g.data_ptr<int64_t>();
  at::parallel_for(0, tiles, tile_grain(groups), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t j = 0; j < groups; ++j)
        for (int l = 0; l < pvq::kTileRows && t * pvq::kTileRows + l < rows; ++l) {
          const int64_t e = (t * pvq::kTileRows + l) * groups + j;
          const uint64_t code = uint64_t(pg[e]) << index_bits | uint64_t(pi[e]);
          pvq::put_chunk_code(w + (t * groups + j) * B, l, B, code);
        }
  });
  return words;
}

std::tuple<at::Tensor, at::Tensor> unpack_codes_cpu(const at::Tensor& codes, int64_t rows, int64_t groups,
                                                    int64_t index_bits, int64_t scale_bits) {
  const char* op = "pvq_cuda._unpack_codes";
  check_code_bits(op, index_bits, scale_bits);
  TORCH_CHECK_VALUE(rows >= 1 && groups >= 1, op, ": rows and groups must be >= 1");
  const int64_t tiles = (rows + pvq::kTileRows - 1) / pvq::kTileRows;
  const int B = int(index_bits + scale_bits);
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kInt, op, ": codes must be int32 words");
  TORCH_CHECK_VALUE(codes.numel() == tiles * groups * B, op, ": codes must hold ", tiles * groups * B, " words, got ",
                    codes.numel());
  const at::Tensor c = codes.contiguous();
  at::Tensor index = at::empty({rows, groups}, c.options().dtype(at::kLong));
  at::Tensor gain = at::empty({rows, groups}, c.options().dtype(at::kLong));
  const uint32_t* w = reinterpret_cast<const uint32_t*>(c.data_ptr<int32_t>());
  int64_t* pi = index.data_ptr<int64_t>();
  int64_t* pg = gain.data_ptr<int64_t>();
  const uint64_t mask = (uint64_t(1) << index_bits) - 1;
  at::parallel_for(0, tiles, tile_grain(groups), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t j = 0; j < groups; ++j)
        for (int l = 0; l < pvq::kTileRows && t * pvq::kTileRows + l < rows; ++l) {
          const uint64_t code = pvq::chunk_code(w + (t * groups + j) * B, l, B);
          const int64_t e = (t * pvq::kTileRows + l) * groups + j;
          pi[e] = int64_t(code & mask);
          pg[e] = int64_t(code >> index_bits);
        }
  });
  return {index, gain};
}

// Raised after a kernel saw an index >= V(D,K) (decode_group gave those groups zeros).
void check_no_corrupt_code(const char* op, const PackedShape& s, bool corrupt) {
  TORCH_CHECK_VALUE(!corrupt, op, ": codes hold a group index >= V(D=", s.D, ", K=", s.K, ") = ", s.count,
                    ": they are corrupt or were packed for another D, K or scale_bits");
}

// Decodes tiles [t0, t1) into dst, the row-major [rows of those tiles, cols] float block that
// starts at row t0 * 32, in parallel over tiles. Returns whether a code was corrupt.
bool dequantize_tiles(const PackedShape& s, const pvq::PackedLayer& layer, int64_t t0, int64_t t1, float* dst) {
  const pvq::SplitTables tables = pvq::host_split_tables().view();
  std::atomic<bool> corrupt{false};
  pvq::dispatch_group_size(s.D, [&](auto Dc) {
    constexpr int N = decltype(Dc)::value;
    at::parallel_for(t0, t1, tile_grain(s.groups), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t j = 0; j < s.groups; ++j) {
          const uint32_t* chunk = layer.words + (t * s.groups + j) * s.bits;
          for (int l = 0; l < pvq::kTileRows && t * pvq::kTileRows + l < s.rows; ++l) {
            const int64_t row = t * pvq::kTileRows + l;
            int8_t y[N];
            const uint64_t code = pvq::chunk_code(chunk, l, s.bits);
            if (!pvq::code_valid(layer, code)) corrupt.store(true, std::memory_order_relaxed);
            const float scale = pvq::decode_group<N>(tables, layer, code, y) *
                                pvq::half_bits_to_float(layer.row_scale[row]);
            float* out = dst + (row - t0 * pvq::kTileRows) * s.cols + j * N;
            for (int d = 0; d < N; ++d) out[d] = scale * float(y[d]);
          }
        }
    });
  });
  return corrupt.load();
}

at::Tensor dequantize_cpu(const at::Tensor& codes, const at::Tensor& row_scale, const at::Tensor& levels,
                          int64_t out_features, int64_t in_features, int64_t D, int64_t K, int64_t scale_bits) {
  const PackedShape s = check_packed_layer("pvq_cuda.pvq_dequantize", codes, row_scale, levels, out_features,
                                           in_features, D, K, scale_bits);
  const at::Tensor c = codes.contiguous(), lv = levels.contiguous(), rs = row_scale.contiguous();
  const pvq::PackedLayer layer = packed_view(s, c, rs, lv);
  at::Tensor out = at::empty({s.rows, s.cols}, codes.options().dtype(at::kFloat));
  check_no_corrupt_code("pvq_cuda.pvq_dequantize", s, dequantize_tiles(s, layer, 0, s.tiles, out.data_ptr<float>()));
  return out;
}

// One tile of 32 rows against all M activation rows: each column's 32 codes are decoded once into
// a small float tile, which is then dotted with every row of x (acc is [M][32]). T is the
// activations' arithmetic type: float, or double for float64 inputs (weights stay the float values
// every device decodes).
template <int N, typename T>
bool matmul_tile(const pvq::SplitTables& tables, const pvq::PackedLayer& layer, const T* x, int64_t M,
                 int64_t cols, int64_t t, T* acc) {
  bool corrupt = false;
  const int rows_here = int(std::min<int64_t>(pvq::kTileRows, layer.rows - t * pvq::kTileRows));
  std::fill(acc, acc + pvq::kTileRows * M, T(0));
  float w[pvq::kTileRows][N];
  for (int64_t j = 0; j < layer.groups; ++j) {
    const uint32_t* chunk = layer.words + (t * layer.groups + j) * layer.bits;
    for (int l = 0; l < rows_here; ++l) {
      int8_t y[N];
      const uint64_t code = pvq::chunk_code(chunk, l, layer.bits);
      corrupt |= !pvq::code_valid(layer, code);
      const float scale = pvq::decode_group<N>(tables, layer, code, y);
      for (int d = 0; d < N; ++d) w[l][d] = scale * float(y[d]);
    }
    for (int64_t m = 0; m < M; ++m) {
      const T* xj = x + m * cols + j * N;
      T* am = acc + m * pvq::kTileRows;
      for (int l = 0; l < rows_here; ++l) {
        T dot = 0;
        for (int d = 0; d < N; ++d) dot += T(w[l][d]) * xj[d];
        am[l] += dot;
      }
    }
  }
  return corrupt;
}

// Batches above kFusedMaxRows go through decoded row blocks and BLAS: the fused tile loop does
// ~5 GFLOP/s per core, sgemm ~40, while decoding costs ~1 ns a weight, so from about 8 activation
// rows on decoding once and multiplying densely wins (perplexity evaluation, prefill). A block
// holds at most kDenseBlockFloats decoded weights (32 MB), so memory stays bounded at any size.
constexpr int64_t kFusedMaxRows = 8;
constexpr int64_t kDenseBlockFloats = int64_t(1) << 23;

// Row blocks of the decoded weight (float; converted to x's type when that is double), each
// handed to block(r0, r1, w) with w the [r1 - r0, cols] weight of rows [r0, r1).
template <typename F>
bool for_dense_blocks(const PackedShape& s, const pvq::PackedLayer& layer, at::ScalarType dtype, F&& block) {
  const int64_t tiles_per_block = std::max<int64_t>(1, kDenseBlockFloats / (int64_t(pvq::kTileRows) * s.cols));
  const int64_t block_tiles = std::min(tiles_per_block, s.tiles);
  at::Tensor w = at::empty({std::min(block_tiles * pvq::kTileRows, s.rows), s.cols}, at::kFloat);
  bool corrupt = false;
  for (int64_t t0 = 0; t0 < s.tiles; t0 += block_tiles) {
    const int64_t t1 = std::min(t0 + block_tiles, s.tiles);
    const int64_t r0 = t0 * pvq::kTileRows, r1 = std::min(t1 * pvq::kTileRows, s.rows);
    corrupt |= dequantize_tiles(s, layer, t0, t1, w.data_ptr<float>());
    block(r0, r1, w.narrow(0, 0, r1 - r0).to(dtype));
  }
  return corrupt;
}

bool matmul_dense(const PackedShape& s, const pvq::PackedLayer& layer, const at::Tensor& x2, at::Tensor& out) {
  return for_dense_blocks(s, layer, x2.scalar_type(), [&](int64_t r0, int64_t r1, const at::Tensor& w) {
    if (r0 == 0 && r1 == s.rows)
      at::mm_out(out, x2, w.t());
    else
      out.slice(1, r0, r1).copy_(at::mm(x2, w.t()));
  });
}

template <typename T>
bool matmul_fused(const PackedShape& s, const pvq::PackedLayer& layer, const at::Tensor& x2, at::Tensor& out) {
  const int64_t M = x2.size(0);
  std::atomic<bool> corrupt{false};
  const pvq::SplitTables tables = pvq::host_split_tables().view();
  T* po = out.data_ptr<T>();
  const T* px = x2.data_ptr<T>();
  pvq::dispatch_group_size(s.D, [&](auto Dc) {
    constexpr int N = decltype(Dc)::value;
    at::parallel_for(0, s.tiles, tile_grain(s.groups, M), [&](int64_t begin, int64_t end) {
      std::vector<T> acc(pvq::kTileRows * M);
      for (int64_t t = begin; t < end; ++t) {
        if (matmul_tile<N, T>(tables, layer, px, M, s.cols, t, acc.data()))
          corrupt.store(true, std::memory_order_relaxed);
        for (int l = 0; l < pvq::kTileRows && t * pvq::kTileRows + l < s.rows; ++l) {
          const int64_t row = t * pvq::kTileRows + l;
          const T scale = pvq::half_bits_to_float(layer.row_scale[row]);
          for (int64_t m = 0; m < M; ++m) po[m * s.rows + row] = acc[m * pvq::kTileRows + l] * scale;
        }
      }
    });
  });
  return corrupt.load();
}

// The arithmetic type of activations: float for float32/16-bit inputs, double for float64.
at::ScalarType compute_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor matmul_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& row_scale,
                      const at::Tensor& levels, const std::optional<at::Tensor>& signs,
                      const std::optional<at::Tensor>& bias, int64_t out_features, int64_t D, int64_t K,
                      int64_t scale_bits) {
  // pvq_matmul is differentiable through its registered autograd formula: below it, the kernel's
  // own views and in-place writes must not be tracked (an input view made under no_grad, as in
  // activation checkpointing, would otherwise be refused).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const PackedShape s = check_matmul_args(x, codes, row_scale, levels, signs, bias, out_features, D, K, scale_bits);
  const at::ScalarType ct = compute_type(x);
  const at::Tensor x2 = rotate_input(x.reshape({-1, s.cols}), signs).to(ct).contiguous();
  const int64_t M = x2.size(0);
  const at::Tensor c = codes.contiguous(), lv = levels.contiguous(), rs = row_scale.contiguous();
  const pvq::PackedLayer layer = packed_view(s, c, rs, lv);
  at::Tensor out = at::empty({M, s.rows}, x2.options());
  bool corrupt = false;
  if (M > kFusedMaxRows)
    corrupt = matmul_dense(s, layer, x2, out);
  else if (M > 0)
    corrupt = ct == at::kDouble ? matmul_fused<double>(s, layer, x2, out) : matmul_fused<float>(s, layer, x2, out);
  check_no_corrupt_code("pvq_cuda.pvq_matmul", s, corrupt);
  if (bias) out.add_(bias->to(ct));
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = s.rows;
  return out.to(x.scalar_type()).reshape(sizes);
}

// grad_x = (g Ŵ') R for g = dL/dy [M, rows]: the columns of one group j take sum_r g[m, r] w_rj, so
// threads split the groups (each owns its output columns: no races) and walk every tile for them.
// The weights are decoded on the fly, never stored whole.
template <typename T>
bool grad_input_fused(const PackedShape& s, const pvq::PackedLayer& layer, const at::Tensor& g2, at::Tensor& z) {
  const int64_t M = g2.size(0);
  std::atomic<bool> corrupt{false};
  const pvq::SplitTables tables = pvq::host_split_tables().view();
  const T* pg = g2.data_ptr<T>();
  T* pz = z.data_ptr<T>();
  pvq::dispatch_group_size(s.D, [&](auto Dc) {
    constexpr int N = decltype(Dc)::value;
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, s.rows * M));
    at::parallel_for(0, s.groups, grain, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        for (int64_t t = 0; t < s.tiles; ++t) {
          const uint32_t* chunk = layer.words + (t * s.groups + j) * s.bits;
          for (int l = 0; l < pvq::kTileRows && t * pvq::kTileRows + l < s.rows; ++l) {
            const int64_t row = t * pvq::kTileRows + l;
            int8_t y[N];
            const uint64_t code = pvq::chunk_code(chunk, l, s.bits);
            if (!pvq::code_valid(layer, code)) corrupt.store(true, std::memory_order_relaxed);
            // The weights as matmul_tile makes them (row scale applied in T, not folded into the
            // float weights), so that this is the exact adjoint of the fused forward.
            const float scale = pvq::decode_group<N>(tables, layer, code, y);
            const T row_scale = pvq::half_bits_to_float(layer.row_scale[row]);
            float w[N];
            for (int d = 0; d < N; ++d) w[d] = scale * float(y[d]);
            for (int64_t m = 0; m < M; ++m) {
              const T gm = pg[m * s.rows + row] * row_scale;
              T* zm = pz + m * s.cols + j * N;
              for (int d = 0; d < N; ++d) zm[d] += gm * T(w[d]);
            }
          }
        }
      }
    });
  });
  return corrupt.load();
}

at::Tensor matmul_grad_input_cpu(const at::Tensor& grad, const at::Tensor& codes, const at::Tensor& row_scale,
                                 const at::Tensor& levels, const std::optional<at::Tensor>& signs, int64_t in_features,
                                 int64_t D, int64_t K, int64_t scale_bits) {
  // pvq_matmul is differentiable through its registered autograd formula: below it, the kernel's
  // own views and in-place writes must not be tracked (an input view made under no_grad, as in
  // activation checkpointing, would otherwise be refused).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const PackedShape s = check_matmul_grad_args(grad, codes, row_scale, levels, signs, in_features, D, K, scale_bits);
  const at::ScalarType ct = compute_type(grad);
  const at::Tensor g2 = grad.reshape({-1, s.rows}).to(ct).contiguous();
  const int64_t M = g2.size(0);
  const at::Tensor c = codes.contiguous(), lv = levels.contiguous(), rs = row_scale.contiguous();
  const pvq::PackedLayer layer = packed_view(s, c, rs, lv);
  at::Tensor z = at::zeros({M, s.cols}, g2.options());
  bool corrupt = false;
  if (M > kFusedMaxRows) {
    corrupt = for_dense_blocks(s, layer, ct, [&](int64_t r0, int64_t r1, const at::Tensor& w) {
      z.addmm_(g2.slice(1, r0, r1), w);
    });
  } else if (M > 0) {
    corrupt = ct == at::kDouble ? grad_input_fused<double>(s, layer, g2, z) : grad_input_fused<float>(s, layer, g2, z);
  }
  check_no_corrupt_code("pvq_cuda.pvq_matmul_grad_input", s, corrupt);
  std::vector<int64_t> sizes(grad.sizes().begin(), grad.sizes().end());
  sizes.back() = s.cols;
  return unrotate_output(z, signs).to(grad.scalar_type()).reshape(sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(pvq_cuda, CPU, m) {
  m.impl("_pack_codes", &pack_codes_cpu);
  m.impl("_unpack_codes", &unpack_codes_cpu);
  m.impl("pvq_dequantize", &dequantize_cpu);
  m.impl("pvq_matmul", &matmul_cpu);
  m.impl("pvq_matmul_grad_input", &matmul_grad_input_cpu);
}

}  // namespace pvq_cuda
