// Dequantize a packed PVQ layer (rotated basis) into fp32/fp16/bf16 rows. It feeds cuBLAS for large
// batches (a tile of rows at a time, so the dense copy stays small) and PVQWeight.dequantize().
//
// Work item = one warp, one 32-row tile, a batch of CB consecutive group columns (Seg bytes of every
// row). Two phases per item:
//   1. decode: for each of the CB columns the chunk's B words are read once, coalesced (as before);
//      lane l decodes row 32t+l's group and writes its D converted values (G = D x sizeof(T) bytes)
//      into the warp's staging area in shared memory, row-major [32 rows][Seg bytes];
//   2. store (after __syncwarp): the warp copies the staging area to the output row by row, lane i
//      taking 16-byte piece i, i+32, ...: consecutive lanes write consecutive addresses of one row, so
//      a 16-byte warp store writes 32 x 16 B = 512 B into 16 whole 32-byte sectors (the old kernel's
//      lane-per-row stores wrote 2-4 useful bytes into each of 32 sectors: 6-12 % store efficiency).
// Seg = max(32 B, G): one whole sector per row at fp16/bf16 D <= 16 and fp32 D <= 8 (CB = 32 / G
// columns: 1 at fp16 D=16, 2 at fp16 D=8, 16 at fp16 D=1), G itself above (64 B at fp32 D=16,
// 128 B at fp32 D=32). Staging is 32 x Seg bytes a warp: 8 KB a block at Seg = 32, 16 KB at 64,
// 32 KB at 128. Shared memory a block = leaf prefix + staging; the prefix is k <= 10 for D >= 4 and
// K >= 10 (33,444 B; k <= 11, 47,876 B, is over the 46 KB cap), none at D < 4. At Seg = 32 that is
// 41,648 B, under the 48 KB default: 5 blocks would fit an H100 SM's 228 KB (1 KB reserved a block),
// and the registers (64 a thread at D=16, 48 at D=8; the old kernel used 54 and 48) allow 4 blocks
// of 256 threads, 32 warps, as before. Seg = 64 (fp32 D=16): 49,840 B, over 48 KB, so the launcher
// opts in (cudaFuncSetAttribute), still 4 blocks; Seg = 128 (fp32 D=32): 66,224 B, 3 blocks.
// Why 32 bytes, not 128, at fp16: a whole sector is what store efficiency needs (an L2 sector fully
// written needs no read of the old data), and the other sectors of a 128-byte line come from the
// neighbouring items, which the neighbouring warps store at the same time (items are numbered
// tile-major, column batch minor); 128-byte segments would cost 3 blocks a SM instead of 4 and 4x
// fewer items to spread a short row range over. kSectorBytes is the one constant to revisit on a GPU.
//
// Staging layout: 16-byte pieces, piece v = row x (Seg / 16) + piece-in-row, stored at slot
// v ^ ((v >> 3) & 7) (an XOR swizzle inside each aligned group of 8 pieces = 128 B = all 32 banks).
// Without it the decode phase's 16-byte writes (8 lanes a phase, rows Seg bytes apart) would hit
// the same banks 2-, 4- or 8-way at Seg = 32, 64, 128; with it both phases are conflict-free for
// every 16-byte access (G >= 16: fp16/bf16 D >= 8, fp32 D >= 4). Narrower groups (G = 2..8 bytes)
// write at one offset of each piece, so their decode-phase writes keep 2- to 4-way conflicts.
// No padding, so the staging costs exactly 32 x Seg bytes a warp.
//
// The vectorized store phase needs 16-byte alignment of `out` and of the row stride (cols x
// sizeof(T)) and a full batch; otherwise (a layer whose groups are not a multiple of CB: its last
// batch; odd widths) the warp stores element by element, lanes still on consecutive addresses.
//
// No 64-bit divide in the loop: the warp's first item and the grid's stride are split into (tiles,
// batches) once before the loop; the loop then advances two counters, carrying batch into tile.
//
// Values are the old kernel's bit for bit: scale = decode_group(...) * row scale, then
// from_float<T>(scale * float(y[d])), one rounding each.
#include <cstring>
#include <type_traits>

#include "common/dispatch.h"
#include "common/float_io.cuh"
#include "common/grid.cuh"
#include "common/launch.h"
#include "common/shared_memory.cuh"
#include "packed/launchers.h"

namespace pvq_cuda {
namespace {

constexpr int kThreads = 256;                   // 8 warps: 8 work items in flight per block
constexpr size_t kLeafSmemBytes = 46 * 1024;    // leaf prefix k <= 10 (33,444 B) at K >= 10
constexpr size_t kDefaultSmem = 48 * 1024;      // above it, dynamic shared memory needs an opt-in
constexpr int kSectorBytes = 32;                // the smallest row segment: one whole sector

// The tile shape of one instance: G bytes a group row, Seg bytes a staged row, CB columns an item.
template <int D, typename T>
struct Shape {
  static constexpr int kGroupBytes = D * int(sizeof(T));
  static constexpr int kSeg = kGroupBytes > kSectorBytes ? kGroupBytes : kSectorBytes;
  static constexpr int kColumns = kSeg / kGroupBytes;    // CB
  static constexpr int kPieces = kSeg / 16;              // 16-byte pieces a staged row
  static constexpr int kElems = kSeg / int(sizeof(T));   // elements a staged row
  static constexpr int kWarpBytes = 32 * kSeg;           // staging a warp
  static_assert(kSeg % 16 == 0 && kColumns * kGroupBytes == kSeg, "powers of two only");
};

// The slot of 16-byte piece v (see the header: an XOR swizzle within each 128-byte group).
__device__ __forceinline__ int swizzle(int v) { return v ^ ((v >> 3) & 7); }

// Rows of the tile starting at row0 that lie in [row_begin, row_end): [*lo, *hi), tile-relative.
__device__ __forceinline__ void rows_in_range(int64_t row0, int64_t row_begin, int64_t row_end, int* lo, int* hi) {
  *lo = row_begin > row0 ? int(row_begin - row0) : 0;  // < 32: row0 is the tile holding row_begin or later
  *hi = row_end - row0 < pvq::kTileRows ? int(row_end - row0) : pvq::kTileRows;
}

template <typename T>
__device__ __forceinline__ uint32_t raw_bits(T v) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "fp32, fp16 or bf16");
  if constexpr (sizeof(T) == 4) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
  } else {
    uint16_t u;
    memcpy(&u, &v, 2);
    return u;
  }
}

// Writes one lane's converted group (G bytes at byte `offset` of its staged row) with the widest
// shared-memory stores the group allows; `offset` is a multiple of G, so a group under 16 bytes
// never straddles a piece.
template <int D, typename T>
__device__ __forceinline__ void stage_group(unsigned char* stage, int row, int offset, const T (&v)[D]) {
  using S = Shape<D, T>;
  constexpr int kWords = (S::kGroupBytes + 3) / 4;
  constexpr int kPerWord = 4 / int(sizeof(T));
  uint32_t w[kWords] = {};
#pragma unroll
  for (int d = 0; d < D; ++d) w[d / kPerWord] |= raw_bits(v[d]) << (16 * (d % kPerWord));
  const int byte = row * S::kSeg + offset;
  if constexpr (S::kGroupBytes >= 16) {
#pragma unroll
    for (int q = 0; q < S::kGroupBytes / 16; ++q)
      reinterpret_cast<uint4*>(stage)[swizzle((byte >> 4) + q)] =
          make_uint4(w[4 * q], w[4 * q + 1], w[4 * q + 2], w[4 * q + 3]);
  } else {
    unsigned char* dst = stage + swizzle(byte >> 4) * 16 + (byte & 15);
    if constexpr (S::kGroupBytes == 8) {
      *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
    } else if constexpr (S::kGroupBytes == 4) {
      *reinterpret_cast<uint32_t*>(dst) = w[0];
    } else {
      *reinterpret_cast<uint16_t*>(dst) = uint16_t(w[0]);
    }
  }
}

template <int D, typename T>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(pvq::SplitTables t, pvq::PackedLayer p,
                                                              int64_t row_begin, int64_t row_end,
                                                              T* __restrict__ out, int smem_leaf_k,
                                                              size_t stage_offset, bool vector_stores) {
  using S = Shape<D, T>;
  constexpr int CB = S::kColumns;
  unsigned char* smem = dynamic_shared_memory<unsigned char>();
  stage_leaf_table(t, reinterpret_cast<uint32_t*>(smem), smem_leaf_k);
  const int lane = threadIdx.x & 31;
  unsigned char* stage = smem + stage_offset + (threadIdx.x >> 5) * S::kWarpBytes;

  // The tiles that hold rows [row_begin, row_end); the range need not start or end on a tile.
  const int64_t last_tile = (row_end - 1) / pvq::kTileRows;
  const int64_t batches = (p.groups + CB - 1) / CB;
  const int64_t cols = p.groups * D;
  // Items are numbered tile-major: item i = (first_tile + i / batches, i % batches). The two 64-bit
  // divides happen here, once: the loop below only adds and carries.
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int64_t tile_step = warps / batches, batch_step = warps % batches;
  int64_t tile = row_begin / pvq::kTileRows + warp / batches, batch = warp % batches;
  while (tile <= last_tile) {
    const int64_t row0 = tile * pvq::kTileRows, j0 = batch * CB;
    const int ncols = p.groups - j0 < CB ? int(p.groups - j0) : CB;  // the last batch may be short
    int lo, hi;
    rows_in_range(row0, row_begin, row_end, &lo, &hi);
    // Phase 1: decode the lane's row, CB columns, into the staging area.
    if (lane >= lo && lane < hi) {
      const float row_scale = pvq::half_bits_to_float(p.row_scale[row0 + lane]);
      const uint32_t* chunk = p.words + (tile * p.groups + j0) * p.bits;
#pragma unroll 1
      for (int c = 0; c < ncols; ++c, chunk += p.bits) {
        int8_t y[D];
        const float scale = pvq::decode_group<D>(t, p, pvq::chunk_code(chunk, lane, p.bits), y) * row_scale;
        T v[D];
#pragma unroll
        for (int d = 0; d < D; ++d) v[d] = from_float<T>(scale * float(y[d]));
        stage_group<D, T>(stage, lane, c * S::kGroupBytes, v);
      }
    }
    __syncwarp();  // the staged rows are read by other lanes
    // Phase 2: store rows [lo, hi) of the staging area, lanes on consecutive addresses of a row.
    const int64_t base = (row0 - row_begin) * cols + j0 * D;  // element of staged (row 0, byte 0)
    if (vector_stores && ncols == CB) {
#pragma unroll
      for (int k = 0; k < S::kPieces; ++k) {
        const int v = lane + 32 * k;  // piece v of the 32 x kPieces staged pieces
        const int r = v / S::kPieces, q = v % S::kPieces;
        if (r >= lo && r < hi)
          *reinterpret_cast<uint4*>(out + base + r * cols + q * (16 / int(sizeof(T)))) =
              reinterpret_cast<const uint4*>(stage)[swizzle(v)];
      }
    } else {
      const int width = ncols * D;  // elements of each row in this batch
#pragma unroll 4
      for (int e = lane; e < 32 * S::kElems; e += 32) {
        const int r = e / S::kElems, col = e % S::kElems;
        if (col < width && r >= lo && r < hi) {
          const int byte = r * S::kSeg + col * int(sizeof(T));
          out[base + r * cols + col] = *reinterpret_cast<const T*>(stage + swizzle(byte >> 4) * 16 + (byte & 15));
        }
      }
    }
    __syncwarp();  // the next item overwrites the staging area
    tile += tile_step;
    batch += batch_step;
    if (batch >= batches) {
      batch -= batches;
      ++tile;
    }
  }
}

}  // namespace

cudaError_t launch_dequantize(const pvq::SplitTables& tables, const pvq::PackedLayer& layer, int D, int64_t row_begin,
                              int64_t row_end, void* out, FloatKind out_kind, cudaStream_t stream) {
  if (row_end <= row_begin) return cudaSuccess;
  const int smem_leaf_k = leaf_prefix_k(D, layer.K, kLeafSmemBytes);
  const size_t stage_offset = (leaf_prefix_bytes(smem_leaf_k) + 15) / 16 * 16;
  const int64_t tiles = (row_end - 1) / pvq::kTileRows - row_begin / pvq::kTileRows + 1;
  return dispatch_float_kind(out_kind, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return pvq::dispatch_group_size(D, [&](auto Dc) {
      constexpr int N = decltype(Dc)::value;
      using S = Shape<N, T>;
      const auto kernel = dequantize_kernel<N, T>;
      const size_t smem = stage_offset + size_t(kThreads / 32) * S::kWarpBytes;
      if (smem > kDefaultSmem) {
        const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
        if (err != cudaSuccess) return err;
      }
      const int64_t batches = (layer.groups + S::kColumns - 1) / S::kColumns;
      const int64_t threads_needed = tiles * batches * 32;  // a warp per (tile, column batch)
      // 16-byte stores need 16-byte aligned rows: the buffer and the row stride.
      const bool vector_stores =
          reinterpret_cast<uintptr_t>(out) % 16 == 0 && (layer.groups * N * int64_t(sizeof(T))) % 16 == 0;
      int blocks = 0;
      const cudaError_t err = persistent_grid(kernel, threads_needed, kThreads, smem, &blocks);
      if (err != cudaSuccess) return err;
      return launch_kernel(kernel, blocks, kThreads, smem, stream, tables, layer, row_begin, row_end,
                           static_cast<T*>(out), smem_leaf_k, stage_offset, vector_stores);
    });
  });
}

}  // namespace pvq_cuda
