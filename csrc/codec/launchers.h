// Host entry points of the codec kernels: plain C++ over raw pointers, so the .cu files stay free
// of torch headers and the torch glue (codec/cuda_glue.cpp) stays free of CUDA kernels.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "codec/pyramid.h"
#include "common/device_tables.h"
#include "common/float_kind.h"

namespace pvq_cuda {

// Status bits a kernel ORs into `status` when it meets bad data (the glue then names the row).
enum CodecStatus : int { kStatusOk = 0, kStatusBadData = 1 };

cudaError_t launch_search(const void* x, FloatKind kind, int8_t* pulses, int64_t groups, int D, int K,
                          int* status, cudaStream_t stream);
cudaError_t launch_encode(const pvq::SplitTables& tables, const int8_t* pulses, int64_t* index,
                          int64_t groups, int D, int K, int* status, cudaStream_t stream);
cudaError_t launch_decode(const pvq::SplitTables& tables, const int64_t* index, int8_t* pulses,
                          int64_t groups, int D, int K, uint64_t V, int* status, cudaStream_t stream);

}  // namespace pvq_cuda
