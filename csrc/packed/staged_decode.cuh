// The decode-GEMV's group decoder: split-order decoding (codec/pyramid.h's decode_node, the same
// indices and the same pulses) from per-K records that a block stages once in shared memory.
//
// Why a second decoder (bench/results/kernel-budget-*.md has the numbers):
// - decode_node reads the global tables, indexed for every k <= 127, through 64-bit addresses:
//   about 60 instructions per split node. A layer has one K, so the records of k <= K are a
//   prefix of each global table; staged in shared memory they are read with 32-bit addresses.
// - Its 4-leaf table holds only small k (4-40 KB), so most leaves take the 4 -> 2+2 fallback and
//   a warp pays for both paths. Here every 4-node splits, always, and every 2-leaf is one 8-byte
//   read of a float pair table (V(2,k) = 4k entries for each k <= K: 15.1 KB at K = 30), so the
//   decode has no data-dependent branch but the guide walks, and the pulses arrive as floats.
// - Nodes of N <= 8 run in 32 bits (V(8,K) < 2^32 for K <= 35); the 4-node's divisor V(2,k2) = 4 k2
//   takes one 32-bit multiply-high (see below), the 8-node's V(4,k2) the two-product divide32.
// Scope: K <= kStagedMaxK (every preset). Larger K decodes with decode_node (gemv.cu picks).
#pragma once
#include <cstdint>

#include "codec/pyramid.h"

namespace pvq_cuda {

constexpr int kStagedMaxK = 35;  // V(8, 35) < 2^32, and the pair table stays <= 21 KB

// Byte offsets of a block's staged records for (D, K), in one shared-memory buffer. Level l is the
// node size N = 2^l, l = 2..log2(D). 8-byte arrays first, then 4-byte, then bytes, so each is
// aligned when the buffer is.
struct StagedLayout {
  int K = 0;
  int offsets[pvq::kMaxLevel + 1] = {};  // level l's split offsets off(2^l, k, k1) at tri(k) + k1
  int guide[pvq::kMaxLevel + 1] = {};    // level l's guide buckets, [k][64]
  int shift[pvq::kMaxLevel + 1] = {};    // level l's guide shifts, [k]
  int magic[pvq::kMaxLevel + 1] = {};    // level l's reciprocals of its children's counts, [k2]
  int magic_log[pvq::kMaxLevel + 1] = {};
  int count[pvq::kMaxLevel + 1] = {};    // level l's children's counts V(2^(l-1), k2), [k2]
  int pairs = 0;                         // float2 pulses of every 2-leaf, k <= K: pair_base(k) + i
  int bytes = 0;
};

// Where the 2-leaves of k pulses start. Each k gets 4k + 1 slots (V(2, k) = 4k, and 1 at k = 0), one
// more than it needs for k >= 1, so the base is k(2k - 1): two instructions, no select.
PVQ_HD int pair_base(int k) { return k * (2 * k - 1); }

PVQ_HD StagedLayout staged_layout(int D, int K) {
  StagedLayout s;
  s.K = K;
  int L = 0;
  while ((1 << L) < D) ++L;
  const int n_off = pvq::tri(K + 1), n_k = K + 1;
  int at = 0;
  auto place = [&at](int bytes, int align) {
    at = (at + align - 1) / align * align;
    const int here = at;
    at += bytes;
    return here;
  };
  // 8-byte: the float pairs, the wide levels' offsets and counts, every magic (levels >= 3).
  s.pairs = place(pair_base(K + 1) * 8, 16);
  for (int l = 3; l <= L; ++l) {
    if (l >= 4) s.offsets[l] = place(n_off * 8, 8);
    if (l >= 4) s.count[l] = place(n_k * 8, 8);
    s.magic[l] = place(n_k * 8, 8);
  }
  // 4-byte: the 32-bit levels' offsets (N = 4, 8), the 8-node's child counts, the 4-node's magic.
  for (int l = 2; l <= L && l <= 3; ++l) s.offsets[l] = place(n_off * 4, 4);
  if (L >= 3) s.count[3] = place(n_k * 4, 4);
  if (L >= 2) s.magic[2] = place(n_k * 4, 4);
  for (int l = 2; l <= L; ++l) {
    s.guide[l] = place(n_k * (1 << pvq::kGuideBits), 1);
    s.shift[l] = place(n_k, 1);
    if (l >= 3) s.magic_log[l] = place(n_k, 1);
  }
  s.bytes = (at + 15) / 16 * 16;
  return s;
}

// Fills the staged records from the global tables (all threads of the block call it, then sync).
// Every record of k <= K is a prefix of its global table, so each copy is a plain prefix copy.
template <int D>
__device__ __forceinline__ void stage_records(const pvq::SplitTables& t, const StagedLayout& s, unsigned char* smem) {
  constexpr int L = pvq::Log2<D>::value;
  constexpr int KS = pvq::kMaxK + 1;
  const int K = s.K, n_off = pvq::tri(K + 1), tid = threadIdx.x, nt = blockDim.x;
  float2* pairs = reinterpret_cast<float2*>(smem + s.pairs);
  for (int k = 0; k <= K; ++k) {
    const int n = k == 0 ? 1 : 4 * k;
    for (int i = tid; i < n; i += nt) {
      int8_t y[2];
      pvq::decode_node<2>(t, uint64_t(i), k, y);
      pairs[pair_base(k) + i] = make_float2(float(y[0]), float(y[1]));
    }
  }
#pragma unroll
  for (int l = 2; l <= L; ++l) {
    const uint64_t* off = t.offset + (l - 1) * pvq::kOffsetsPerLevel;
    const uint8_t* guide = t.guide + (l - 1) * KS * (1 << pvq::kGuideBits);
    const uint8_t* shift = t.guide_shift + (l - 1) * KS;
    const uint64_t* child_count = t.count + (l - 1) * KS;
    for (int e = tid; e < n_off; e += nt) {
      if (l <= 3) reinterpret_cast<uint32_t*>(smem + s.offsets[l])[e] = uint32_t(off[e]);  // < V(8,K) < 2^32
      else reinterpret_cast<uint64_t*>(smem + s.offsets[l])[e] = off[e];
    }
    for (int e = tid; e < (K + 1) << pvq::kGuideBits; e += nt) (smem + s.guide[l])[e] = guide[e];
    for (int k = tid; k <= K; k += nt) {
      (smem + s.shift[l])[k] = shift[k];
      if (l == 2) {
        // floor(r / 4k2) = umulhi(r, ceil(2^32 / 4k2)) for r 4k2 < 2^32 (r < V(4,K) < 2^17 here);
        // k2 = 0 (divisor 1) is a select in the decoder.
        reinterpret_cast<uint32_t*>(smem + s.magic[2])[k] =
            k == 0 ? 0u : uint32_t(((uint64_t(1) << 32) + 4 * k - 1) / (4 * k));
      } else {
        reinterpret_cast<uint64_t*>(smem + s.magic[l])[k] = t.magic[(l - 1) * KS + k];
        (smem + s.magic_log[l])[k] = t.magic_log[(l - 1) * KS + k];
        if (l == 3) reinterpret_cast<uint32_t*>(smem + s.count[3])[k] = uint32_t(child_count[k]);
        else reinterpret_cast<uint64_t*>(smem + s.count[l])[k] = child_count[k];
      }
    }
  }
}

// One node of N pulses-to-be with index i and k pulses: y gets its N pulses as floats.
// I is uint32_t for N <= 8 and uint64_t above (decode_node's values, narrower types).
template <int N, typename I>
__device__ __forceinline__ void staged_node(const unsigned char* smem, const StagedLayout& s, I i, int k, float* y) {
  if constexpr (N == 1) {
    y[0] = float(k == 0 ? 0 : (i ? -k : k));
  } else if constexpr (N == 2) {
    const float2 v = reinterpret_cast<const float2*>(smem + s.pairs)[pair_base(k) + int(i)];
    y[0] = v.x;
    y[1] = v.y;
  } else {
    constexpr int L = pvq::Log2<N>::value, H = N / 2;
    using Child = std::conditional_t<(H <= 8), uint32_t, I>;
    const I* off = reinterpret_cast<const I*>(smem + s.offsets[L]) + pvq::tri(k);
    int k1 = (smem + s.guide[L])[(k << pvq::kGuideBits) + int(i >> (smem + s.shift[L])[k])];
    while (off[k1 + 1] <= i) ++k1;
    const int k2 = k - k1;
    const I r = i - off[k1];
    Child i1, i2;
    if constexpr (N == 4) {
      const uint32_t m = reinterpret_cast<const uint32_t*>(smem + s.magic[2])[k2];
      i1 = k2 == 0 ? r : __umulhi(r, m);
      i2 = r - i1 * (k2 == 0 ? 1u : 4u * uint32_t(k2));
    } else if constexpr (N == 8) {
      i1 = pvq::divide32(r, reinterpret_cast<const uint64_t*>(smem + s.magic[3])[k2], (smem + s.magic_log[3])[k2]);
      i2 = r - i1 * reinterpret_cast<const uint32_t*>(smem + s.count[3])[k2];
    } else {
      const uint64_t q = pvq::divide(r, reinterpret_cast<const uint64_t*>(smem + s.magic[L])[k2],
                                     (smem + s.magic_log[L])[k2]);
      i1 = Child(q);
      i2 = Child(r - q * reinterpret_cast<const uint64_t*>(smem + s.count[L])[k2]);
    }
    staged_node<H, Child>(smem, s, i1, k1, y);
    staged_node<H, Child>(smem, s, i2, k2, y + H);
  }
}

// One group's pulses as floats and its scale level[gain] / |y| (row scale excluded), as
// pvq::decode_group. A corrupt index decodes index 0 and returns scale 0: no branch, no read out of
// bounds, and zero weights, as decode_group gives.
template <int D>
__device__ __forceinline__ float staged_decode_group(const unsigned char* smem, const StagedLayout& s,
                                                     const pvq::SplitTables& t, const pvq::PackedLayer& p,
                                                     uint64_t code, float (&y)[D]) {
  uint64_t index = code & ((uint64_t(1) << p.index_bits) - 1);
  const int gain = int(code >> p.index_bits);
  const bool valid = index < p.count;
  index = valid ? index : 0;
  using Top = std::conditional_t<(D <= 8), uint32_t, uint64_t>;
  staged_node<D, Top>(smem, s, Top(index), p.K, y);
  float sq = 0.f;  // exact: sum y^2 <= K^2 < 2^24
#pragma unroll
  for (int d = 0; d < D; ++d) sq = fmaf(y[d], y[d], sq);
  return valid ? p.levels[gain] * t.inv_norm[int(sq)] : 0.f;
}

}  // namespace pvq_cuda
