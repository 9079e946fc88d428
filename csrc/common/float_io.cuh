// Loads and stores of the three activation types, as float.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace pvq_cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Calls f with a null pointer of the C++ type behind `kind` (to pick a template instance).
template <typename Kind, typename F>
decltype(auto) dispatch_float_kind(Kind kind, F&& f) {
  switch (kind) {
    case Kind::kFloat16: return f(static_cast<__half*>(nullptr));
    case Kind::kBFloat16: return f(static_cast<__nv_bfloat16*>(nullptr));
    default: return f(static_cast<float*>(nullptr));
  }
}

}  // namespace pvq_cuda
