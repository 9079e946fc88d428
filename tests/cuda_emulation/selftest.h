// The emulator's own tests (selftest.cu): each runs kernels that exercise one part of the harness and
// returns "error=cudaSuccess key=value ..." for tests/test_cuda_emulation_harness.py to check; the
// violation tests end the process instead.
#pragma once
#include <string>

namespace pvq_emulation {

std::string run_selftest(const std::string& name);

}  // namespace pvq_emulation
