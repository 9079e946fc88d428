// nvcuda::wmma for the host emulation; shadows CUDA's <mma.h> (this directory comes first on the
// emulation build's include path).
//
// A fragment holds its tile spread over the 32 lanes of a warp in a layout CUDA leaves unspecified.
// Here that layout is deliberately scrambled (a different odd-multiplier permutation for each
// fragment use), so code that assumes which lane holds which element computes garbage; code that
// only loads, stores, fills, multiplies, or treats accumulator fragments of one type elementwise
// (all that CUDA promises) is exact. load/store/mma are warp collectives: every lane of the warp
// must call them with the same pointer and stride, which is checked. mma_sync multiplies in float,
// adding the products in k order; tensor cores may round sums differently.
#pragma once
#include <cstdint>
#include <type_traits>

#include "cuda_emulation.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {

template <typename Use, int M, int N, int K>
struct TileShape;
template <int M, int N, int K>
struct TileShape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
  static constexpr uint32_t scramble = 0x9e37u;  // per use: a, b and accumulator layouts all differ
};
template <int M, int N, int K>
struct TileShape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
  static constexpr uint32_t scramble = 0x7f4bu;
};
template <int M, int N, int K>
struct TileShape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
  static constexpr uint32_t scramble = 0x3c6fu;
};

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
T from_float(float v);
template <>
inline float from_float<float>(float v) { return v; }
template <>
inline __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Tile element (row * cols + col) held by element e of `lane`: an odd multiplier permutes the
// 32 * per_lane slots (a power of two), so each tile element has exactly one slot.
template <typename Shape>
constexpr int tile_index(int lane, int e) {
  constexpr int per_lane = Shape::rows * Shape::cols / 32;
  constexpr int slots = Shape::rows * Shape::cols;
  return int((uint32_t(lane * per_lane + e) * (2u * Shape::scramble + 1u) + Shape::scramble) % uint32_t(slots));
}

// Where slot e of `lane` lives in memory: tile element (r, c) at ptr[r * ldm + c] when the memory is
// row-major, ptr[c * ldm + r] when it is column-major.
template <typename Shape, typename T>
T& element(T* ptr, unsigned ldm, bool row_major_memory, int lane, int e) {
  const int t = tile_index<Shape>(lane, e), r = t / Shape::cols, c = t % Shape::cols;
  return row_major_memory ? ptr[size_t(r) * ldm + c] : ptr[size_t(c) * ldm + r];
}

// All lanes must pass one pointer and one stride (one collective checks both), 256-bit aligned and
// a multiple of 16 bytes.
inline void check_operands(const void* ptr, unsigned ldm, size_t element_bytes, const char* name,
                           const pvq_emulation::Where& where) {
  pvq_emulation::warp_collective(pvq_emulation::Collective::kUniform, 0xffffffffu, reinterpret_cast<uintptr_t>(ptr),
                                 int(ldm), 32, name, where);
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0)
    pvq_emulation::fail(where, "%s: pointer %p is not 256-bit aligned", name, ptr);
  if (ldm * element_bytes % 16 != 0)
    pvq_emulation::fail(where, "%s: ldm %u is not a multiple of 16 bytes", name, ldm);
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
 public:
  using Shape = detail::TileShape<Use, M, N, K>;
  static_assert(Shape::rows * Shape::cols % 32 == 0, "a tile spreads evenly over 32 lanes");
  using element_type = T;
  static constexpr int num_elements = Shape::rows * Shape::cols / 32;
  element_type x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const T& value) {
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = value;
}

// matrix_a / matrix_b: the layout is the fragment's.
template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* ptr, unsigned ldm,
                             pvq_emulation::Where where = pvq_emulation::Where::current()) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulators take a layout_t argument");
  using Shape = typename fragment<Use, M, N, K, T, Layout>::Shape;
  detail::check_operands(ptr, ldm, sizeof(T), "wmma::load_matrix_sync", where);
  const int lane = pvq_emulation::lane_id();
  for (int e = 0; e < f.num_elements; ++e)
    f.x[e] = detail::element<Shape>(ptr, ldm, std::is_same_v<Layout, row_major>, lane, e);
}

template <int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* ptr, unsigned ldm, layout_t layout,
                             pvq_emulation::Where where = pvq_emulation::Where::current()) {
  using Shape = typename fragment<accumulator, M, N, K, T>::Shape;
  detail::check_operands(ptr, ldm, sizeof(T), "wmma::load_matrix_sync", where);
  const int lane = pvq_emulation::lane_id();
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = detail::element<Shape>(ptr, ldm, layout == mem_row_major, lane, e);
}

template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* ptr, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout,
                              pvq_emulation::Where where = pvq_emulation::Where::current()) {
  using Shape = typename fragment<accumulator, M, N, K, T>::Shape;
  detail::check_operands(ptr, ldm, sizeof(T), "wmma::store_matrix_sync", where);
  const int lane = pvq_emulation::lane_id();
  for (int e = 0; e < f.num_elements; ++e) detail::element<Shape>(ptr, ldm, layout == mem_row_major, lane, e) = f.x[e];
}

// d = a b + c for the warp, as one collective: the last lane to arrive gathers every lane's a, b
// and c into tiles, then writes every lane's elements of d (d may be c).
template <int M, int N, int K, typename Tab, typename LayoutA, typename LayoutB, typename Tc>
inline void mma_sync(fragment<accumulator, M, N, K, Tc>& d, const fragment<matrix_a, M, N, K, Tab, LayoutA>& a,
                     const fragment<matrix_b, M, N, K, Tab, LayoutB>& b, const fragment<accumulator, M, N, K, Tc>& c,
                     pvq_emulation::Where where = pvq_emulation::Where::current()) {
  using FragA = fragment<matrix_a, M, N, K, Tab, LayoutA>;
  using FragB = fragment<matrix_b, M, N, K, Tab, LayoutB>;
  using FragC = fragment<accumulator, M, N, K, Tc>;
  struct Operands {
    const FragA* a;
    const FragB* b;
    const FragC* c;
    FragC* d;
  } mine{&a, &b, &c, &d};
  pvq_emulation::warp_apply(&mine, [](void* const* lanes) {
    float A[M * K], B[K * N], C[M * N];
    for (int l = 0; l < 32; ++l) {
      const Operands& o = *static_cast<const Operands*>(lanes[l]);
      for (int e = 0; e < FragA::num_elements; ++e)
        A[detail::tile_index<typename FragA::Shape>(l, e)] = detail::to_float(o.a->x[e]);
      for (int e = 0; e < FragB::num_elements; ++e)
        B[detail::tile_index<typename FragB::Shape>(l, e)] = detail::to_float(o.b->x[e]);
      for (int e = 0; e < FragC::num_elements; ++e)
        C[detail::tile_index<typename FragC::Shape>(l, e)] = detail::to_float(o.c->x[e]);
    }
    for (int l = 0; l < 32; ++l) {
      const Operands& o = *static_cast<const Operands*>(lanes[l]);
      for (int e = 0; e < FragC::num_elements; ++e) {
        const int t = detail::tile_index<typename FragC::Shape>(l, e), r = t / N, col = t % N;
        float acc = C[t];
        for (int k = 0; k < K; ++k) acc += A[r * K + k] * B[k * N + col];
        o.d->x[e] = detail::from_float<Tc>(acc);
      }
    }
  }, "wmma::mma_sync", where);
}

}  // namespace wmma
}  // namespace nvcuda
