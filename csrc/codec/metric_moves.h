// One pass of the metric pulse search for one group (quantization/quantize.py's _metric_search):
// of the single pulse moves i -> j, the one that most raises the fit (yMwᵀ)² / (yMyᵀ) of pulses y
// to the target w under the block metric M. Torch-free, float64.
//
// Each quantity is the same float64 expression, evaluated in the same order, as in the torch
// scoring of quantize.py's _scored_moves (the path on every other device): for the move
// δ = s_i·e_i + t_j·e_j, with s = −sign(y) (the pulse leaving i) and t_j = sign(y_j), or sign(w_j)
// where y_j = 0 (the pulse arriving at j),
//   num_ij = (num0 + s_i·Mw_i) + t_j·Mw_j
//   den_ij = ((((den0 + 2s_i·My_i) + 2t_j·My_j) + M_ii) + M_jj) + (s_i·t_j)·(2M_ij)
//   score_ij = num_ij² / max(den_ij, 1e-300)
// So the codes do not depend on which path scored them. The translation unit that includes this
// is compiled with -ffp-contract=off: an FMA would round differently.
#pragma once

namespace pvq {

inline double sign_of(double v) { return v > 0 ? 1.0 : v < 0 ? -1.0 : 0.0; }

// y, Mw, My, w_sign: the group's N pulses (as float64), w·M, y·M and sign(w) (±1); num0 = y·Mw,
// den0 = y·My; M: N×N row-major. Writes y with the best move made into `moved` and returns whether
// that move raises the fit by more than a relative 1e-12 (otherwise `moved` is y unchanged).
// Ties between moves go to the first in (i, j) order, as torch's max does.
template <int N>
bool best_pulse_move(const double* y, const double* Mw, const double* My, double num0, double den0,
                     const double* w_sign, const double* M, double* moved) {
  double src[N], dst[N], num_i[N], den_i[N], num_j[N], den_j[N];
  for (int k = 0; k < N; ++k) {
    const double s = sign_of(y[k]);
    src[k] = -s;                            // the pulse leaving k
    dst[k] = y[k] == 0 ? w_sign[k] : s;     // the pulse arriving at k
    num_i[k] = num0 + src[k] * Mw[k];
    den_i[k] = den0 + (2 * src[k]) * My[k];
    num_j[k] = dst[k] * Mw[k];
    den_j[k] = (2 * dst[k]) * My[k];
    moved[k] = y[k];
  }
  double top = -1.0;  // torch's version masks impossible moves with -1; every real score is >= 0
  int best_i = 0, best_j = 0;
  for (int i = 0; i < N; ++i) {
    if (y[i] == 0) continue;  // no pulse to move
    const double* Mi = M + i * N;
    double score[N];
    for (int j = 0; j < N; ++j) {
      const double num = num_i[i] + num_j[j];
      double den = (((den_i[i] + den_j[j]) + Mi[i]) + M[j * N + j]) + (src[i] * dst[j]) * (2 * Mi[j]);
      den = den < 1e-300 ? 1e-300 : den;  // as clamp_min: NaN stays NaN
      score[j] = (num * num) / den;
    }
    for (int j = 0; j < N; ++j) {
      if (j != i && score[j] > top) {
        top = score[j];
        best_i = i;
        best_j = j;
      }
    }
  }
  const double current = (num0 * num0) / (den0 < 1e-300 ? 1e-300 : den0);
  if (!(top > current * (1 + 1e-12))) return false;
  moved[best_i] += src[best_i];
  moved[best_j] += dst[best_j];
  return true;
}

}  // namespace pvq
