// AVX2 (+FMA, F16C) causal attention.  Compiled with per-file target flags (see CMakeLists.txt) and only
// called after run-time CPU detection (attention.cpp).  Scalar reference: attention_scalar.cpp.
//
// Shapes and layouts: see attention.h.  attend_avx2 / attend_cols_avx2 (D % 32 == 0), as attend_avx512
// with 8-lane vectors: scores 8 keys at a time into 8 independent accumulators summed by one transpose
// tree (lane t = key t), each block of 8 K rows read from memory once (from L1 for the other query rows);
// a vector exp; each V row slice loaded once for 2 query rows × 32 dims of accumulators (a single row:
// 64 dims, half the passes over V).  K and V are fp16, widened by F16C as they are loaded.
#include <immintrin.h>

#include "attention.h"
#include "simd_x86.h"

namespace elutq {

static inline __m256 reduce8(const __m256* a) {  // lane t = Σ_lanes a[t]
  __m256 b[4];
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: [a2i(0+2), a2i+1(0+2), a2i(1+3), a2i+1(1+3)]
    b[i] = _mm256_add_ps(_mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  __m256 c[2];
  for (int i = 0; i < 2; ++i) {  // per 128-bit lane: keys 4i..4i+3, each summed over that lane
    const __m256d x = _mm256_castps_pd(b[2 * i]), y = _mm256_castps_pd(b[2 * i + 1]);
    c[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)), _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
  }
  return _mm256_add_ps(_mm256_permute2f128_ps(c[0], c[1], 0x20), _mm256_permute2f128_ps(c[0], c[1], 0x31));
}

static inline __m256 exp256(__m256 x) {  // exp_approx (runtime.cpp) in vector form
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), _mm256_min_ps(_mm256_set1_ps(88.0f), x));  // NaN stays NaN
  const __m256 shift = _mm256_set1_ps(12582912.0f);
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504f), shift);
  const __m256 n = _mm256_sub_ps(t, shift);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x));
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B400000)), _mm256_set1_epi32(127)),
      23);  // 2^n
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// out[r][d0..d0+8·NV) = Σ_{j < lens[r]} p[r][j]·v_j[d0..d0+8·NV) for NR rows (p normalized, rows len
// apart, lens non-decreasing): each V row slice loaded once for the rows that reach it, NR·NV
// accumulators (a single row gets 64 dims: fewer, longer passes over the rows).
template <int NR, int NV>
static inline void pv_rows_avx2(const float* p, int len, const int* lens, const uint16_t* v0, size_t stride, int d0,
                                float* out, int D) {
  __m256 acc[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < NV; ++i) acc[r][i] = _mm256_setzero_ps();
  int j = 0;
  for (int k = 0; k < NR; ++k) {  // rows k.. are the ones still going over positions lens[k − 1] .. lens[k]
    for (; j < lens[k]; ++j) {
      const uint16_t* vj = v0 + (size_t)j * stride + d0;
      if (j + kAttendAhead < len) prefetch_fp16(vj + kAttendAhead * stride, 8 * NV);
      __m256 x[NV];
      for (int i = 0; i < NV; ++i) x[i] = load_h8(vj + 8 * i);
      for (int r = 0; r < NR; ++r) {
        if (r < k) continue;
        const __m256 w = _mm256_set1_ps(p[(size_t)r * len + j]);
        for (int i = 0; i < NV; ++i) acc[r][i] = _mm256_fmadd_ps(w, x[i], acc[r][i]);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < NV; ++i) _mm256_storeu_ps(out + (size_t)r * D + d0 + 8 * i, acc[r][i]);
}

void attend_cols_avx2(const float* q, const uint16_t* k0, const uint16_t* v0, size_t stride, int len, int D, int grp,
                      int ncol, float scale, float* sc, float* out) {
  const __m256 vscale = _mm256_set1_ps(scale);
  alignas(32) float tmp[8];
  const int R = grp * ncol;         // query rows; row r belongs to column r / grp
  const int len0 = len - ncol + 1;  // the first column's positions (each later column sees one more)
  for (int j = 0; j < len; j += 8) {
    const int nk = len - j < 8 ? len - j : 8;
    for (int t = j + kAttendAhead; t < j + kAttendAhead + 8 && t < 2 * len; ++t) prefetch_kv_row(k0, v0, stride, len, D, t);
    const uint16_t* kp[8];
    for (int t = 0; t < 8; ++t) kp[t] = k0 + (size_t)(j + (t < nk ? t : nk - 1)) * stride;  // tail: repeat the last key
    for (int r = 0; r < R; ++r) {
      const int lr = len0 + r / grp;
      if (j >= lr) continue;  // past this column's last position
      const float* qr = q + (size_t)r * D;
      __m256 a[8];
      for (int t = 0; t < 8; ++t) a[t] = _mm256_setzero_ps();
      for (int d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(qr + d);
        for (int t = 0; t < 8; ++t) a[t] = _mm256_fmadd_ps(qv, load_h8(kp[t] + d), a[t]);
      }
      const __m256 s = _mm256_mul_ps(reduce8(a), vscale);
      float* dst = sc + (size_t)r * len + j;
      if (lr - j >= 8) {
        _mm256_storeu_ps(dst, s);
      } else {
        _mm256_store_ps(tmp, s);
        for (int t = 0; t < lr - j; ++t) dst[t] = tmp[t];
      }
    }
  }
  for (int r = 0; r < R; ++r) {  // softmax weights in place (the column's positions), normalized
    float* p = sc + (size_t)r * len;
    const int lr = len0 + r / grp;
    float mx = p[0];
    for (int j = 1; j < lr; ++j) mx = p[j] > mx ? p[j] : mx;
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 vsum = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= lr; j += 8) {
      const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + j), vmx));
      _mm256_storeu_ps(p + j, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum256(vsum);
    if (j < lr) {
      for (int t = 0; t < 8; ++t) tmp[t] = j + t < lr ? p[j + t] - mx : -87.0f;
      _mm256_store_ps(tmp, exp256(_mm256_load_ps(tmp)));
      for (int t = 0; j + t < lr; ++t) {
        p[j + t] = tmp[t];
        sum += tmp[t];
      }
    }
    const __m256 inv = _mm256_set1_ps(1.0f / sum);
    for (j = 0; j + 8 <= lr; j += 8) _mm256_storeu_ps(p + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), inv));
    for (; j < lr; ++j) p[j] *= 1.0f / sum;
  }
  for (int r = 0; r < R; r += 2) {  // two query rows share each load of V; a last odd one alone
    const float* p = sc + (size_t)r * len;
    float* o = out + (size_t)r * D;
    const int lens[2] = {len0 + r / grp, len0 + (r + 1) / grp};  // each row only reads its own positions
    if (r + 1 < R) {
      for (int d = 0; d < D; d += 32) pv_rows_avx2<2, 4>(p, len, lens, v0, stride, d, o, D);
    } else {
      int d = 0;
      for (; d + 64 <= D; d += 64) pv_rows_avx2<1, 8>(p, len, lens, v0, stride, d, o, D);
      if (d < D) pv_rows_avx2<1, 4>(p, len, lens, v0, stride, d, o, D);
    }
  }
}

void attend_avx2(const float* q, const uint16_t* k0, const uint16_t* v0, size_t stride, int len, int D, int grp,
                 float scale, float* sc, float* out) {
  attend_cols_avx2(q, k0, v0, stride, len, D, grp, 1, scale, sc, out);
}

}  // namespace elutq
