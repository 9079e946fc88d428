// Helpers shared by the families' torch glue (<family>/cuda_glue.cpp, compiled by g++ with torch
// headers); the .cu side never sees torch types.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>

#include "common/device_tables.h"
#include "common/float_kind.h"

namespace pvq_cuda {

// Callers have checked the dtype is one of the three float types.
inline FloatKind float_kind_of(c10::ScalarType st) {
  switch (st) {
    case c10::ScalarType::Half: return FloatKind::kFloat16;
    case c10::ScalarType::BFloat16: return FloatKind::kBFloat16;
    default: return FloatKind::kFloat32;
  }
}

// The codec tables on the device that holds `t`.
inline pvq::SplitTables split_tables_on(const at::Tensor& t) {
  pvq::SplitTables tables;
  C10_CUDA_CHECK(device_split_tables(t.get_device(), &tables));
  return tables;
}

}  // namespace pvq_cuda
