// AVX-512 (F) dense fp16 rows.  Compiled with per-file target flags (see CMakeLists.txt) and only
// called after run-time CPU detection.  Shapes: dense.h; scalar reference: dense_scalar.cpp.
#include <immintrin.h>

#include "dense.h"
#include "simd_x86.h"

namespace elutq {

// Dense fp16 rows (dense.h): 4 rows at a time share each load of X; vcvtph2ps widens the weights.
void dense_rows_avx512(const uint16_t* W, int in, const float* X, int n, int r0, int r1, float* Y, size_t ldy) {
  const int k16 = in & ~15;
  const __mmask16 tail = (__mmask16)((1u << (in - k16)) - 1);
  int r = r0;
  for (; r + 4 <= r1; r += 4) {
    const uint16_t* w0 = W + (size_t)r * in;
    for (int c = 0; c < n; ++c) {
      const float* x = X + (size_t)c * in;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int k = 0; k < k16; k += 16) {
        const __m512 xv = _mm512_loadu_ps(x + k);
        a0 = _mm512_fmadd_ps(load_h16(w0 + k), xv, a0);
        a1 = _mm512_fmadd_ps(load_h16(w0 + in + k), xv, a1);
        a2 = _mm512_fmadd_ps(load_h16(w0 + 2 * (size_t)in + k), xv, a2);
        a3 = _mm512_fmadd_ps(load_h16(w0 + 3 * (size_t)in + k), xv, a3);
      }
      if (tail) {
        const __m512 xv = _mm512_maskz_loadu_ps(tail, x + k16);
        auto lw = [&](const uint16_t* p) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(tail, p + k16)); };
        a0 = _mm512_fmadd_ps(lw(w0), xv, a0);
        a1 = _mm512_fmadd_ps(lw(w0 + in), xv, a1);
        a2 = _mm512_fmadd_ps(lw(w0 + 2 * (size_t)in), xv, a2);
        a3 = _mm512_fmadd_ps(lw(w0 + 3 * (size_t)in), xv, a3);
      }
      float* y = Y + (size_t)c * ldy + r;
      y[0] = _mm512_reduce_add_ps(a0);
      y[1] = _mm512_reduce_add_ps(a1);
      y[2] = _mm512_reduce_add_ps(a2);
      y[3] = _mm512_reduce_add_ps(a3);
    }
  }
  if (r < r1) dense_rows_scalar(W, in, X, n, r, r1, Y, ldy);
}

}  // namespace elutq
