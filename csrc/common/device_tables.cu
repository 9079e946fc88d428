// Uploads the host-built split tables to each device once. They total ~400 KB (offsets 335 KB,
// leaf words 196 KB is the largest part); kernels read the small per-node parts through L1 and
// stage the hot leaf prefix in shared memory themselves.
#include <mutex>

#include "codec/split_tables.h"
#include "common/device_tables.h"

namespace pvq_cuda {
namespace {

constexpr int kMaxDevices = 64;

template <typename T>
cudaError_t upload(const std::vector<T>& host, const T** dst) {
  T* p = nullptr;
  cudaError_t err = cudaMalloc(&p, host.size() * sizeof(T));
  if (err != cudaSuccess) return err;
  err = cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  *dst = p;
  return err;
}

}  // namespace

cudaError_t device_split_tables(int device, pvq::SplitTables* out) {
  static std::mutex mutex;
  static pvq::SplitTables cache[kMaxDevices];
  static bool ready[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  std::lock_guard<std::mutex> lock(mutex);
  if (!ready[device]) {
    const pvq::SplitTableStorage& s = pvq::host_split_tables();
    pvq::SplitTables t = s.view();
    cudaError_t err;
    // Owned for the life of the process, like a cuBLAS handle: freeing at exit races the driver.
    if ((err = upload(s.count, &t.count)) != cudaSuccess) return err;
    if ((err = upload(s.offset, &t.offset)) != cudaSuccess) return err;
    if ((err = upload(s.guide, &t.guide)) != cudaSuccess) return err;
    if ((err = upload(s.guide_shift, &t.guide_shift)) != cudaSuccess) return err;
    if ((err = upload(s.magic, &t.magic)) != cudaSuccess) return err;
    if ((err = upload(s.magic_log, &t.magic_log)) != cudaSuccess) return err;
    if ((err = upload(s.leaf_base, &t.leaf_base)) != cudaSuccess) return err;
    if ((err = upload(s.leaf, &t.leaf)) != cudaSuccess) return err;
    if ((err = upload(s.inv_norm, &t.inv_norm)) != cudaSuccess) return err;
    cache[device] = t;
    ready[device] = true;
  }
  *out = cache[device];
  return cudaSuccess;
}

}  // namespace pvq_cuda
