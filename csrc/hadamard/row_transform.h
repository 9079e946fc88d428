// The CPU transform, torch-free: Sylvester butterflies along the 2^p axis of a row, then the dense
// H_m along the m axis (hadamard_matrix.h has the index convention). T is float (every 16- and
// 32-bit input, rounded like the CUDA kernel) or double (float64 inputs: an exact reference).
#pragma once
#include <cstdint>

namespace pvq::hadamard {

// In place: each of the m contiguous chunks v[a·2^p .. (a+1)·2^p) times S_{2^p}. The stages run in
// the order bit 0, 1, …, p−1, the order the CUDA kernel uses, so both round alike.
template <typename T>
void sylvester_chunks(T* v, int m, int log_p);

// out[a][c] = Σ_{a'} table[a·m + a'] · v[a'][c] for m×cols row-major v and out, summed in
// increasing a' (the CUDA kernel's order). table is dense_table(m); out must not alias v. A row's
// m chunks are v with cols = 2^p; a block of rows transposed to [m][rows·2^p] works the same way.
template <typename T>
void small_hadamard(const float* table, int m, int64_t cols, const T* v, T* out);

// One fp32 row in place, exactly as hadamard_transform's CPU kernel computes a 16- or 32-bit row:
// times the signs (when given), Sylvester butterflies, the H_m sweep over the m chunks (tmp: n
// floats, used when m > 1), then times transform_scale(n). For kernels that rotate a row on the
// way to something else (the activation encoder) without a tensor in between.
void rotate_row(float* v, const float* signs, int m, int log_p, float scale, float* tmp);

}  // namespace pvq::hadamard
