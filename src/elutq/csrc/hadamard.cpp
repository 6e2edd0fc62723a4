// The online Hadamard transform (shapes and math: hadamard.h).  One portable implementation: every loop
// runs over contiguous floats with no dependency between iterations, which GCC vectorizes for each ISA
// (ELUTQ_CLONES), so a hand-written SIMD path would add code, not speed.
#include "hadamard.h"

#include <cmath>

#include "common.h"

namespace elutq {

ELUTQ_CLONES void hadamard_transform(const HadamardSpec& h, float* x_, float* tmp_) {
  const int n = h.n, m = h.m, b = h.b;
  float* __restrict x = x_;
  float* __restrict tmp = tmp_;
  const float* __restrict a = h.a;
  const float* __restrict s = h.s;
  for (int i = 0; i < n; ++i) x[i] *= s[i];
  // Sylvester on each run of b: the pass of width w pairs elements w apart ((p, q) -> (p + q, p - q)).
  for (int w = 1; w < b; w *= 2)
    for (int j = 0; j < n; j += 2 * w) {
      float* __restrict lo = x + j;
      float* __restrict hi = x + j + w;
      for (int k = 0; k < w; ++k) {
        const float p = lo[k], q = hi[k];
        lo[k] = p + q;
        hi[k] = p - q;
      }
    }
  // Mix the runs by A: out_i = Σ_j A[j][i]·v_j, scaled to orthonormal; each step an axpy over b floats.
  const float scale = 1.0f / std::sqrt((float)b);
  if (h.identity) {  // block-diagonal: nothing to mix
    for (int i = 0; i < n; ++i) x[i] *= scale;
    return;
  }
  for (int i = 0; i < m; ++i) {
    float* __restrict o = tmp + (size_t)i * b;
    for (int k = 0; k < b; ++k) o[k] = 0.0f;
    for (int j = 0; j < m; ++j) {
      const float aji = a[(size_t)j * m + i] * scale;
      const float* __restrict v = x + (size_t)j * b;
      for (int k = 0; k < b; ++k) o[k] += aji * v[k];
    }
  }
  for (int i = 0; i < n; ++i) x[i] = tmp[i];
}

}  // namespace elutq
