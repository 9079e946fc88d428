// Resident blocks per SM, from NVIDIA's host-side calculator (cuda_occupancy.h) and the published
// limits of the two GPUs the kernels are built for. Used by the emulated
// cudaOccupancyMaxActiveBlocksPerMultiprocessor (registers unknown there) and by
// bench/kernel_static.py (registers from ptxas).
#pragma once
#include <cstddef>
#include <string>

namespace pvq_emulation {

struct GpuModel {
  const char* name;
  int major, minor;
  int sms;
  size_t smem_per_sm;         // shared memory an SM can give to blocks
  size_t smem_per_block_optin;
  size_t smem_per_block_default;  // without cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
};

// A100 (sm_80) and H100 SXM (sm_90a); the emulated device is the H100 with a chosen SM count.
const GpuModel& a100();
const GpuModel& h100();

struct Occupancy {
  int blocks_per_sm = 0;
  std::string limited_by;  // "threads", "registers", "shared memory", "block slots", "barriers" (joined by +)
};

// registers = 0 means unknown: registers then limit nothing.
Occupancy occupancy(const GpuModel& gpu, int threads, int registers, size_t static_smem, size_t dynamic_smem,
                    size_t max_dynamic_smem);

}  // namespace pvq_emulation
