// The packed PVQ weight layout (format version 1) and the per-group decode that every kernel of a
// packed layer shares (CPU and CUDA, dequantize and matmul). Torch-free.
//
// Layout. The layer weight W [N out, n in] is rotated (W' = W R^T, paper.md §6) and cut into
// groups of D consecutive input weights: group (r, j) holds W'[r, jD : jD+D], j < G = n / D.
// Each group stores one code of B = index_bits + gain_bits bits (B <= 64):
//     code = gain << index_bits | index,   index = split-order pyramid index in [0, V(D,K)),
//     gain  = entry of the layer's level table (2^gain_bits fp32 values).
// The group's weights are  row_scale[r] * level[gain] * y / |y|,  y = decode(index).
// Rows are taken 32 at a time ("tiles", T = ceil(N / 32); rows past N are zero codes). The codes
// of the 32 rows of tile t at column j form one *chunk* of exactly B 32-bit words: lane l's code
// occupies chunk bits [B l, B l + B), little-endian (chunk bit b is bit b % 32 of word b / 32).
// Chunks are stored tile-major, column-minor: words[(t * G + j) * B + w].
//
// Why: a warp maps lane l to row 32t + l, so the chunk of column j is one coalesced read of B
// consecutive words (208 bytes at B = 52), columns follow each other in memory so a warp walking
// j streams sequentially, and every lane needs the same activations x[jD : jD+D] (a broadcast).
// Codes keep their exact width: at pvq-3.25 (D=16, K=30: 50 + 2 bits) a 4096 x 4096 layer is
// 128 tiles x 256 columns x 52 words x 4 B = 6,815,744 B = 3.25 bits per weight, plus 16 bits of
// row scale per row (+0.0039 bpw) and the 4-entry level table; pvq8-3.25 (D=8, K=16: 24 + 2) has
// 512 columns of 26-word chunks, the same bytes.
#pragma once
#include <cstdint>

#include "codec/pyramid.h"

namespace pvq {

constexpr int kTileRows = 32;

struct PackedLayer {
  const uint32_t* words;   // [T][G][B]
  const uint16_t* row_scale;  // [N], the stored fp16 scales (bits; see half_bits_to_float)
  const float* levels;     // [2^gain_bits]
  int64_t rows;            // N
  int64_t groups;          // G
  int bits;                // B
  int index_bits;
  int K;
  uint64_t count;          // V(D, K): an index at or above it is corrupt
};

// IEEE binary16 -> float, exact (subnormals, Inf and NaN included). Reading the fp16 row scales
// as bits keeps this header free of CUDA and torch half types and saves a conversion pass.
PVQ_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0) {
    const float v = float(mantissa) * 5.9604644775390625e-8f;  // mantissa * 2^-24, exact
    memcpy(&bits, &v, sizeof bits);
    bits |= sign;
  } else if (exponent == 31) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

// The code of `lane` in a chunk. It spans at most 3 words (B <= 64); words past the code are not
// touched, so the last chunk of the buffer never reads out of bounds.
PVQ_HD uint64_t chunk_code(const uint32_t* chunk, int lane, int B) {
  const int first = B * lane;
  const int w = first >> 5, sh = first & 31;
  const int last_word = (first + B - 1) >> 5;
  uint64_t v = chunk[w] >> sh;
  if (last_word > w) v |= uint64_t(chunk[w + 1]) << (32 - sh);
  if (last_word > w + 1) v |= uint64_t(chunk[w + 2]) << (64 - sh);
  return B == 64 ? v : v & ((uint64_t(1) << B) - 1);
}

// Host side of the layout: ORs `code` into its chunk (which must start zeroed).
inline void put_chunk_code(uint32_t* chunk, int lane, int B, uint64_t code) {
  const int first = B * lane;
  const int w = first >> 5, sh = first & 31;
  const int last_word = (first + B - 1) >> 5;
  chunk[w] |= uint32_t(code << sh);
  if (last_word > w) chunk[w + 1] |= uint32_t(code >> (32 - sh));
  if (last_word > w + 1) chunk[w + 2] |= uint32_t(code >> (64 - sh));
}

// Whether a code's index lies in [0, V(D,K)). Codes from quantize_weight and from checked files
// always do; raw codes handed to the ops may not, and decoding such an index would read past the
// tables.
PVQ_HD bool code_valid(const PackedLayer& p, uint64_t code) {
  return (code & ((uint64_t(1) << p.index_bits) - 1)) < p.count;
}

// Decodes one group's pulses into y and returns its scale level[gain] / |y| (row scale excluded).
// A corrupt index (see code_valid) decodes to zero pulses and scale 0, never out of bounds; the
// CPU kernels then raise.
template <int D>
PVQ_HD float decode_group(const SplitTables& t, const PackedLayer& p, uint64_t code, int8_t* y) {
  // index_bits <= 63 (codec limit), so both shifts are defined.
  const uint64_t index = code & ((uint64_t(1) << p.index_bits) - 1);
  const int gain = int(code >> p.index_bits);
  if (index >= p.count) {
    for (int j = 0; j < D; ++j) y[j] = 0;
    return 0.f;
  }
  decode_node<D>(t, index, p.K, y);
  int sq = 0;
  for (int j = 0; j < D; ++j) sq += int(y[j]) * int(y[j]);
  return p.levels[gain] * t.inv_norm[sq];
}

}  // namespace pvq
