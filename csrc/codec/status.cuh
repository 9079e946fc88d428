// How the codec kernels report bad data: status bits (CodecStatus, codec/launchers.h) ORed into one
// int that the glue reads back.
#pragma once
#include <cuda_runtime.h>

namespace pvq_cuda {

// ORs a thread's status bits into *status with at most one atomic per warp: a kernel fed all-bad
// data would otherwise queue every thread of the grid on one address. All 32 lanes of every warp
// call it once, after the grid-stride loop, where the warp has converged again (block sizes are
// multiples of 32). Good data, the common case, costs one vote.
__device__ __forceinline__ void report_status(int* status, int bits) {
  if (!__any_sync(0xffffffffu, bits != 0)) return;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) bits |= __shfl_xor_sync(0xffffffffu, bits, offset);
  if ((threadIdx.x & 31) == 0) atomicOr(status, bits);
}

}  // namespace pvq_cuda
