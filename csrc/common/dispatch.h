// Turns a run-time group size into a compile-time one, so the split recursion unrolls fully and
// every pulse lives in a register. Torch-free: the CPU kernels and the CUDA launchers share it.
#pragma once
#include <type_traits>

namespace pvq {

template <typename F>
decltype(auto) dispatch_group_size(int D, F&& f) {
  switch (D) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    case 16: return f(std::integral_constant<int, 16>{});
    default: return f(std::integral_constant<int, 32>{});  // callers validate D first
  }
}

}  // namespace pvq
