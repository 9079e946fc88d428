// Kernels that test the emulator itself (tests/test_cuda_emulation_harness.py checks their output):
// the intrinsics' and collectives' device semantics, atomics, shared-memory poison, the WMMA layout
// scrambling, the launch limits and occupancy, and, one per process, each programming-model
// violation the harness must stop on. Written as CUDA; compiled only into the emulator.
#include <mma.h>

#include <cstdint>
#include <sstream>
#include <string>

#include "common/launch.h"
#include "common/shared_memory.cuh"
#include "selftest.h"

namespace pvq_emulation {
namespace {

// ----- Values -------------------------------------------------------------------------------------------

__global__ void intrinsics_kernel(unsigned long long* out) {
  int i = 0;
  out[i++] = __popc(0xf0f0f0f1u);
  out[i++] = __popcll(0xffffffffffull << 20);
  out[i++] = __clz(0);
  out[i++] = __clz(0x00010000);
  out[i++] = __clzll(1ll);
  out[i++] = __ffs(0);
  out[i++] = __ffs(0x50);
  out[i++] = __ffsll(1ll << 40);
  out[i++] = __brev(0x00000001u);
  out[i++] = __brev(0x12345678u);
  out[i++] = __brevll(0x8000000000000003ull);
  out[i++] = __funnelshift_l(0x89abcdefu, 0x01234567u, 8);
  out[i++] = __funnelshift_l(0x89abcdefu, 0x01234567u, 40);   // shift mod 32
  out[i++] = __funnelshift_lc(0x89abcdefu, 0x01234567u, 40);  // shift clamped to 32
  out[i++] = __funnelshift_r(0x89abcdefu, 0x01234567u, 8);
  out[i++] = __funnelshift_rc(0x89abcdefu, 0x01234567u, 40);
  out[i++] = __umul64hi(0xfedcba9876543210ull, 0x0123456789abcdefull);
  out[i++] = (unsigned long long)__mul64hi(-5ll, 0x7fffffffffffffffll);
  out[i++] = __umulhi(0xffffffffu, 0xfffffffeu);
  out[i++] = (unsigned long long)(long long)__mulhi(-7, 0x40000000);
  out[i++] = __float_as_uint(-1.5f);
  out[i++] = __float_as_uint(__uint_as_float(0x7fa5a5a5u));
  out[i++] = __half_as_ushort(__float2half_rn(65519.0f));  // rounds to 65504
  out[i++] = __bfloat16_as_ushort(__float2bfloat16_rn(1.00390625f));  // ties to even: 1.0
  out[i++] = __ldg(out);
}

// Lane l of each of two warps records what every collective gave it (one row of `stride` values).
constexpr int kCollectiveValues = 12;

__global__ void collectives_kernel(int* out) {
  const int lane = threadIdx.x & 31;
  const int v = 100 * (threadIdx.x >> 5) + lane;
  int* row = out + threadIdx.x * kCollectiveValues;
  row[0] = __shfl_sync(0xffffffffu, v, (lane * 7) % 32);
  row[1] = __shfl_sync(0xffffffffu, v, lane + 3, 8);      // src modulo width, within the segment
  row[2] = __shfl_up_sync(0xffffffffu, v, 3, 16);         // below the segment: own value
  row[3] = __shfl_down_sync(0xffffffffu, v, 5);
  row[4] = __shfl_xor_sync(0xffffffffu, v, 9);
  row[5] = __shfl_xor_sync(0xffffffffu, v, 16, 16);       // past the segment: own value
  row[6] = int(__ballot_sync(0xffffffffu, lane % 3 == 0));
  row[7] = __any_sync(0xffffffffu, lane == 31 && threadIdx.x < 32);
  row[8] = __all_sync(0xffffffffu, lane < 32);
  // Two disjoint half-warp collectives at the same time.
  const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  row[9] = __shfl_sync(half, v, lane < 16 ? 15 : 16);
  row[10] = int(__ballot_sync(half, lane & 1));
  __syncwarp();
  row[11] = int(__shfl_sync(0xffffffffu, 2.5f * float(v), 31));  // any 4-byte type
}

__global__ void atomics_kernel(int* ints, unsigned long long* ulls, float* floats) {
  const int t = int(blockIdx.x * blockDim.x + threadIdx.x);
  atomicAdd(&ints[0], 1);
  atomicMax(&ints[1], t);
  atomicMin(&ints[2], -t);
  atomicOr(&ints[3], 1 << (t % 31));
  atomicAnd(&ints[4], ~(1 << (t % 31)));
  atomicXor(&ints[5], t);
  atomicAdd(&ulls[0], 1ull << 33);
  atomicAdd(&floats[0], 0.5f);
  atomicAdd(&ints[7], atomicCAS(&ints[6], 0, t + 1) == 0 ? 1 : 0);  // exactly one thread swaps
  atomicExch(&ints[8], 7);
}

// Reads shared memory before writing it (the poison), then writes it for the next block to find
// poisoned again.
__global__ void poison_kernel(uint32_t* out, int words) {
  __shared__ uint32_t static_words[8];
  uint32_t* dynamic = pvq_cuda::dynamic_shared_memory<uint32_t>();
  if (threadIdx.x == 0) {
    out[blockIdx.x * 2] = static_words[3];
    out[blockIdx.x * 2 + 1] = dynamic[words - 1];
    static_words[3] = 0;
    dynamic[words - 1] = 0;
  }
}

// Tile values 0..255 loaded into fragments; each lane writes which tile element it holds where.
__global__ void wmma_layout_kernel(const __half* tile, const float* tile_f, float* a_slots, float* c_slots) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
  wmma::load_matrix_sync(a, tile, 16);
  wmma::load_matrix_sync(c, tile_f, 16, wmma::mem_row_major);
  const int lane = threadIdx.x & 31;
  for (int e = 0; e < a.num_elements; ++e) a_slots[lane * a.num_elements + e] = __half2float(a.x[e]);
  for (int e = 0; e < c.num_elements; ++e) c_slots[lane * c.num_elements + e] = c.x[e];
}

// D = A B + C for 16 x 16 x 16, A row-major, B col-major; D column-major, one copy per warp.
__global__ void wmma_mma_kernel(const __half* A, const __half* B, const float* C, float* D) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
  wmma::load_matrix_sync(a, A, 16);
  wmma::load_matrix_sync(b, B, 16);
  wmma::load_matrix_sync(c, C, 16, wmma::mem_row_major);
  wmma::mma_sync(c, a, b, c);
  wmma::store_matrix_sync(D + 256 * (threadIdx.x >> 5), c, 16, wmma::mem_col_major);
}

// ----- Violations: each ends the process with a harness error --------------------------------------------

__global__ void deadlock_kernel() {
  // Lanes 0-15 of warp 4 wait for lanes 16-31 at a warp barrier; those wait at the block barrier for
  // them, as do all other threads.
  if (threadIdx.x >= 128 && threadIdx.x < 144) __syncwarp();
  __syncthreads();
}

__global__ void divergent_barrier_kernel() {
  if (threadIdx.x < 64) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void return_before_barrier_kernel() {
  if (threadIdx.x < 32) return;
  __syncthreads();
}

__global__ void mask_excludes_caller_kernel(int* out) { out[threadIdx.x] = __shfl_sync(0xfffffffeu, 1, 1); }

__global__ void mask_mismatch_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(threadIdx.x < 8 ? 0x000000ffu : 0xffffffffu, 1, 0);
}

__global__ void read_outside_mask_kernel(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1, 20);
}

__global__ void wmma_divergent_pointer_kernel(const __half* tile) {
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> a;
  nvcuda::wmma::load_matrix_sync(a, tile + 16 * (threadIdx.x & 1), 16);
}

__global__ void big_static_smem_kernel(int* out) {
  __shared__ char big[50 * 1024];
  big[threadIdx.x] = 1;
  out[0] = big[0];
}

__global__ void empty_kernel() {}

template <typename T>
struct DeviceArray {
  T* p = nullptr;
  explicit DeviceArray(size_t n, int fill = 0) {
    cudaMalloc(reinterpret_cast<void**>(&p), n * sizeof(T));
    cudaMemset(p, fill, n * sizeof(T));
  }
  ~DeviceArray() { cudaFree(p); }
};

template <typename T>
void list(std::ostringstream& s, const char* key, const T* values, size_t n) {
  s << " " << key << "=";
  for (size_t i = 0; i < n; ++i) s << (i ? "," : "") << values[i];
}

const char* name_of(cudaError_t err) { return cudaGetErrorName(err); }

}  // namespace

std::string run_selftest(const std::string& name) {
  std::ostringstream s;
  s << "error=cudaSuccess";
  if (name == "intrinsics") {
    DeviceArray<unsigned long long> out(32);
    out.p[0] = 0;
    pvq_cuda::launch_kernel(intrinsics_kernel, 1, 1, 0, nullptr, out.p);
    list(s, "values", out.p, 25);
  } else if (name == "collectives") {
    DeviceArray<int> out(64 * kCollectiveValues);
    s << " launch=" << name_of(pvq_cuda::launch_kernel(collectives_kernel, 1, 64, 0, nullptr, out.p));
    list(s, "values", out.p, 64 * kCollectiveValues);
  } else if (name == "atomics") {
    DeviceArray<int> ints(9);
    DeviceArray<unsigned long long> ulls(1);
    DeviceArray<float> floats(1);
    ints.p[2] = 0;
    ints.p[4] = -1;
    pvq_cuda::launch_kernel(atomics_kernel, 4, 256, 0, nullptr, ints.p, ulls.p, floats.p);
    list(s, "ints", ints.p, 9);
    s << " ull=" << ulls.p[0] << " float=" << floats.p[0];
  } else if (name == "poison") {
    const int words = 100;
    DeviceArray<uint32_t> out(6);
    pvq_cuda::launch_kernel(poison_kernel, 3, 32, words * sizeof(uint32_t), nullptr, out.p, words);
    list(s, "words", out.p, 6);
  } else if (name == "wmma_layout") {
    DeviceArray<__half> tile(256);
    DeviceArray<float> tile_f(256), a_slots(256), c_slots(256);
    for (int i = 0; i < 256; ++i) {
      tile.p[i] = __float2half_rn(float(i));
      tile_f.p[i] = float(i);
    }
    pvq_cuda::launch_kernel(wmma_layout_kernel, 1, 32, 0, nullptr, tile.p, tile_f.p, a_slots.p, c_slots.p);
    list(s, "a", a_slots.p, 256);
    list(s, "c", c_slots.p, 256);
  } else if (name == "wmma_mma") {
    DeviceArray<__half> A(256), B(256);
    DeviceArray<float> C(256), D(512);
    for (int i = 0; i < 256; ++i) {  // small integers: every product and sum exact
      A.p[i] = __float2half_rn(float(i % 7 - 3));
      B.p[i] = __float2half_rn(float(i % 5 - 2));
      C.p[i] = float(i % 11);
    }
    pvq_cuda::launch_kernel(wmma_mma_kernel, 1, 64, 0, nullptr, A.p, B.p, C.p, D.p);  // two warps, same tile
    list(s, "D", D.p, 512);
  } else if (name == "limits") {
    auto launch = [&](dim3 grid, dim3 block, size_t smem) {
      return name_of(pvq_cuda::launch_kernel(empty_kernel, grid, block, smem, nullptr));
    };
    s << " threads_1024=" << launch(1, 1024, 0) << " threads_1025=" << launch(1, 1025, 0)
      << " block_32x32x2=" << launch(1, dim3(32, 32, 2), 0) << " block_z65=" << launch(1, dim3(1, 1, 65), 0)
      << " grid_y65536=" << launch(dim3(1, 65536), 32, 0) << " smem_48k=" << launch(1, 32, 48 * 1024)
      << " smem_48k_plus_1=" << launch(1, 32, 48 * 1024 + 1);
    s << " optin_227k=" << name_of(cudaFuncSetAttribute(empty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                         227 * 1024))
      << " smem_227k=" << launch(1, 32, 227 * 1024) << " smem_227k_plus_1=" << launch(1, 32, 227 * 1024 + 1)
      << " optin_227k_plus_1="
      << name_of(cudaFuncSetAttribute(empty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024 + 1));
    int blocks = 0;
    auto occupancy = [&](int threads, size_t smem) {
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, empty_kernel, threads, smem);
      return blocks;
    };
    s << " occupancy_256=" << occupancy(256, 0) << " occupancy_1024=" << occupancy(1024, 0)
      << " occupancy_32=" << occupancy(32, 0) << " occupancy_128_100k=" << occupancy(128, 100 * 1024);
  } else if (name == "deadlock") {
    pvq_cuda::launch_kernel(deadlock_kernel, 1, 256, 0, nullptr);
  } else if (name == "divergent_barrier") {
    pvq_cuda::launch_kernel(divergent_barrier_kernel, 1, 128, 0, nullptr);
  } else if (name == "return_before_barrier") {
    pvq_cuda::launch_kernel(return_before_barrier_kernel, 1, 128, 0, nullptr);
  } else if (name == "mask_excludes_caller" || name == "mask_mismatch" || name == "read_outside_mask") {
    DeviceArray<int> out(32);
    auto kernel = name == "mask_excludes_caller" ? mask_excludes_caller_kernel
                  : name == "mask_mismatch"       ? mask_mismatch_kernel
                                                  : read_outside_mask_kernel;
    pvq_cuda::launch_kernel(kernel, 1, 32, 0, nullptr, out.p);
  } else if (name == "wmma_divergent_pointer") {
    DeviceArray<__half> tile(512);
    pvq_cuda::launch_kernel(wmma_divergent_pointer_kernel, 1, 32, 0, nullptr, tile.p);
  } else if (name == "big_static_smem") {
    DeviceArray<int> out(1);
    pvq_cuda::launch_kernel(big_static_smem_kernel, 1, 32, 0, nullptr, out.p);
  } else {
    return "error=unknown_selftest";
  }
  return s.str();
}

}  // namespace pvq_emulation
