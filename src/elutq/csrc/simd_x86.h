// Small x86 SIMD helpers shared by the per-ISA files (lut_*, attention_*, dense_*).  Each exists only where the
// including file is compiled with its target flags (CMakeLists.txt), so none can reach baseline code.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace elutq {

#if defined(__AVX2__) && defined(__F16C__)
// 8 fp16 values → f32 (F16C).
static inline __m256 load_h8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

// Σ of the 8 lanes: (lo + hi) per 128-bit half, then pairs, then the last two.
static inline float hsum256(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
#endif

#if defined(__AVX512F__)
// 16 fp16 values → f32.
static inline __m512 load_h16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
#endif

}  // namespace elutq
