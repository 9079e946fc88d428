#include "codec/split_tables.h"

#include <cmath>

namespace pvq {
namespace {

using u128 = unsigned __int128;

uint64_t saturate(u128 v) { return v > u128(kSaturated) ? kSaturated : uint64_t(v); }

int bit_length(uint64_t v) {
  int b = 0;
  while (v) {
    ++b;
    v >>= 1;
  }
  return b;
}

SplitTableStorage build() {
  SplitTableStorage s;
  constexpr int KS = kMaxK + 1;
  s.count.assign((kMaxLevel + 1) * KS, 0);
  for (int k = 0; k < KS; ++k) s.count[k] = k == 0 ? 1 : 2;
  s.offset.assign(kMaxLevel * kOffsetsPerLevel, kSaturated);
  for (int l = 1; l <= kMaxLevel; ++l) {
    const uint64_t* half = &s.count[(l - 1) * KS];
    for (int k = 0; k < KS; ++k) {
      uint64_t* off = &s.offset[(l - 1) * kOffsetsPerLevel + tri(k)];
      u128 acc = 0;
      for (int k1 = 0; k1 <= k + 1; ++k1) {
        off[k1] = saturate(acc);
        if (k1 <= k) acc += u128(half[k1]) * half[k - k1];  // saturated terms stay saturated
      }
      s.count[l * KS + k] = off[k + 1];
    }
  }

  // Guide: bucket b covers indices [b << shift, (b+1) << shift); it stores the k1 of its first one.
  constexpr int G = 1 << kGuideBits;
  s.guide.assign(kMaxLevel * KS * G, 0);
  s.guide_shift.assign(kMaxLevel * KS, 0);
  for (int l = 1; l <= kMaxLevel; ++l) {
    for (int k = 0; k < KS; ++k) {
      const uint64_t V = s.count[l * KS + k];
      if (V == kSaturated) continue;  // never a valid node
      const uint64_t* off = &s.offset[(l - 1) * kOffsetsPerLevel + tri(k)];
      const int bits = bit_length(V - 1);
      const int shift = bits > kGuideBits ? bits - kGuideBits : 0;
      const int node = (l - 1) * KS + k;
      s.guide_shift[node] = uint8_t(shift);
      int k1 = 0;
      for (int b = 0; b < G; ++b) {
        const u128 first = u128(b) << shift;
        while (k1 < k && u128(off[k1 + 1]) <= first) ++k1;
        s.guide[node * G + b] = uint8_t(k1);
      }
    }
  }

  // Reciprocals for the child counts V(2^l, k), l = 0..4 (see divide() in pyramid.h).
  s.magic.assign(kMaxLevel * KS, 0);
  s.magic_log.assign(kMaxLevel * KS, 0);
  for (int l = 0; l < kMaxLevel; ++l) {
    for (int k = 0; k < KS; ++k) {
      const uint64_t d = s.count[l * KS + k];
      if (d == kSaturated) continue;
      const int lg = bit_length(d - 1);  // ceil(log2 d)
      const u128 m = ((u128(1) << (63 + lg)) + d - 1) / d;
      s.magic[l * KS + k] = uint64_t(m);
      s.magic_log[l * KS + k] = uint8_t(lg);
    }
  }

  // The 4-leaf table is the recursion itself, tabulated: decode every index of every k <= 16 by
  // splitting 4 -> 2+2, so any leaf size yields the same indices.
  s.leaf_max_k = -1;
  const SplitTables split_only = s.view();
  s.leaf_base.assign(kHostLeafMaxK + 2, 0);
  for (int k = 0; k <= kHostLeafMaxK; ++k) {
    const uint64_t n = s.count[2 * KS + k];
    s.leaf_base[k + 1] = s.leaf_base[k] + uint32_t(n);
    for (uint64_t i = 0; i < n; ++i) {
      int8_t y[4];
      decode_node<4>(split_only, i, k, y);
      uint32_t w = 0;
      for (int j = 0; j < 4; ++j) w |= uint32_t(uint8_t(y[j])) << (8 * j);
      s.leaf.push_back(w);
    }
  }
  s.leaf_max_k = kHostLeafMaxK;

  s.inv_norm.assign(kMaxK * kMaxK + 1, 0.f);
  for (int q = 1; q <= kMaxK * kMaxK; ++q) s.inv_norm[q] = float(1.0 / std::sqrt(double(q)));
  return s;
}

}  // namespace

SplitTables SplitTableStorage::view() const {
  return SplitTables{count.data(), offset.data(),    guide.data(), guide_shift.data(),
                     magic.data(), magic_log.data(), leaf_base.data(), leaf.data(),
                     inv_norm.data(), leaf_max_k};
}

const SplitTableStorage& host_split_tables() {
  static const SplitTableStorage tables = build();
  return tables;
}

int group_level(int64_t D) {
  for (int l = 0; l <= kMaxLevel; ++l)
    if (D == (int64_t(1) << l)) return l;
  return -1;
}

uint64_t pyramid_count(int64_t D, int64_t K) {
  return host_split_tables().count[group_level(D) * (kMaxK + 1) + K];
}

int index_bits(uint64_t V) { return bit_length(V - 1); }

}  // namespace pvq
