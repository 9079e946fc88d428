// Host emulation of the CUDA execution model, for running the project's unchanged kernels on a CPU
// (README.md next to this file says how, what it checks, and what it cannot see).
//
// An emulation build force-includes this header (g++ -include) in every translation unit, .cu files
// compiled as C++ included. It must come before any CUDA header: CUDA's host_defines.h keeps the
// execution-space macros it finds already defined, and the device-only parts of the CUDA headers
// stay switched off because __CUDACC__ is not defined. What the CUDA headers give the host as is:
// the vector types (uint4, dim3, make_uint4, ...), __half / __nv_bfloat16 with their conversions,
// the runtime API's declarations (defined by runtime.cpp here) and the cuda_occupancy.h calculator.
#pragma once

#define PVQ_CUDA_EMULATION 1

// Kernels and device functions become plain host functions.
#define __host__
#define __device__
#define __global__
#define __launch_bounds__(...)

// Static shared memory: one object per kernel instance, which is right because the blocks of a
// launch run one after another and all threads of a block share it. Before each block the runtime
// fills every __shared__ variable of the kernel with poison (it finds them in the executable's
// symbol table, see kernel_symbols.h), so reading shared memory before writing it gives garbage,
// never zeros. `extern __shared__` cannot be expressed this way (`extern static`): kernels get
// dynamic shared memory from dynamic_shared_memory<T>() (csrc/common/shared_memory.cuh).
#define __shared__ static

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <bit>
#include <cstdint>
#include <cstring>
#include <functional>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <utility>

// always_inline on every __forceinline__ function only slows the sanitizer builds down.
#undef __forceinline__
#define __forceinline__ inline

// Built-in variables: each emulated CUDA thread is an OS thread, so thread_local is exact.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
inline constexpr int warpSize = 32;

// The runtime API's C++ overload that nvcc's cuda_runtime.h declares only for CUDA sources.
template <class T>
inline cudaError_t cudaFuncSetAttribute(T* func, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(func), attr, value);
}

namespace pvq_emulation {

using Where = std::source_location;

// ----- Block and warp synchronization (block_runner.cpp) --------------------------------------------
// Every barrier names its call site, so a deadlock or a divergent barrier is reported as the line
// where threads wait, with how many wait where.
void sync_block(const Where& where);

// The warp collectives. `mask` is checked: the calling lane must be in it, every lane in it must
// arrive at a collective of the same kind and mask (a lane that returns instead is reported, and so
// is the deadlock when none can), and a shuffle must not read a lane outside the mask.
// kUniform checks that all lanes pass the same value and the same lane_arg (the WMMA operands).
enum class Collective { kSync, kBallot, kAny, kAll, kShflIdx, kShflUp, kShflDown, kShflXor, kUniform };
uint64_t warp_collective(Collective kind, unsigned mask, uint64_t value, int lane_arg, int width,
                         const char* name, const Where& where);

// A collective of the whole warp whose completion runs `body` once, on the last lane to arrive,
// with every lane's `data` pointer while the others wait (the WMMA emulation's mma_sync: one
// collective that reads all lanes' fragments and writes each lane's result). body must not
// synchronize.
void warp_apply(void* data, const std::function<void(void* const* lane_data)>& body, const char* name,
                const Where& where);

// The calling thread's lane (0..31) and the block's dynamic shared memory.
int lane_id();
void* dynamic_shared_memory();

// Reports a violation of the programming model and ends the process (exit status 70).
[[noreturn]] void fail(const Where& where, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

// ----- Launches (runtime.cpp) -------------------------------------------------------------------------
// Checks the configuration as a GPU does (threads per block, shared memory limits and opt-in),
// records it in the launch log, then runs grid.x * grid.y * grid.z blocks one after another, each
// with blockDim threads that each call thread_body. Returns the launch error, as cudaGetLastError
// will (until read).
cudaError_t run_kernel(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem,
                       const std::function<void()>& thread_body);

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t,
                   Args&&... args) {
  // Converted once, like kernel arguments; every thread then gets its own copy, as on a GPU, where a
  // kernel may modify its parameters (decode_kernel's tables do).
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  return run_kernel(reinterpret_cast<const void*>(kernel), grid, block, dynamic_smem,
                    [&] { std::apply(kernel, params); });
}

}  // namespace pvq_emulation

// ----- Barriers and warp collectives ------------------------------------------------------------------
inline void __syncthreads(pvq_emulation::Where where = pvq_emulation::Where::current()) {
  pvq_emulation::sync_block(where);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, pvq_emulation::Where where = pvq_emulation::Where::current()) {
  pvq_emulation::warp_collective(pvq_emulation::Collective::kSync, mask, 0, 0, warpSize, "__syncwarp", where);
}

inline unsigned __ballot_sync(unsigned mask, int predicate,
                              pvq_emulation::Where where = pvq_emulation::Where::current()) {
  return unsigned(pvq_emulation::warp_collective(pvq_emulation::Collective::kBallot, mask, predicate != 0, 0,
                                                 warpSize, "__ballot_sync", where));
}

inline int __any_sync(unsigned mask, int predicate, pvq_emulation::Where where = pvq_emulation::Where::current()) {
  return int(pvq_emulation::warp_collective(pvq_emulation::Collective::kAny, mask, predicate != 0, 0, warpSize,
                                            "__any_sync", where));
}

inline int __all_sync(unsigned mask, int predicate, pvq_emulation::Where where = pvq_emulation::Where::current()) {
  return int(pvq_emulation::warp_collective(pvq_emulation::Collective::kAll, mask, predicate != 0, 0, warpSize,
                                            "__all_sync", where));
}

namespace pvq_emulation {

// Shuffles move up to 8 bytes of any trivially copyable type (int, float, double, __half, ...).
template <typename T>
T shuffle(Collective kind, const char* name, unsigned mask, T var, int lane_arg, int width, const Where& where) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_collective(kind, mask, bits, lane_arg, width, name, where);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace pvq_emulation

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
              pvq_emulation::Where where = pvq_emulation::Where::current()) {
  return pvq_emulation::shuffle(pvq_emulation::Collective::kShflIdx, "__shfl_sync", mask, var, src_lane, width, where);
}

template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 pvq_emulation::Where where = pvq_emulation::Where::current()) {
  return pvq_emulation::shuffle(pvq_emulation::Collective::kShflUp, "__shfl_up_sync", mask, var, int(delta), width,
                                where);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   pvq_emulation::Where where = pvq_emulation::Where::current()) {
  return pvq_emulation::shuffle(pvq_emulation::Collective::kShflDown, "__shfl_down_sync", mask, var, int(delta),
                                width, where);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  pvq_emulation::Where where = pvq_emulation::Where::current()) {
  return pvq_emulation::shuffle(pvq_emulation::Collective::kShflXor, "__shfl_xor_sync", mask, var, lane_mask, width,
                                where);
}

inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ----- Atomics: relaxed, as CUDA's are (they order nothing else, so TSan sees no order from them) ----
// The value's type is not deduced (std::type_identity_t), so atomicOr(int*, SomeEnum) converts the
// value as CUDA's non-template overloads do.
#define PVQ_EMULATION_ATOMIC(name, op)                                             \
  template <typename T>                                                            \
  inline T name(T* address, std::type_identity_t<T> value) {                       \
    return std::atomic_ref<T>(*address).op(value, std::memory_order_relaxed);      \
  }
PVQ_EMULATION_ATOMIC(atomicAdd, fetch_add)
PVQ_EMULATION_ATOMIC(atomicSub, fetch_sub)
PVQ_EMULATION_ATOMIC(atomicAnd, fetch_and)
PVQ_EMULATION_ATOMIC(atomicOr, fetch_or)
PVQ_EMULATION_ATOMIC(atomicXor, fetch_xor)
PVQ_EMULATION_ATOMIC(atomicExch, exchange)
#undef PVQ_EMULATION_ATOMIC

namespace pvq_emulation {

// Replaces *address by value while `better(value, old)`; returns the old value.
template <typename T, typename Better>
T atomic_replace_if(T* address, T value, Better better) {
  std::atomic_ref<T> a(*address);
  T old = a.load(std::memory_order_relaxed);
  while (better(value, old) && !a.compare_exchange_weak(old, value, std::memory_order_relaxed)) {
  }
  return old;
}

}  // namespace pvq_emulation

template <typename T>
inline T atomicMax(T* address, std::type_identity_t<T> value) {
  return pvq_emulation::atomic_replace_if(address, value, [](T v, T old) { return old < v; });
}

template <typename T>
inline T atomicMin(T* address, std::type_identity_t<T> value) {
  return pvq_emulation::atomic_replace_if(address, value, [](T v, T old) { return v < old; });
}

template <typename T>
inline T atomicCAS(T* address, std::type_identity_t<T> compare, std::type_identity_t<T> value) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value, std::memory_order_relaxed);
  return compare;  // the old value, whether or not it was swapped
}

// ----- Intrinsics (the device semantics, written for the host) ------------------------------------------
template <typename T>
inline T __ldg(const T* address) {
  return *address;  // alignment is the type's, checked by UBSan's -fsanitize=alignment
}

inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)((unsigned __int128)a * b >> 64);
}
inline long long __mul64hi(long long a, long long b) { return (long long)((__int128)a * b >> 64); }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((unsigned long long)a * b >> 32); }
inline int __mulhi(int a, int b) { return int((long long)a * b >> 32); }

inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline float __int_as_float(int i) { return std::bit_cast<float>(i); }
inline int __float_as_int(float f) { return std::bit_cast<int>(f); }
inline double __longlong_as_double(long long i) { return std::bit_cast<double>(i); }
inline long long __double_as_longlong(double d) { return std::bit_cast<long long>(d); }

// The round-to-nearest arithmetic intrinsics: one IEEE operation each, which is what plain
// operators are here, since every emulated translation unit is compiled with -ffp-contract=off
// (emulation.py): g++ never fuses them into an FMA, just as nvcc never fuses the intrinsics.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }

inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(int x) { return std::countl_zero(unsigned(x)); }  // 32 for 0, as on the device
inline int __clzll(long long x) { return std::countl_zero((unsigned long long)x); }
inline int __ffs(int x) { return x == 0 ? 0 : std::countr_zero(unsigned(x)) + 1; }
inline int __ffsll(long long x) { return x == 0 ? 0 : std::countr_zero((unsigned long long)x) + 1; }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned long long __brevll(unsigned long long x) {
  unsigned long long r = 0;
  for (int i = 0; i < 64; ++i) r |= ((x >> i) & 1ull) << (63 - i);
  return r;
}
// Funnel shifts of the 64-bit hi:lo: _l/_r take the shift mod 32, _lc/_rc clamp it to 32.
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
  return unsigned((((unsigned long long)hi << 32 | lo) << (shift & 31)) >> 32);
}
inline unsigned __funnelshift_lc(unsigned lo, unsigned hi, unsigned shift) {
  return unsigned((((unsigned long long)hi << 32 | lo) << (shift < 32 ? shift : 32)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  return unsigned(((unsigned long long)hi << 32 | lo) >> (shift & 31));
}
inline unsigned __funnelshift_rc(unsigned lo, unsigned hi, unsigned shift) {
  return unsigned(((unsigned long long)hi << 32 | lo) >> (shift < 32 ? shift : 32));
}
