// CPU kernels of packed PVQ layers: code packing, dequantization and the fused decode-and-dot
// matmul. They read the layout of packed/packed_layer.h, tile by tile (32 rows) in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "codec/dispatch.h"
#include "codec/split_tables.h"
#include "codec_args.h"
#include "packed_args.h"

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

at::Tensor dequantize_cpu(const at::Tensor& codes, const at::Tensor& row_scale, const at::Tensor& levels,
                          int64_t out_features, int64_t in_features, int64_t D, int64_t K, int64_t scale_bits) {
  const PackedShape s = check_packed_layer("pvq_cuda.pvq_dequantize", codes, row_scale, levels, out_features,
                                           in_features, D, K, scale_bits);
  const at::Tensor c = codes.contiguous(), lv = levels.contiguous(), rs = row_scale.contiguous();
  const pvq::PackedLayer layer = packed_view(s, c, rs, lv);
  const pvq::SplitTables tables = pvq::host_split_tables().view();
  at::Tensor out = at::empty({s.rows, s.cols}, codes.options().dtype(at::kFloat));
  float* po = out.data_ptr<float>();
  pvq::dispatch_group_size(s.D, [&](auto Dc) {
    constexpr int N = decltype(Dc)::value;
    at::parallel_for(0, s.tiles, tile_grain(s.groups), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t j = 0; j < s.groups; ++j) {
          const uint32_t* chunk = layer.words + (t * s.groups + j) * s.bits;
          for (int l = 0; l < pvq::kTileRows && t * pvq::kTileRows + l < s.rows; ++l) {
            const int64_t row = t * pvq::kTileRows + l;
            int8_t y[N];
            const float scale = pvq::decode_group<N>(tables, layer, pvq::chunk_code(chunk, l, s.bits), y) *
                                pvq::half_bits_to_float(layer.row_scale[row]);
            float* dst = po + row * s.cols + j * N;
            for (int d = 0; d < N; ++d) dst[d] = scale * float(y[d]);
          }
        }
    });
  });
  return out;
}

// One tile of 32 rows against all M activation rows: each column's 32 codes are decoded once into
// a small float tile, which is then dotted with every row of x (acc is [M][32]).
template <int N>
void matmul_tile(const pvq::SplitTables& tables, const pvq::PackedLayer& layer, const float* x, int64_t M,
                 int64_t cols, int64_t t, float* acc) {
  const int rows_here = int(std::min<int64_t>(pvq::kTileRows, layer.rows - t * pvq::kTileRows));
  std::fill(acc, acc + pvq::kTileRows * M, 0.f);
  float w[pvq::kTileRows][N];
  for (int64_t j = 0; j < layer.groups; ++j) {
    const uint32_t* chunk = layer.words + (t * layer.groups + j) * layer.bits;
    for (int l = 0; l < rows_here; ++l) {
      int8_t y[N];
      const float scale = pvq::decode_group<N>(tables, layer, pvq::chunk_code(chunk, l, layer.bits), y);
      for (int d = 0; d < N; ++d) w[l][d] = scale * float(y[d]);
    }
    for (int64_t m = 0; m < M; ++m) {
      const float* xj = x + m * cols + j * N;
      float* am = acc + m * pvq::kTileRows;
      for (int l = 0; l < rows_here; ++l) {
        float dot = 0.f;
        for (int d = 0; d < N; ++d) dot += w[l][d] * xj[d];
        am[l] += dot;
      }
    }
  }
}

at::Tensor matmul_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& row_scale,
                      const at::Tensor& levels, const std::optional<at::Tensor>& signs,
                      const std::optional<at::Tensor>& bias, int64_t out_features, int64_t D, int64_t K,
                      int64_t scale_bits) {
  const PackedShape s = check_matmul_args(x, codes, row_scale, levels, signs, bias, out_features, D, K, scale_bits);
  const at::Tensor x2 = rotate_input(x.reshape({-1, s.cols}), signs).to(at::kFloat).contiguous();
  const int64_t M = x2.size(0);
  const at::Tensor c = codes.contiguous(), lv = levels.contiguous(), rs = row_scale.contiguous();
  const pvq::PackedLayer layer = packed_view(s, c, rs, lv);
  const pvq::SplitTables tables = pvq::host_split_tables().view();
  at::Tensor out = at::empty({M, s.rows}, x2.options());
  float* po = out.data_ptr<float>();
  const float* px = x2.data_ptr<float>();
  if (M > 0) {
    pvq::dispatch_group_size(s.D, [&](auto Dc) {
      constexpr int N = decltype(Dc)::value;
      at::parallel_for(0, s.tiles, tile_grain(s.groups, M), [&](int64_t begin, int64_t end) {
        std::vector<float> acc(pvq::kTileRows * M);
        for (int64_t t = begin; t < end; ++t) {
          matmul_tile<N>(tables, layer, px, M, s.cols, t, acc.data());
          for (int l = 0; l < pvq::kTileRows && t * pvq::kTileRows + l < s.rows; ++l) {
            const int64_t row = t * pvq::kTileRows + l;
            const float scale = pvq::half_bits_to_float(layer.row_scale[row]);
            for (int64_t m = 0; m < M; ++m) po[m * s.rows + row] = acc[m * pvq::kTileRows + l] * scale;
          }
        }
      });
    });
  }
  if (bias) out.add_(bias->to(at::kFloat));
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = s.rows;
  return out.to(x.scalar_type()).reshape(sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(pvq_cuda, CPU, m) {
  m.impl("_pack_codes", &pack_codes_cpu);
  m.impl("_unpack_codes", &unpack_codes_cpu);
  m.impl("pvq_dequantize", &dequantize_cpu);
  m.impl("pvq_matmul", &matmul_cpu);
}

}  // namespace pvq_cuda
