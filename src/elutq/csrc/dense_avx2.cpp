// AVX2 (+FMA, F16C) dense fp16 rows.  Compiled with per-file target flags (see CMakeLists.txt) and only
// called after run-time CPU detection.  Shapes: dense.h; scalar reference: dense_scalar.cpp.
#include <immintrin.h>

#include "dense.h"
#include "simd_x86.h"

namespace elutq {

// Dense fp16 rows (dense.h): 4 rows at a time share each load of X; vcvtph2ps widens the weights.
void dense_rows_avx2(const uint16_t* W, int in, const float* X, int n, int r0, int r1, float* Y, size_t ldy) {
  const int k8 = in & ~7;
  auto lw = [](const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); };
  int r = r0;
  for (; r + 4 <= r1; r += 4) {
    const uint16_t* w0 = W + (size_t)r * in;
    for (int c = 0; c < n; ++c) {
      const float* x = X + (size_t)c * in;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int k = 0; k < k8; k += 8) {
        const __m256 xv = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(lw(w0 + k), xv, a0);
        a1 = _mm256_fmadd_ps(lw(w0 + in + k), xv, a1);
        a2 = _mm256_fmadd_ps(lw(w0 + 2 * (size_t)in + k), xv, a2);
        a3 = _mm256_fmadd_ps(lw(w0 + 3 * (size_t)in + k), xv, a3);
      }
      float* y = Y + (size_t)c * ldy + r;
      y[0] = hsum256(a0);
      y[1] = hsum256(a1);
      y[2] = hsum256(a2);
      y[3] = hsum256(a3);
      for (int k = k8; k < in; ++k)
        for (int j = 0; j < 4; ++j) y[j] += fp16_to_float(w0[(size_t)j * in + k]) * x[k];
    }
  }
  if (r < r1) dense_rows_scalar(W, in, X, n, r, r1, Y, ldy);
}

}  // namespace elutq
