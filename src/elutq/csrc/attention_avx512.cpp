// AVX-512 (F) causal attention.  Compiled with per-file target flags (see CMakeLists.txt) and only
// called after run-time CPU detection (attention.cpp).  Scalar reference: attention_scalar.cpp.
//
// Shapes and layouts: see attention.h.
// attend_avx512: the same causal attention of one column for one KV head and its grp query heads as
// attend_scalar (attention_scalar.cpp), for D % 64 == 0.  Scores go 16 keys at a time: 16 independent
// accumulators (one per key, lanes = 16 dims), summed by a transpose tree into one vector whose lane t
// is key t — no horizontal sum per dot product.  Each block of 16 K rows is read from memory once;
// with several query rows (GQA) it is widened to f32 once into an L1 buffer that every row reads.
// Softmax uses a vector exp (exp_approx's polynomial), and each V row slice is loaded once for 2 query
// rows × 128 dims (4 × 64 where D % 128 != 0) of accumulators.  K and V are fp16, widened
// (vcvtph2ps) as they are loaded.  attend_cols_avx512 does the same for ncol consecutive columns of a
// prompt at once (their ncol·grp rows share the key blocks and V rows; attention.h: attend_columns).
// Measurements: docs/KERNELS.md.
#include <immintrin.h>

#include "attention.h"
#include "simd_x86.h"

namespace elutq {

namespace {

// lane t of the result = Σ_lanes a[t], for 16 vectors a[0..15].
inline __m512 reduce16(const __m512* a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a2i(0+2), a2i+1(0+2), a2i(1+3), a2i+1(1+3)]
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: keys 4i..4i+3, each summed over that lane
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 f01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 f23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(f01, f23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(f01, f23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// e^x, lane-wise: exp_approx (runtime.cpp) in vector form (same clamp, reduction and polynomial).
inline __m512 exp512(__m512 x) {
  // min/max return their second operand for NaN: x second, so a NaN score stays NaN (as exp_approx).
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), _mm512_min_ps(_mm512_set1_ps(88.0f), x));
  const __m512 shift = _mm512_set1_ps(12582912.0f);
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504f), shift);
  const __m512 n = _mm512_sub_ps(t, shift);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x));
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(0x4B400000)), _mm512_set1_epi32(127)),
      23);  // 2^n
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// out[r][d0..d0+DC) = Σ_{j < lens[r]} p[r][j]·v_j[d0..d0+DC) · inv[r] for NR rows (p's rows len apart,
// lens non-decreasing: a prompt block's later columns see more positions): each V row slice loaded
// once for the rows that reach it, NR·DC/16 accumulators.  No row touches a position past its own.
template <int NR, int DC>
inline void pv_rows(const float* p, int len, const int* lens, const uint16_t* v0, size_t stride, int d0,
                    const float* inv, float* out, int D) {
  constexpr int NV = DC / 16;
  __m512 acc[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_setzero_ps();
  int j = 0;
  for (int k = 0; k < NR; ++k) {  // rows k.. are the ones still going over positions lens[k − 1] .. lens[k]
    for (; j < lens[k]; ++j) {
      const uint16_t* vj = v0 + (size_t)j * stride + d0;
      if (j + kAttendAhead < len) prefetch_fp16(vj + kAttendAhead * stride, DC);
      __m512 x[NV];
      for (int i = 0; i < NV; ++i) x[i] = load_h16(vj + 16 * i);
      for (int r = 0; r < NR; ++r) {
        if (r < k) continue;
        const __m512 w = _mm512_set1_ps(p[(size_t)r * len + j]);
        for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_fmadd_ps(w, x[i], acc[r][i]);
      }
    }
  }
  for (int r = 0; r < NR; ++r) {
    const __m512 s = _mm512_set1_ps(inv[r]);
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(out + (size_t)r * D + d0 + 16 * i, _mm512_mul_ps(acc[r][i], s));
  }
}

// All D dims of nr query rows (nr ≤ 4 for DC = 64, ≤ 2 for DC = 128), DC dims per pass over V.
template <int DC>
inline void pv_block(int nr, const float* p, int len, const int* lens, const uint16_t* v0, size_t stride,
                     const float* inv, float* o, int D) {
  for (int d0 = 0; d0 < D; d0 += DC) {
    if (nr == 1) pv_rows<1, DC>(p, len, lens, v0, stride, d0, inv, o, D);
    else if (nr == 2) pv_rows<2, DC>(p, len, lens, v0, stride, d0, inv, o, D);
    if constexpr (DC == 64) {
      if (nr == 3) pv_rows<3, DC>(p, len, lens, v0, stride, d0, inv, o, D);
      else if (nr == 4) pv_rows<4, DC>(p, len, lens, v0, stride, d0, inv, o, D);
    }
  }
}

}  // namespace

void attend_cols_avx512(const float* q, const uint16_t* k0, const uint16_t* v0, size_t stride, int len, int D,
                        int grp, int ncol, float scale, float* sc, float* out) {
  const __m512 vscale = _mm512_set1_ps(scale);
  alignas(64) float kf[16 * 256];  // one block of keys in f32 (D <= 256)
  const int R = grp * ncol;        // query rows; row r belongs to column r / grp
  const int len0 = len - ncol + 1;  // the first column's positions (each later column sees one more)
  const bool widen = R > 1;
  for (int j = 0; j < len; j += 16) {
    const int nk = len - j < 16 ? len - j : 16;
    for (int t = j + kAttendAhead; t < j + kAttendAhead + 16 && t < 2 * len; ++t) prefetch_kv_row(k0, v0, stride, len, D, t);
    const uint16_t* kp[16];
    for (int t = 0; t < 16; ++t) kp[t] = k0 + (size_t)(j + (t < nk ? t : nk - 1)) * stride;  // tail: repeat the last key
    if (widen) {  // several query rows: widen the block once, each row then reads f32 from L1
      for (int t = 0; t < 16; ++t)
        for (int d = 0; d < D; d += 16) _mm512_store_ps(kf + t * D + d, load_h16(kp[t] + d));
    }
    for (int r = 0; r < R; ++r) {
      const int lr = len0 + r / grp;
      if (j >= lr) continue;  // past this column's last position
      const __mmask16 m = lr - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (lr - j)) - 1);
      const float* qr = q + (size_t)r * D;
      __m512 a[16];
      for (int t = 0; t < 16; ++t) a[t] = _mm512_setzero_ps();
      for (int d = 0; d < D; d += 16) {
        const __m512 qv = _mm512_loadu_ps(qr + d);
        if (widen) {
          for (int t = 0; t < 16; ++t) a[t] = _mm512_fmadd_ps(qv, _mm512_load_ps(kf + t * D + d), a[t]);
        } else {
          for (int t = 0; t < 16; ++t) a[t] = _mm512_fmadd_ps(qv, load_h16(kp[t] + d), a[t]);
        }
      }
      _mm512_mask_storeu_ps(sc + (size_t)r * len + j, m, _mm512_mul_ps(reduce16(a), vscale));
    }
  }
  // V in passes of 2 query rows × 128 dims where D allows (each pass reads whole 256-byte rows in
  // order, which streams faster from memory than 4 rows × 64 dims), else 4 rows × 64 dims.  Every row
  // only reads its own column's positions, so a block's columns equal one-column calls bit for bit.
  const int rows = D % 128 == 0 ? 2 : 4;
  float inv[4];
  int lens[4];
  for (int r0 = 0; r0 < R; r0 += rows) {
    const int nr = R - r0 < rows ? R - r0 : rows;
    for (int r = 0; r < nr; ++r) {  // softmax numerators in place, 1/Σ kept for the output
      float* p = sc + (size_t)(r0 + r) * len;
      const int lr = lens[r] = len0 + (r0 + r) / grp;
      __m512 mx = _mm512_set1_ps(-__builtin_inff());
      int j = 0;
      for (; j + 16 <= lr; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(p + j));
      const __mmask16 tail = (__mmask16)((1u << (lr - j)) - 1);
      mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, p + j));
      const __m512 vmx = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
      __m512 sum = _mm512_setzero_ps();
      for (j = 0; j + 16 <= lr; j += 16) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p + j), vmx));
        _mm512_storeu_ps(p + j, e);
        sum = _mm512_add_ps(sum, e);
      }
      if (tail) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, p + j), vmx));
        _mm512_mask_storeu_ps(p + j, tail, e);
        sum = _mm512_mask_add_ps(sum, tail, sum, e);
      }
      inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    const float* p = sc + (size_t)r0 * len;
    float* o = out + (size_t)r0 * D;
    if (rows == 2) pv_block<128>(nr, p, len, lens, v0, stride, inv, o, D);
    else pv_block<64>(nr, p, len, lens, v0, stride, inv, o, D);
  }
}

void attend_avx512(const float* q, const uint16_t* k0, const uint16_t* v0, size_t stride, int len, int D, int grp,
                   float scale, float* sc, float* out) {
  attend_cols_avx512(q, k0, v0, stride, len, D, grp, 1, scale, sc, out);
}

}  // namespace elutq
