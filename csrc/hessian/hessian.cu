// H += x^T x on tensor cores, for 16-bit activations (GPTQ-style calibration, paper.md §6).
//
// Why tensor cores are exact here: fp16 and bf16 carry 11 and 8 significant bits, so every product
// x_ti x_tj has at most 22 and fits a float's 24 exactly; only the sums round.
// Accuracy: a float accumulator summing 16k tokens drifts ~sqrt(16k) * 6e-8 ~ 8e-6 relative (and
// up to 1e-3 on worst-case diagonals), far from the 1e-6 target. So each warp sums chunks of 64
// tokens in float (error ~5e-7 relative per chunk) and folds each chunk into fp64 registers; H
// then gets one float rounding per call.
// Symmetry: the grid enumerates only the 64x64 tiles on or above the diagonal (n = 4096: 2,080
// of 4,096 tiles) and each off-diagonal tile is also added, transposed, into its mirror, which no
// other block touches, so there are no races and no second pass.
// Traffic: a block streams its two 64-column slices of x through shared memory, 64 tokens at a
// time; blocks run roughly in step, so a chunk of x (64 tokens x n) is read from HBM about once
// per wave and served to the other blocks from L2.
// Layout per block: 4 warps, each owns a 32x32 quarter of the tile as 2x2 WMMA 16x16x16
// fragments; 2 x 64 x 72 halves of staging (rows padded by 8 to spread banks) + a 64x64 float
// tile for the write-back, 34 KB of static shared memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <type_traits>

#include "common/float_io.cuh"
#include "common/launch.h"
#include "hessian/launchers.h"

namespace pvq_cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kTile = 64;             // H tile edge per block
constexpr int kChunk = 64;            // tokens summed in float before folding into fp64
constexpr int kPad = 8;               // staging row padding (elements); WMMA wants ldm % 8 == 0
constexpr int kLd = kTile + kPad;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

// Tile pair (bi, bj), bi <= bj, of the p-th upper-triangular tile in row-major order.
__device__ __forceinline__ void upper_tile(int64_t p, int tiles, int* bi, int* bj) {
  int row = 0;
  int64_t first = 0;  // index of (row, row)
  while (p >= first + (tiles - row)) {
    first += tiles - row;
    ++row;
  }
  *bi = row;
  *bj = row + int(p - first);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) hessian_kernel(const T* __restrict__ x, int64_t tokens, int n,
                                                           float* __restrict__ H, int tiles) {
  __shared__ __align__(32) T xi[kChunk][kLd];
  __shared__ __align__(32) T xj[kChunk][kLd];
  __shared__ __align__(32) float out[kTile][kTile];
  int bi, bj;
  upper_tile(blockIdx.x, tiles, &bi, &bj);
  const int warp = threadIdx.x >> 5;
  const int wr = (warp >> 1) * 32, wc = (warp & 1) * 32;  // this warp's quarter of the tile
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  Acc acc[2][2];
  double sum[2][2][Acc::num_elements];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b)
#pragma unroll
      for (int e = 0; e < Acc::num_elements; ++e) sum[a][b][e] = 0.0;

  const T zero = from_float<T>(0.f);
  for (int64_t t0 = 0; t0 < tokens; t0 += kChunk) {
    for (int e = threadIdx.x; e < kChunk * kTile; e += kThreads) {
      const int r = e / kTile, c = e % kTile;
      const int64_t tok = t0 + r;
      const int ci = bi * kTile + c, cj = bj * kTile + c;
      xi[r][c] = (tok < tokens && ci < n) ? x[tok * n + ci] : zero;
      xj[r][c] = (tok < tokens && cj < n) ? x[tok * n + cj] : zero;
    }
    __syncthreads();
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 2; ++b) wmma::fill_fragment(acc[a][b], 0.f);
#pragma unroll
    for (int k = 0; k < kChunk; k += 16) {
      // A = x_i^T (rows: columns of H's tile, k: tokens) is x_i read column-major.
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
      for (int a = 0; a < 2; ++a) wmma::load_matrix_sync(fa[a], &xi[k][wr + 16 * a], kLd);
#pragma unroll
      for (int b = 0; b < 2; ++b) wmma::load_matrix_sync(fb[b], &xj[k][wc + 16 * b], kLd);
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b) wmma::mma_sync(acc[a][b], fa[a], fb[b], acc[a][b]);
    }
    __syncthreads();  // staging is overwritten by the next chunk
    // Accumulator fragments of one type share their element order, so the fold is elementwise.
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 2; ++b)
#pragma unroll
        for (int e = 0; e < Acc::num_elements; ++e) sum[a][b][e] += double(acc[a][b].x[e]);
  }
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b) {
#pragma unroll
      for (int e = 0; e < Acc::num_elements; ++e) acc[a][b].x[e] = float(sum[a][b][e]);
      wmma::store_matrix_sync(&out[wr + 16 * a][wc + 16 * b], acc[a][b], kTile, wmma::mem_row_major);
    }
  __syncthreads();
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    const int r = e / kTile, c = e % kTile;
    const int gi = bi * kTile + r, gj = bj * kTile + c;
    if (gi < n && gj < n) {
      H[int64_t(gi) * n + gj] += out[r][c];
      if (bi != bj) H[int64_t(gj) * n + gi] += out[r][c];
    }
  }
}

}  // namespace

cudaError_t launch_hessian_accumulate(float* H, const void* x, FloatKind kind, int64_t tokens, int n,
                                      cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  if (kind == FloatKind::kFloat32) return cudaErrorInvalidValue;  // fp32 goes through fp64 cuBLAS
  const int tiles = (n + kTile - 1) / kTile;
  const int64_t blocks = int64_t(tiles) * (tiles + 1) / 2;
  if (kind == FloatKind::kFloat16)
    return launch_kernel(hessian_kernel<__half>, unsigned(blocks), kThreads, 0, stream, static_cast<const __half*>(x),
                         tokens, n, H, tiles);
  return launch_kernel(hessian_kernel<__nv_bfloat16>, unsigned(blocks), kThreads, 0, stream,
                       static_cast<const __nv_bfloat16*>(x), tokens, n, H, tiles);
}

}  // namespace pvq_cuda
