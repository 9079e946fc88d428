// The CUDA runtime API subset the launchers call, and kernel launches (run_kernel). The functions
// keep the declarations of CUDA's own cuda_runtime_api.h, so the launchers compile unchanged and
// link against these instead of libcudart. Device memory is host memory: cudaMalloc is an aligned
// malloc, which AddressSanitizer watches like any other heap block.
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

#include "block_runner.h"
#include "emulator_control.h"
#include "kernel_symbols.h"
#include "occupancy.h"

namespace pvq_emulation {
namespace {

constexpr uint32_t kPoisonWord = 0x7fa5a5a5u;  // a signalling NaN as float; a huge index as uint32

struct Device {
  std::mutex mutex;
  const GpuModel* gpu = &h100();
  int sms = 132;
  std::FILE* launch_log = nullptr;
  bool dry_run = false;
  std::map<const void*, int> max_dynamic_smem;  // cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
  std::map<std::string, int> registers;         // set_kernel_registers, by name without spaces
};

Device& device() {
  static Device* d = new Device;
  return *d;
}

const GpuModel& gpu() {
  std::lock_guard<std::mutex> lock(device().mutex);
  return *device().gpu;
}

// Sticky like the real one: set by a failed launch, returned and cleared by cudaGetLastError.
thread_local cudaError_t last_error = cudaSuccess;

void poison(void* p, size_t bytes) {
  unsigned char* out = static_cast<unsigned char*>(p);
  for (size_t i = 0; i < bytes; ++i) out[i] = uint8_t(kPoisonWord >> (8 * (i % 4)));
}

// The dynamic shared memory a launch of `kernel` may use: 48 KB minus its static shared memory,
// or what cudaFuncSetAttribute allowed.
size_t dynamic_smem_limit(const void* kernel, size_t static_smem) {
  const size_t default_total = gpu().smem_per_block_default;
  Device& d = device();
  std::lock_guard<std::mutex> lock(d.mutex);
  const auto set = d.max_dynamic_smem.find(kernel);
  if (set != d.max_dynamic_smem.end()) return size_t(set->second);
  return static_smem < default_total ? default_total - static_smem : 0;
}

// What a GPU checks at launch, with the error it reports.
cudaError_t check_launch(const void* kernel, const KernelSymbols& k, dim3 grid, dim3 block, size_t dynamic_smem) {
  if (k.static_smem > gpu().smem_per_block_default)
    fail(Where::current(), "%s has %zu bytes of static shared memory; ptxas refuses more than 48 KB", k.name.c_str(),
         k.static_smem);
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      threads > 1024)
    return cudaErrorInvalidConfiguration;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    return cudaErrorInvalidConfiguration;
  if (dynamic_smem > dynamic_smem_limit(kernel, k.static_smem)) return cudaErrorInvalidValue;
  if (k.static_smem + dynamic_smem > gpu().smem_per_block_optin) return cudaErrorInvalidValue;
  return cudaSuccess;
}

}  // namespace

void set_sm_count(int sms) {
  std::lock_guard<std::mutex> lock(device().mutex);
  device().sms = sms;
}

void set_gpu(const GpuModel& model) {
  std::lock_guard<std::mutex> lock(device().mutex);
  device().gpu = &model;
  device().sms = model.sms;
}

void set_launch_log(std::FILE* log) {
  std::lock_guard<std::mutex> lock(device().mutex);
  device().launch_log = log;
}

void set_dry_run(bool dry_run) {
  std::lock_guard<std::mutex> lock(device().mutex);
  device().dry_run = dry_run;
}

void set_kernel_registers(const std::string& kernel, int registers) {
  std::lock_guard<std::mutex> lock(device().mutex);
  if (registers > 0)
    device().registers[kernel] = registers;
  else
    device().registers.erase(kernel);
}

namespace {

// The registers set_kernel_registers gave the kernel whose demangled name is `name`, else 0.
int kernel_registers(const std::string& name) {
  std::string compact;
  for (char c : name)
    if (c != ' ') compact += c;
  std::lock_guard<std::mutex> lock(device().mutex);
  for (const auto& [kernel, registers] : device().registers)
    if (compact.find("::" + kernel + "(") != std::string::npos) return registers;
  return 0;
}

}  // namespace

cudaError_t run_kernel(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem,
                       const std::function<void()>& thread_body) {
  const KernelSymbols& k = kernel_symbols(kernel);
  const cudaError_t err = check_launch(kernel, k, grid, block, dynamic_smem);
  Device& d = device();
  bool dry_run;
  {
    std::lock_guard<std::mutex> lock(d.mutex);
    dry_run = d.dry_run;
    if (d.launch_log != nullptr) {
      std::fprintf(d.launch_log, "launch\t%s\t%u,%u,%u\t%u,%u,%u\t%zu\t%zu\t%d\t%s\n", k.name.c_str(), grid.x, grid.y,
                   grid.z, block.x, block.y, block.z, dynamic_smem, k.static_smem, d.sms, cudaGetErrorName(err));
      std::fflush(d.launch_log);
    }
  }
  if (err != cudaSuccess) {
    last_error = err;
    return err;
  }
  if (dry_run) return cudaSuccess;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        // Fresh shared memory for each block, poisoned, and exactly as large as asked, so that
        // AddressSanitizer reports the first byte past it.
        for (const SharedVariable& v : k.shared) poison(v.address, v.bytes);
        void* dynamic = nullptr;
        if (posix_memalign(&dynamic, 128, dynamic_smem) != 0) {
          std::fprintf(stderr, "pvq-emulation: out of memory for %zu bytes of shared memory\n", dynamic_smem);
          std::_Exit(70);
        }
        poison(dynamic, dynamic_smem);
        run_block(grid, block, uint3{x, y, z}, dynamic, thread_body);
        std::free(dynamic);
      }
  return cudaSuccess;
}

}  // namespace pvq_emulation

using pvq_emulation::device;

// ----- Runtime API --------------------------------------------------------------------------------------

cudaError_t cudaMalloc(void** ptr, size_t size) {
  // 256-byte alignment, as cudaMalloc guarantees; the kernels' vector loads rely on it.
  *ptr = nullptr;
  if (size == 0) return cudaSuccess;
  if (posix_memalign(ptr, 256, size) != 0) return cudaErrorMemoryAllocation;
  pvq_emulation::poison(*ptr, size);  // device memory is not zeroed either
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind) {
  if (count > 0) std::memmove(dst, src, count);
  return cudaSuccess;
}

cudaError_t cudaMemset(void* ptr, int value, size_t count) {
  if (count > 0) std::memset(ptr, value, count);
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }  // kernels finish before their launch returns

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev) {
  if (dev != 0) return cudaErrorInvalidDevice;
  const pvq_emulation::GpuModel& gpu = pvq_emulation::gpu();
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: {
      std::lock_guard<std::mutex> lock(device().mutex);
      *value = device().sms;
      return cudaSuccess;
    }
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = int(gpu.smem_per_block_optin); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = int(gpu.smem_per_block_default); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = int(gpu.smem_per_sm); return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = 2048; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = gpu.major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = gpu.minor; return cudaSuccess;
    default: return cudaErrorInvalidValue;  // not modelled: fail loudly rather than invent a value
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;  // carveout hints change nothing
  const size_t static_smem = pvq_emulation::kernel_symbols(func).static_smem;
  if (value < 0 || static_smem + size_t(value) > pvq_emulation::gpu().smem_per_block_optin)
    return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(device().mutex);
  device().max_dynamic_smem[func] = value;
  return cudaSuccess;
}

// Registers are ptxas's decision: unknown here unless the driver was told them
// (set_kernel_registers, as bench/kernel_static.py and bench/kernel_budget.py do); unknown, only
// threads, shared memory and block slots limit the answer.
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, const void* func, int block_size,
                                                                   size_t dynamic_smem, unsigned int) {
  const pvq_emulation::KernelSymbols& k = pvq_emulation::kernel_symbols(func);
  *blocks = pvq_emulation::occupancy(pvq_emulation::gpu(), block_size, pvq_emulation::kernel_registers(k.name),
                                     k.static_smem, dynamic_smem,
                                     pvq_emulation::dynamic_smem_limit(func, k.static_smem))
                .blocks_per_sm;
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  const cudaError_t err = pvq_emulation::last_error;
  pvq_emulation::last_error = cudaSuccess;
  return err;
}

cudaError_t cudaPeekAtLastError() { return pvq_emulation::last_error; }

cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;  // streams are not modelled: every launch runs at once
  return cudaSuccess;
}

const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    default: return "cudaError(other)";
  }
}

const char* cudaGetErrorString(cudaError_t err) { return cudaGetErrorName(err); }
