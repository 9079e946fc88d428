#include "occupancy.h"

#include <cuda_occupancy.h>

namespace pvq_emulation {

// CUDA programming guide, "Technical Specifications per Compute Capability": 8.0 has 164 KB of
// shared memory per SM (163 KB for one block), 9.0 has 228 KB (227 KB); 48 KB without opt-in.
const GpuModel& a100() {
  static const GpuModel gpu{"A100 (sm_80)", 8, 0, 108, 164 * 1024, 163 * 1024, 48 * 1024};
  return gpu;
}

const GpuModel& h100() {
  static const GpuModel gpu{"H100 SXM (sm_90a)", 9, 0, 132, 228 * 1024, 227 * 1024, 48 * 1024};
  return gpu;
}

Occupancy occupancy(const GpuModel& gpu, int threads, int registers, size_t static_smem, size_t dynamic_smem,
                    size_t max_dynamic_smem) {
  cudaOccDeviceProp prop;
  prop.computeMajor = gpu.major;
  prop.computeMinor = gpu.minor;
  prop.maxThreadsPerBlock = 1024;
  prop.maxThreadsPerMultiprocessor = 2048;
  prop.regsPerBlock = 65536;
  prop.regsPerMultiprocessor = 65536;
  prop.warpSize = 32;
  prop.sharedMemPerBlock = gpu.smem_per_block_default;
  prop.sharedMemPerMultiprocessor = gpu.smem_per_sm;
  prop.numSms = gpu.sms;
  prop.sharedMemPerBlockOptin = gpu.smem_per_block_optin;
  prop.reservedSharedMemPerBlock = 1024;  // the driver's per-block reservation since sm_80

  cudaOccFuncAttributes attr;
  attr.maxThreadsPerBlock = 1024;
  attr.numRegs = registers;
  attr.sharedSizeBytes = static_smem;
  attr.partitionedGCConfig = PARTITIONED_GC_OFF;
  attr.shmemLimitConfig = FUNC_SHMEM_LIMIT_OPTIN;
  attr.maxDynamicSharedSizeBytes = max_dynamic_smem;
  attr.numBlockBarriers = 1;

  cudaOccDeviceState state;
  cudaOccResult result;
  Occupancy out;
  if (cudaOccMaxActiveBlocksPerMultiprocessor(&result, &prop, &attr, &state, threads, dynamic_smem) !=
      CUDA_OCC_SUCCESS) {
    out.limited_by = "invalid configuration";
    return out;
  }
  out.blocks_per_sm = result.activeBlocksPerMultiprocessor;
  const struct {
    unsigned bit;
    const char* name;
  } factors[] = {{OCC_LIMIT_WARPS, "threads"},
                 {OCC_LIMIT_REGISTERS, "registers"},
                 {OCC_LIMIT_SHARED_MEMORY, "shared memory"},
                 {OCC_LIMIT_BLOCKS, "block slots"},
                 {OCC_LIMIT_BARRIERS, "barriers"}};
  for (const auto& f : factors) {
    if (!(result.limitingFactors & f.bit)) continue;
    if (!out.limited_by.empty()) out.limited_by += "+";
    out.limited_by += f.name;
  }
  return out;
}

}  // namespace pvq_emulation
