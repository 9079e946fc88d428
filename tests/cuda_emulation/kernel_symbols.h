// What the emulator learns about a kernel from the executable's own symbol table: its name, and
// its static __shared__ variables (cuda_emulation.h makes them function-local statics, which the
// symbol table lists as <kernel>::<name> with address and size).
#pragma once
#include <cstddef>
#include <string>
#include <vector>

namespace pvq_emulation {

struct SharedVariable {
  void* address;
  size_t bytes;
};

struct KernelSymbols {
  std::string name;                    // demangled, e.g. "void pvq_cuda::(anon)::decode_kernel<8>(...)"
  std::vector<SharedVariable> shared;  // the kernel's static __shared__ variables
  size_t static_smem = 0;              // their total size
};

// Looked up once per kernel (thread-safe). A __shared__ variable declared in a __device__ function
// that the kernel calls, rather than in the kernel itself, is not found (no kernel of ours has one).
const KernelSymbols& kernel_symbols(const void* kernel);

}  // namespace pvq_emulation
