// Settings of the emulated device (for the driver; kernels and launchers never see these).
#pragma once
#include <cstdio>
#include <string>

#include "occupancy.h"

namespace pvq_emulation {

// The emulated GPU's limits (shared memory per SM and per block) and SM count; an H100 by default.
void set_gpu(const GpuModel& gpu);

// The SM count cudaDeviceGetAttribute reports: 1 or 2 make every grid-stride loop of a persistent
// grid wrap, 132 is an H100 SXM.
void set_sm_count(int sms);

// One tab-separated line per launch: "launch", kernel, grid x,y,z, block x,y,z, dynamic and static
// shared memory bytes, SM count, and the launch's error name (cudaSuccess).
void set_launch_log(std::FILE* log);

// Check and log launches but run no block (for launch configurations of large shapes).
void set_dry_run(bool dry_run);

// Registers per thread of the kernel instance named `kernel` (as the demangled name spells it after
// its namespace, spaces removed: "gemv_kernel<16,1,__half,true>"), as ptxas reports them for the
// emulated GPU. cudaOccupancyMaxActiveBlocksPerMultiprocessor counts them from then on, so the
// launchers size their grids as on that GPU; a kernel never named here has unknown registers, which
// limit nothing. 0 forgets a count.
void set_kernel_registers(const std::string& kernel, int registers);

}  // namespace pvq_emulation
