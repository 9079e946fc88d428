// Host construction of the split-order tables (pyramid.h reads them; the CUDA side copies them to
// each device). Torch-free.
#pragma once
#include <cstdint>
#include <vector>

#include "codec/pyramid.h"

namespace pvq {

struct SplitTableStorage {
  std::vector<uint64_t> count, offset, magic;
  std::vector<uint8_t> guide, guide_shift, magic_log;
  std::vector<uint32_t> leaf_base, leaf;
  std::vector<float> inv_norm;
  int leaf_max_k = -1;

  SplitTables view() const;
};

// Built on first use (thread-safe), then shared by every CPU kernel and every device upload.
const SplitTableStorage& host_split_tables();

// log2 of D when D is a supported group size (1, 2, 4, ..., 32), else -1.
int group_level(int64_t D);

// V(D, K) for a supported D and 0 <= K <= kMaxK; kSaturated when it does not fit 64 bits.
uint64_t pyramid_count(int64_t D, int64_t K);

// ceil(log2 V(D, K)): the bits of a fixed-width index field.
int index_bits(uint64_t V);

}  // namespace pvq
