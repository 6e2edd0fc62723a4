// The online Hadamard transform (shapes and math: hadamard.h).  One portable implementation: every loop
// runs over contiguous floats with no dependency between iterations, which GCC vectorizes for each ISA
// (ELUTQ_CLONES), so a hand-written SIMD path would add code, not speed.
#include "hadamard.h"

#include <cmath>

#include "common.h"

namespace elutq {

ELUTQ_CLONES void hadamard_transform(const HadamardSpec& h, float* x, float* tmp) {
  const int n = h.n, m = h.m, b = h.b;
  for (int i = 0; i < n; ++i) x[i] *= h.s[i];
  // Sylvester on each run of b: the pass of width w pairs elements w apart ((a, c) -> (a + c, a - c)).
  for (int w = 1; w < b; w *= 2)
    for (int j = 0; j < n; j += 2 * w)
      for (int k = j; k < j + w; ++k) {
        const float a = x[k], c = x[k + w];
        x[k] = a + c;
        x[k + w] = a - c;
      }
  // Mix the runs by A: out_i = Σ_j A[j][i]·v_j, scaled to orthonormal.
  const float scale = 1.0f / std::sqrt((float)n);
  for (int i = 0; i < m; ++i) {
    float* o = tmp + (size_t)i * b;
    for (int k = 0; k < b; ++k) o[k] = 0.0f;
    for (int j = 0; j < m; ++j) {
      const float aji = h.a[(size_t)j * m + i] * scale;
      const float* v = x + (size_t)j * b;
      for (int k = 0; k < b; ++k) o[k] += aji * v[k];
    }
  }
  for (int i = 0; i < n; ++i) x[i] = tmp[i];
}

}  // namespace elutq
