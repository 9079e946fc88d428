// The emulation executable's main(): runs the project's CUDA launchers (the .cu files, compiled as
// host C++ against cuda_emulation.h) on inputs that tests/cuda_emulation/emulation.py wrote as raw
// files, and writes their outputs back as raw files. It stands where the torch glue stands in the
// extension: device buffers, the launcher call, the copy back.
//
// Usage: emulator <manifest> <results> [<launch log>]
// Each manifest line is one command: a name, then key=value arguments. Paths are raw little-endian
// arrays; an input may be "zeros:<bytes>" and an output "none" (dry runs). Every command that
// computes something writes one results line, "<id> key=value ...", with error=<cudaError name> for
// what the launcher returned and seconds=<its wall time>. Commands:
//   gpu name=<a100|h100>   the emulated device's limits and SM count from now on (default h100)
//   sms n=<SMs>            its SM count from now on
//   dry_run on=<0|1>       check and log launches without running them
//   registers kernel=<name> n=<registers>   ptxas's registers of a kernel instance, for the emulated
//                          occupancy (name as "gemv_kernel<16,1,__half,true>": no spaces)
//   tables id=            upload the split tables (device_split_tables) and compare with the host's
//   decode|encode|search|dequantize|gemv|tiled_matmul|grad_input|grad_gemv|hadamard|hessian|
//   encode_activations|wa_matmul id= ...
//                          (see run_* below)
//   occupancy id= gpu=<a100|h100> threads= registers= static_smem= dynamic_smem= max_dynamic_smem=
//   selftest id= name=     one of selftest.cu's checks of the emulator itself
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "activation/launchers.h"
#include "codec/launchers.h"
#include "codec/split_tables.h"
#include "common/device_tables.h"
#include "emulator_control.h"
#include "hadamard/launchers.h"
#include "hessian/launchers.h"
#include "occupancy.h"
#include "packed/launchers.h"
#include "packed/tiled_matmul.h"
#include "selftest.h"

namespace {

using Args = std::map<std::string, std::string>;
using pvq_cuda::FloatKind;

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "pvq-emulation driver: %s\n", what.c_str());
  std::exit(2);
}

const std::string& arg(const Args& a, const char* key) {
  const auto it = a.find(key);
  if (it == a.end()) die(std::string("missing argument ") + key);
  return it->second;
}

int64_t int_arg(const Args& a, const char* key) { return std::stoll(arg(a, key)); }
uint64_t uint_arg(const Args& a, const char* key) { return std::stoull(arg(a, key)); }

FloatKind kind_arg(const Args& a, const char* key) {
  const std::string& k = arg(a, key);
  if (k == "float32") return FloatKind::kFloat32;
  if (k == "float16") return FloatKind::kFloat16;
  if (k == "bfloat16") return FloatKind::kBFloat16;
  die("unknown float kind " + k);
}

size_t kind_bytes(FloatKind k) { return k == FloatKind::kFloat32 ? 4 : 2; }

// "zeros:<bytes>" instead of a path: a zero buffer (for dry runs of large shapes).
std::vector<char> read_file(const std::string& path) {
  if (path.rfind("zeros:", 0) == 0) return std::vector<char>(std::stoull(path.substr(6)));
  std::ifstream in(path, std::ios::binary);
  if (!in) die("cannot read " + path);
  return std::vector<char>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// "none" instead of a path: the output is not wanted.
void write_file(const std::string& path, const void* data, size_t bytes) {
  if (path == "none") return;
  std::ofstream out(path, std::ios::binary);
  out.write(static_cast<const char*>(data), std::streamsize(bytes));
  if (!out) die("cannot write " + path);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) die(std::string(what) + ": " + cudaGetErrorName(err));
}

// A device buffer (emulated: host memory from cudaMalloc), freed at scope exit.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) { check(cudaMalloc(&ptr_, bytes), "cudaMalloc"); }
  explicit DeviceBuffer(const std::vector<char>& host) : DeviceBuffer(host.size()) {
    check(cudaMemcpy(ptr_, host.data(), host.size(), cudaMemcpyHostToDevice), "cudaMemcpy");
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <typename T = void>
  T* get() const { return static_cast<T*>(ptr_); }
  void save(const std::string& path) const {
    if (path == "none") return;
    std::vector<char> host(bytes_);
    check(cudaMemcpy(host.data(), ptr_, bytes_, cudaMemcpyDeviceToHost), "cudaMemcpy");
    write_file(path, host.data(), bytes_);
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_;
};

pvq::SplitTables device_tables() {
  pvq::SplitTables t;
  check(pvq_cuda::device_split_tables(0, &t), "device_split_tables");
  return t;
}

std::string result(cudaError_t err) { return std::string("error=") + cudaGetErrorName(err); }

// ----- Codec ------------------------------------------------------------------------------------------
std::string run_decode(const Args& a) {
  const int64_t groups = int_arg(a, "groups");
  const int D = int(int_arg(a, "D"));
  DeviceBuffer index(read_file(arg(a, "index"))), out(size_t(groups) * D), status(sizeof(int));
  check(cudaMemset(status.get(), 0, sizeof(int)), "cudaMemset");
  const cudaError_t err = pvq_cuda::launch_decode(device_tables(), index.get<int64_t>(), out.get<int8_t>(), groups, D,
                                                  int(int_arg(a, "K")), uint_arg(a, "V"), status.get<int>(), nullptr);
  out.save(arg(a, "out"));
  status.save(arg(a, "status"));
  return result(err);
}

std::string run_encode(const Args& a) {
  const int64_t groups = int_arg(a, "groups");
  DeviceBuffer pulses(read_file(arg(a, "pulses"))), out(size_t(groups) * 8), status(sizeof(int));
  check(cudaMemset(status.get(), 0, sizeof(int)), "cudaMemset");
  const int D = int(int_arg(a, "D")), K = int(int_arg(a, "K"));
  const cudaError_t err = pvq_cuda::launch_encode(device_tables(), pulses.get<int8_t>(), out.get<int64_t>(), groups,
                                                  D, K, status.get<int>(), nullptr);
  out.save(arg(a, "out"));
  status.save(arg(a, "status"));
  return result(err);
}

std::string run_search(const Args& a) {
  const int64_t groups = int_arg(a, "groups");
  const int D = int(int_arg(a, "D"));
  DeviceBuffer x(read_file(arg(a, "x"))), out(size_t(groups) * D), status(sizeof(int));
  check(cudaMemset(status.get(), 0, sizeof(int)), "cudaMemset");
  const cudaError_t err = pvq_cuda::launch_search(x.get(), kind_arg(a, "kind"), out.get<int8_t>(), groups, D,
                                                  int(int_arg(a, "K")), status.get<int>(), nullptr);
  out.save(arg(a, "out"));
  status.save(arg(a, "status"));
  return result(err);
}

// ----- Packed layers ----------------------------------------------------------------------------------
// The layer's device buffers and the view the launchers take.
struct Layer {
  DeviceBuffer codes, row_scale, levels;
  pvq::PackedLayer view;
  int D;

  explicit Layer(const Args& a)
      : codes(read_file(arg(a, "codes"))),
        row_scale(read_file(arg(a, "row_scale"))),
        levels(read_file(arg(a, "levels"))),
        D(int(int_arg(a, "D"))) {
    view = pvq::PackedLayer{codes.get<uint32_t>(), row_scale.get<uint16_t>(), levels.get<float>(),
                            int_arg(a, "rows"),    int_arg(a, "groups"),      int(int_arg(a, "bits")),
                            int(int_arg(a, "index_bits")), int(int_arg(a, "K")), uint_arg(a, "count")};
  }
  int64_t cols() const { return view.groups * D; }
};

std::string run_dequantize(const Args& a) {
  Layer layer(a);
  const FloatKind kind = kind_arg(a, "kind");
  const int64_t r0 = int_arg(a, "row_begin"), r1 = int_arg(a, "row_end");
  DeviceBuffer out(size_t(r1 - r0) * layer.cols() * kind_bytes(kind));
  const cudaError_t err =
      pvq_cuda::launch_dequantize(device_tables(), layer.view, layer.D, r0, r1, out.get(), kind, nullptr);
  out.save(arg(a, "out"));
  return result(err);
}

// The fused GEMV as the glue runs it on device buffers: plan_gemv (into *plan), a workspace,
// launch_gemv.
cudaError_t gemv_on_device(const Layer& layer, const void* x, FloatKind kind, int64_t M, const void* bias,
                           FloatKind bias_kind, void* out, pvq_cuda::GemvPlan* plan) {
  const cudaError_t err = pvq_cuda::plan_gemv(layer.view, layer.D, kind, bias_kind, M, plan);
  if (err != cudaSuccess) return err;
  DeviceBuffer workspace(size_t(plan->workspace_floats) * sizeof(float));
  return pvq_cuda::launch_gemv(device_tables(), layer.view, layer.D, x, kind, M, bias, bias_kind, out,
                               workspace.get<float>(), *plan, nullptr);
}

std::string run_gemv(const Args& a) {
  Layer layer(a);
  const FloatKind kind = kind_arg(a, "kind");
  const int64_t M = int_arg(a, "M");
  const bool has_bias = arg(a, "bias") != "none";
  const FloatKind bias_kind = has_bias ? kind_arg(a, "bias_kind") : FloatKind::kFloat32;
  DeviceBuffer x(read_file(arg(a, "x"))), out(size_t(M) * layer.view.rows * kind_bytes(kind));
  std::unique_ptr<DeviceBuffer> bias;
  if (has_bias) bias = std::make_unique<DeviceBuffer>(read_file(arg(a, "bias")));
  pvq_cuda::GemvPlan plan;
  const cudaError_t err = gemv_on_device(layer, x.get(), kind, M, has_bias ? bias->get() : nullptr, bias_kind,
                                         out.get(), &plan);
  out.save(arg(a, "out"));
  std::ostringstream s;
  s << result(err) << " staged=" << int(plan.staged) << " splits=" << plan.splits << " blocks=" << plan.blocks
    << " smem_leaf_k=" << plan.smem_leaf_k << " table_bytes=" << plan.table_bytes << " smem=" << plan.smem
    << " finalize_blocks=" << plan.finalize_blocks;
  return s.str();
}

// Host GEMM for the tiled path: out[m, r] = sum_c x[m, c] dense[r - r0, c], in float from the
// activation type's values, rounded once to it (what cuBLAS computes, up to summation order).
template <typename T>
void host_gemm(const T* x, const T* dense, T* out, int64_t M, int64_t rows, int64_t cols, int64_t r0, int64_t r1) {
  auto f = [](T v) {
    if constexpr (std::is_same_v<T, float>) return v;
    else if constexpr (std::is_same_v<T, __half>) return __half2float(v);
    else return __bfloat162float(v);
  };
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = r0; r < r1; ++r) {
      float acc = 0.f;
      for (int64_t c = 0; c < cols; ++c) acc += f(x[m * cols + c]) * f(dense[(r - r0) * cols + c]);
      if constexpr (std::is_same_v<T, float>) out[m * rows + r] = acc;
      else if constexpr (std::is_same_v<T, __half>) out[m * rows + r] = __float2half_rn(acc);
      else out[m * rows + r] = __float2bfloat16_rn(acc);
    }
}

std::string run_tiled_matmul(const Args& a) {
  Layer layer(a);
  const FloatKind kind = kind_arg(a, "kind");
  const int64_t M = int_arg(a, "M"), rows = layer.view.rows, cols = layer.cols();
  const int64_t tile_rows = pvq_cuda::dense_tile_rows(rows, cols, int_arg(a, "tile_weights"));
  DeviceBuffer x(read_file(arg(a, "x"))), out(size_t(M) * rows * kind_bytes(kind)),
      dense(size_t(tile_rows) * cols * kind_bytes(kind));
  int tiles = 0;
  const pvq_cuda::TileGemm gemm = [&](int64_t r0, int64_t r1) {
    ++tiles;
    if (r1 - r0 > tile_rows || r0 % pvq::kTileRows != 0)
      die("tile [" + std::to_string(r0) + ", " + std::to_string(r1) + ") does not fit the dense buffer");
    auto run = [&](auto* type) {
      using T = std::remove_pointer_t<decltype(type)>;
      host_gemm(x.get<T>(), dense.get<T>(), out.get<T>(), M, rows, cols, r0, r1);
    };
    switch (kind) {
      case FloatKind::kFloat32: run(static_cast<float*>(nullptr)); break;
      case FloatKind::kFloat16: run(static_cast<__half*>(nullptr)); break;
      case FloatKind::kBFloat16: run(static_cast<__nv_bfloat16*>(nullptr)); break;
    }
    return cudaSuccess;
  };
  const cudaError_t err = pvq_cuda::matmul_by_dense_tiles(device_tables(), layer.view, layer.D, kind, tile_rows,
                                                          dense.get(), gemm, nullptr);
  out.save(arg(a, "out"));
  return result(err) + " tiles=" + std::to_string(tiles) + " tile_rows=" + std::to_string(tile_rows);
}

// The input gradient's tile GEMM, as the glue runs it through cuBLAS: z[m, c] += sum_r g[m, r]
// dense[r - r0, c], the sum in float from the activation type's values and, for fp16/bf16, rounded
// once to that type (at::mm's result) before it joins the float32 accumulator.
template <typename T>
void host_grad_gemm(const T* g, const T* dense, float* z, int64_t M, int64_t rows, int64_t cols, int64_t r0,
                    int64_t r1) {
  auto f = [](T v) {
    if constexpr (std::is_same_v<T, float>) return v;
    else if constexpr (std::is_same_v<T, __half>) return __half2float(v);
    else return __bfloat162float(v);
  };
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < cols; ++c) {
      float acc = 0.f;
      for (int64_t r = r0; r < r1; ++r) acc += f(g[m * rows + r]) * f(dense[(r - r0) * cols + c]);
      if constexpr (std::is_same_v<T, __half>) acc = __half2float(__float2half_rn(acc));
      else if constexpr (std::is_same_v<T, __nv_bfloat16>) acc = __bfloat162float(__float2bfloat16_rn(acc));
      z[m * cols + c] += acc;
    }
}

std::string run_grad_input(const Args& a) {
  Layer layer(a);
  const FloatKind kind = kind_arg(a, "kind");
  const int64_t M = int_arg(a, "M"), rows = layer.view.rows, cols = layer.cols();
  const int64_t tile_rows = pvq_cuda::dense_tile_rows(rows, cols, int_arg(a, "tile_weights"));
  DeviceBuffer g(read_file(arg(a, "grad"))), out(size_t(M) * cols * kind_bytes(kind)),
      dense(size_t(tile_rows) * cols * kind_bytes(kind)), z(size_t(M) * cols * sizeof(float)),
      rotated(size_t(M) * cols * sizeof(float));
  check(cudaMemset(z.get(), 0, size_t(M) * cols * sizeof(float)), "cudaMemset");
  std::unique_ptr<DeviceBuffer> signs;
  if (arg(a, "signs") != "none") signs = std::make_unique<DeviceBuffer>(read_file(arg(a, "signs")));
  // gemm=none (dry runs of large shapes, bench/kernel_static.py): the tile loop without the host GEMM.
  const bool with_gemm = a.count("gemm") == 0 || arg(a, "gemm") != "none";
  int tiles = 0;
  const pvq_cuda::TileGemm gemm = [&](int64_t r0, int64_t r1) {
    ++tiles;
    if (r1 - r0 > tile_rows || r0 % pvq::kTileRows != 0)
      die("tile [" + std::to_string(r0) + ", " + std::to_string(r1) + ") does not fit the dense buffer");
    if (!with_gemm) return cudaSuccess;
    auto run = [&](auto* type) {
      using T = std::remove_pointer_t<decltype(type)>;
      host_grad_gemm(g.get<T>(), dense.get<T>(), z.get<float>(), M, rows, cols, r0, r1);
    };
    switch (kind) {
      case FloatKind::kFloat32: run(static_cast<float*>(nullptr)); break;
      case FloatKind::kFloat16: run(static_cast<__half*>(nullptr)); break;
      case FloatKind::kBFloat16: run(static_cast<__nv_bfloat16*>(nullptr)); break;
    }
    return cudaSuccess;
  };
  const pvq_cuda::GradInputBuffers buffers{z.get<float>(), signs ? rotated.get<float>() : nullptr,
                                           signs ? signs->get<float>() : nullptr, out.get()};
  const cudaError_t err = pvq_cuda::grad_input_by_dense_tiles(device_tables(), layer.view, layer.D, kind, M,
                                                              tile_rows, dense.get(), gemm, buffers, nullptr);
  out.save(arg(a, "out"));
  return result(err) + " tiles=" + std::to_string(tiles) + " tile_rows=" + std::to_string(tile_rows);
}

// The fused small-batch input gradient, then the same return to the input basis as the tiled path.
std::string run_grad_gemv(const Args& a) {
  Layer layer(a);
  const FloatKind kind = kind_arg(a, "kind");
  const int64_t M = int_arg(a, "M"), cols = layer.cols();
  pvq_cuda::GradGemvPlan plan;
  cudaError_t err = pvq_cuda::plan_grad_gemv(layer.view, layer.D, kind, M, &plan);
  if (err != cudaSuccess) return result(err);
  DeviceBuffer g(read_file(arg(a, "grad"))), out(size_t(M) * cols * kind_bytes(kind)),
      z(size_t(M) * cols * sizeof(float)), rotated(size_t(M) * cols * sizeof(float)),
      workspace(size_t(plan.workspace_floats) * sizeof(float));
  std::unique_ptr<DeviceBuffer> signs;
  if (arg(a, "signs") != "none") signs = std::make_unique<DeviceBuffer>(read_file(arg(a, "signs")));
  const pvq_cuda::GradInputBuffers buffers{z.get<float>(), signs ? rotated.get<float>() : nullptr,
                                           signs ? signs->get<float>() : nullptr, out.get()};
  err = pvq_cuda::launch_grad_gemv(device_tables(), layer.view, layer.D, g.get(), kind, M, z.get<float>(),
                                   workspace.get<float>(), plan, nullptr);
  if (err == cudaSuccess) err = pvq_cuda::grad_input_to_input_basis(M, cols, kind, buffers, nullptr);
  out.save(arg(a, "out"));
  std::ostringstream r;
  r << result(err) << " splits=" << plan.splits << " blocks=" << plan.blocks << " smem_leaf_k=" << plan.smem_leaf_k
    << " sum_blocks=" << plan.sum_blocks << " max_batch=" << pvq_cuda::grad_gemv_max_batch(layer.D);
  return r.str();
}

// ----- Hadamard and Hessian ---------------------------------------------------------------------------
std::string run_hadamard(const Args& a) {
  const FloatKind kind = kind_arg(a, "kind");
  const int64_t rows = int_arg(a, "rows"), n = int_arg(a, "n");
  DeviceBuffer x(read_file(arg(a, "x"))), out(size_t(rows * n) * kind_bytes(kind));
  std::unique_ptr<DeviceBuffer> signs;
  if (arg(a, "signs") != "none") signs = std::make_unique<DeviceBuffer>(read_file(arg(a, "signs")));
  const cudaError_t err = pvq_cuda::launch_hadamard(x.get(), out.get(), kind, signs ? signs->get<float>() : nullptr,
                                                    rows, n, nullptr);
  out.save(arg(a, "out"));
  return result(err) + " smem=" + std::to_string(pvq_cuda::hadamard_smem_bytes(n));
}

std::string run_hessian(const Args& a) {
  DeviceBuffer x(read_file(arg(a, "x"))), H(read_file(arg(a, "H")));
  const cudaError_t err = pvq_cuda::launch_hessian_accumulate(H.get<float>(), x.get(), kind_arg(a, "kind"),
                                                              int_arg(a, "tokens"), int(int_arg(a, "n")), nullptr);
  H.save(arg(a, "out"));
  return result(err);
}

// ----- Activations ----------------------------------------------------------------------------------
std::string run_encode_activations(const Args& a) {
  const FloatKind kind = kind_arg(a, "kind");
  const int64_t tokens = int_arg(a, "tokens"), n = int_arg(a, "n");
  const int D = int(int_arg(a, "D"));
  const int64_t groups = tokens * (n / D);
  DeviceBuffer x(read_file(arg(a, "x"))), levels(read_file(arg(a, "levels")));
  DeviceBuffer pulses{size_t(tokens * n)}, index{size_t(groups) * 8}, gain{size_t(groups)}, scale{size_t(tokens) * 2},
      flags{size_t(tokens) * 4};
  std::unique_ptr<DeviceBuffer> signs;
  if (arg(a, "signs") != "none") signs = std::make_unique<DeviceBuffer>(read_file(arg(a, "signs")));
  const pvq_cuda::ActivationCodes out{pulses.get<int8_t>(), index.get<int64_t>(), gain.get<uint8_t>(),
                                      scale.get<uint16_t>(), flags.get<int>()};
  const cudaError_t err = pvq_cuda::launch_encode_activations(
      device_tables(), x.get(), kind, signs ? signs->get<float>() : nullptr, levels.get<float>(),
      int(int_arg(a, "level_count")), tokens, n, D, int(int_arg(a, "K")), out, nullptr);
  pulses.save(arg(a, "pulses"));
  index.save(arg(a, "index"));
  gain.save(arg(a, "gain"));
  scale.save(arg(a, "scale"));
  flags.save(arg(a, "flags"));
  return result(err) + " smem=" + std::to_string(pvq_cuda::encode_activations_smem_bytes(n, D));
}

// wa_matmul as its glue runs it: the activations decoded to fp32 x̂' (launch_decode_activations),
// then the layer's product with x̂' as pvq_matmul runs it in fp32: the fused GEMV up to
// kGemvMaxBatch tokens, dequantized tiles (tile_weights per tile) through the host GEMM above, then
// the bias. Outputs: xhat, bad (one byte a group), y.
std::string run_wa_matmul(const Args& a) {
  Layer layer(a);
  const int64_t M = int_arg(a, "M"), n = layer.cols(), rows = layer.view.rows;
  const int act_D = int(int_arg(a, "act_D"));
  const bool has_bias = arg(a, "bias") != "none";
  DeviceBuffer pulses(read_file(arg(a, "pulses"))), gain(read_file(arg(a, "gain"))), scale(read_file(arg(a, "scale"))),
      levels(read_file(arg(a, "act_levels")));
  DeviceBuffer xhat(size_t(M * n) * sizeof(float)), bad(size_t(M * (n / act_D))), out(size_t(M * rows) * sizeof(float));
  std::unique_ptr<DeviceBuffer> bias;
  if (has_bias) bias = std::make_unique<DeviceBuffer>(read_file(arg(a, "bias")));
  const pvq_cuda::CodedActivations in{pulses.get<int8_t>(), gain.get<uint8_t>(), scale.get<uint16_t>(),
                                      levels.get<float>(), int(int_arg(a, "level_count"))};
  cudaError_t err = pvq_cuda::launch_decode_activations(device_tables(), in, M, n, act_D, int(int_arg(a, "act_K")),
                                                        xhat.get<float>(), bad.get<uint8_t>(), nullptr);
  xhat.save(arg(a, "xhat"));
  bad.save(arg(a, "bad"));
  if (err != cudaSuccess) return result(err);
  std::ostringstream s;
  if (M <= pvq_cuda::kGemvMaxBatch) {
    pvq_cuda::GemvPlan plan;
    err = gemv_on_device(layer, xhat.get(), FloatKind::kFloat32, M, has_bias ? bias->get() : nullptr,
                         FloatKind::kFloat32, out.get(), &plan);
    s << " path=gemv staged=" << int(plan.staged) << " splits=" << plan.splits;
  } else {
    const int64_t tile_rows = pvq_cuda::dense_tile_rows(rows, n, int_arg(a, "tile_weights"));
    DeviceBuffer dense(size_t(tile_rows * n) * sizeof(float));
    const pvq_cuda::TileGemm gemm = [&](int64_t r0, int64_t r1) {
      host_gemm(xhat.get<float>(), dense.get<float>(), out.get<float>(), M, rows, n, r0, r1);
      return cudaSuccess;
    };
    err = pvq_cuda::matmul_by_dense_tiles(device_tables(), layer.view, layer.D, FloatKind::kFloat32, tile_rows,
                                          dense.get(), gemm, nullptr);
    for (int64_t e = 0; has_bias && e < M * rows; ++e) out.get<float>()[e] += bias->get<float>()[e % rows];
    s << " path=tiled";
  }
  out.save(arg(a, "out"));
  return result(err) + s.str();
}

// ----- Device tables and occupancy --------------------------------------------------------------------
template <typename T>
bool same_on_device(const std::vector<T>& host, const T* device) {
  std::vector<T> back(host.size());
  check(cudaMemcpy(back.data(), device, host.size() * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy");
  return std::memcmp(back.data(), host.data(), host.size() * sizeof(T)) == 0;
}

std::string run_tables(const Args&) {
  const pvq::SplitTableStorage& s = pvq::host_split_tables();
  const pvq::SplitTables first = device_tables(), again = device_tables();
  const bool equal = same_on_device(s.count, first.count) && same_on_device(s.offset, first.offset) &&
                     same_on_device(s.guide, first.guide) && same_on_device(s.guide_shift, first.guide_shift) &&
                     same_on_device(s.magic, first.magic) && same_on_device(s.magic_log, first.magic_log) &&
                     same_on_device(s.leaf_base, first.leaf_base) && same_on_device(s.leaf, first.leaf) &&
                     same_on_device(s.inv_norm, first.inv_norm);
  const bool cached = std::memcmp(&first, &again, sizeof first) == 0;
  pvq::SplitTables unused;
  std::ostringstream out;
  out << "error=cudaSuccess equal=" << equal << " cached=" << cached << " leaf_max_k=" << first.leaf_max_k
      << " bad_device=" << cudaGetErrorName(pvq_cuda::device_split_tables(-1, &unused))
      << " past_last_device=" << cudaGetErrorName(pvq_cuda::device_split_tables(64, &unused));
  return out.str();
}

std::string run_occupancy(const Args& a) {
  const pvq_emulation::GpuModel& gpu = arg(a, "gpu") == "a100" ? pvq_emulation::a100() : pvq_emulation::h100();
  const pvq_emulation::Occupancy o =
      pvq_emulation::occupancy(gpu, int(int_arg(a, "threads")), int(int_arg(a, "registers")),
                               size_t(int_arg(a, "static_smem")), size_t(int_arg(a, "dynamic_smem")),
                               size_t(int_arg(a, "max_dynamic_smem")));
  std::string limited = o.limited_by;
  for (char& c : limited)
    if (c == ' ') c = '_';
  return "error=cudaSuccess blocks_per_sm=" + std::to_string(o.blocks_per_sm) + " limited_by=" + limited;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) die("usage: emulator <manifest> <results> [<launch log>]");
  std::FILE* results = std::fopen(argv[2], "w");
  if (results == nullptr) die(std::string("cannot write ") + argv[2]);
  std::FILE* launch_log = argc > 3 ? std::fopen(argv[3], "w") : nullptr;
  pvq_emulation::set_launch_log(launch_log);

  const std::map<std::string, std::function<std::string(const Args&)>> commands = {
      {"decode", run_decode},   {"encode", run_encode},   {"search", run_search},
      {"dequantize", run_dequantize}, {"gemv", run_gemv}, {"tiled_matmul", run_tiled_matmul},
      {"grad_input", run_grad_input}, {"grad_gemv", run_grad_gemv},
      {"hadamard", run_hadamard}, {"hessian", run_hessian}, {"encode_activations", run_encode_activations},
      {"wa_matmul", run_wa_matmul},
      {"tables", run_tables},
      {"occupancy", run_occupancy},
      {"selftest", [](const Args& a) { return pvq_emulation::run_selftest(arg(a, "name")); }}};
  std::ifstream manifest(argv[1]);
  if (!manifest) die(std::string("cannot read ") + argv[1]);
  std::string line;
  while (std::getline(manifest, line)) {
    std::istringstream words(line);
    std::string name, word;
    if (!(words >> name)) continue;
    Args args;
    while (words >> word) {
      const size_t eq = word.find('=');
      if (eq == std::string::npos) die("bad argument " + word + " in: " + line);
      args[word.substr(0, eq)] = word.substr(eq + 1);
    }
    if (name == "sms") {
      pvq_emulation::set_sm_count(int(int_arg(args, "n")));
      continue;
    }
    if (name == "gpu") {
      pvq_emulation::set_gpu(arg(args, "name") == "a100" ? pvq_emulation::a100() : pvq_emulation::h100());
      continue;
    }
    if (name == "registers") {
      pvq_emulation::set_kernel_registers(arg(args, "kernel"), int(int_arg(args, "n")));
      continue;
    }
    if (name == "dry_run") {
      pvq_emulation::set_dry_run(int_arg(args, "on") != 0);
      continue;
    }
    const auto command = commands.find(name);
    if (command == commands.end()) die("unknown command " + name);
    // Which case a crash or a sanitizer report belongs to.
    std::fprintf(stderr, "pvq-emulation case %s\n", arg(args, "id").c_str());
    if (launch_log != nullptr) std::fprintf(launch_log, "case\t%s\n", arg(args, "id").c_str());
    const auto began = std::chrono::steady_clock::now();
    const std::string out = command->second(args);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
    std::fprintf(results, "%s %s seconds=%.4f\n", arg(args, "id").c_str(), out.c_str(), seconds);
    std::fflush(results);
  }
  std::fclose(results);
  if (launch_log != nullptr) std::fclose(launch_log);
  return 0;
}
