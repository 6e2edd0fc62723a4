// The online Hadamard transform (shapes and math: hadamard.h).  Plain loops over contiguous floats, which
// GCC vectorizes for each ISA (ELUTQ_CLONES), except the narrowest butterfly passes: those have an AVX-512
// and an AVX2 path (the plain loops stay as the scalar path and the reference).
#include "hadamard.h"

#include <cmath>

#include "common.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ELUTQ_HADAMARD_X86 1
#endif

namespace elutq {

namespace {

// The signs and the passes of width 1, 2, 4 and 8, where b is a multiple of 16.  Those passes pair elements
// within aligned runs of 16, so a run is one AVX-512 register (two AVX2 ones) and a pass is a swap and a
// multiply-add, y = x·(±1) + swap_w(x): +1 on the first element of each pair, −1 on the second.  As plain
// loops these narrow pairs do not vectorize, and they cost about as much as all the rest (1536 = 12·128).
#ifdef ELUTQ_HADAMARD_X86
__attribute__((target("avx512f"))) void narrow_passes_avx512(float* x, const float* s, int n) {
  const __m512 p1 = _mm512_setr_ps(1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1);
  const __m512 p2 = _mm512_setr_ps(1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1);
  const __m512 p4 = _mm512_setr_ps(1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1);
  const __m512 p8 = _mm512_setr_ps(1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1);
  for (int c = 0; c < n; c += 16) {
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + c), _mm512_loadu_ps(s + c));
    v = _mm512_fmadd_ps(v, p1, _mm512_permute_ps(v, 0xB1));         // elements (1, 0, 3, 2) of each 4
    v = _mm512_fmadd_ps(v, p2, _mm512_permute_ps(v, 0x4E));         // (2, 3, 0, 1)
    v = _mm512_fmadd_ps(v, p4, _mm512_shuffle_f32x4(v, v, 0xB1));   // 128-bit lanes (1, 0, 3, 2)
    v = _mm512_fmadd_ps(v, p8, _mm512_shuffle_f32x4(v, v, 0x4E));   // lanes (2, 3, 0, 1)
    _mm512_storeu_ps(x + c, v);
  }
}

__attribute__((target("avx2,fma"))) void narrow_passes_avx2(float* x, const float* s, int n) {
  const __m256 p1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
  const __m256 p2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
  const __m256 p4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
  for (int c = 0; c < n; c += 16) {
    __m256 v[2];
    for (int h = 0; h < 2; ++h) {
      __m256 u = _mm256_mul_ps(_mm256_loadu_ps(x + c + 8 * h), _mm256_loadu_ps(s + c + 8 * h));
      u = _mm256_fmadd_ps(u, p1, _mm256_permute_ps(u, 0xB1));
      u = _mm256_fmadd_ps(u, p2, _mm256_permute_ps(u, 0x4E));
      v[h] = _mm256_fmadd_ps(u, p4, _mm256_permute2f128_ps(u, u, 0x01));
    }
    _mm256_storeu_ps(x + c, _mm256_add_ps(v[0], v[1]));  // width 8: the two registers are the pair
    _mm256_storeu_ps(x + c + 8, _mm256_sub_ps(v[0], v[1]));
  }
}
#endif

}  // namespace

ELUTQ_CLONES void hadamard_transform(const HadamardSpec& h, float* x_, float* tmp_, Path path) {
  const int n = h.n, m = h.m, b = h.b;
  float* __restrict x = x_;
  float* __restrict tmp = tmp_;
  const float* __restrict a = h.a;
  const float* __restrict s = h.s;
  int w = 1;  // Sylvester on each run of b: the pass of width w pairs elements w apart ((p, q) -> (p + q, p - q))
#ifdef ELUTQ_HADAMARD_X86
  if (b % 16 == 0 && path == Path::Avx512) narrow_passes_avx512(x, s, n), w = 16;
  if (b % 16 == 0 && path == Path::Avx2) narrow_passes_avx2(x, s, n), w = 16;
#endif
  if (w == 1)
    for (int i = 0; i < n; ++i) x[i] *= s[i];
  for (; w < b; w *= 2)
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
