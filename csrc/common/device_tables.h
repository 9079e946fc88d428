// The codec's split tables (codec/split_tables.h) in device memory: shared by the codec kernels and
// the packed-layer kernels, which decode with the same tables.
#pragma once
#include <cuda_runtime.h>

#include "codec/pyramid.h"

namespace pvq_cuda {

// The split tables on `device` (uploaded on first use, then cached for the process).
cudaError_t device_split_tables(int device, pvq::SplitTables* out);

}  // namespace pvq_cuda
