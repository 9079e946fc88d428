// Runs one thread block of an emulated kernel: one OS thread per CUDA thread (from a pool that
// outlives blocks), the block and warp barriers of cuda_emulation.h, and the checks on them.
#pragma once
#include <cstddef>
#include <functional>

#include "cuda_emulation.h"

namespace pvq_emulation {

// Runs the block `block_index` of a launch of grid x block threads: sets each thread's built-in
// variables, calls body on every thread and returns when all have finished. dynamic_smem is what
// dynamic_shared_memory() returns in this block. Blocks run one at a time.
void run_block(dim3 grid, dim3 block, uint3 block_index, void* dynamic_smem, const std::function<void()>& body);

}  // namespace pvq_emulation
