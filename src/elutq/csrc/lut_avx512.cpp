// AVX-512 (F/BW/VBMI/VNNI) LUT kernels.  Compiled with per-file target flags (see CMakeLists.txt)
// and only called after run-time CPU detection.  Scalar reference: lut_scalar.cpp.
//
// Shapes and layouts: see lut.h.  One 64-byte weight chunk = 16 rows × 8 runs of one plane:
//   lo = (chunk & 0x0F) | 16·(p mod 4)      index into the 64-byte table T[k0..k0+3]
//   hi = (chunk >> 4 & 0x0F) | 16·(p mod 4)  index into T[k0+4..k0+7]
//   vpermb(lo, tq + 128L), vpermb(hi, tq + 128L + 64)  → 64 int8 lookups each (16 rows × 4 runs)
//   vpdpbusd(acc, mult, lookups) sums each row's 4 bytes, times their runs' multipliers (lut.h; the
//   u8 operand is the broadcast of mult[k0..k0+3], resp. mult[k0+4..k0+7]), into its int32 lane.
// Per (row block, group): y += lut_scale·Σ_i s_i·float(acc_i) + (z + Σ_i s_i/2)·Σx, fp16 scales via
// vcvtph2ps (signed tables, see lut.h).
//
// Only intrinsics and plain functions live here (no std templates), so no AVX-512 code can leak
// into inline functions shared with baseline translation units.
#include <immintrin.h>

#include <cstring>

#include "lut.h"

namespace elutq {

namespace {

inline __m512i chunk_pattern() {  // byte p → 16·(p mod 4)
  return _mm512_set1_epi32(0x30201000);
}

// The u8 multipliers of 4 consecutive runs, in every dword (byte j ↔ run k0 + j).
inline __m512i mult4(const uint8_t* m) {
  int32_t v;
  std::memcpy(&v, m, 4);
  return _mm512_set1_epi32(v);
}

// Sum of one plane over one group for 16 rows: NL chunks of 64 bytes; m: the chunks' multipliers
// (low-nibble runs, high-nibble runs), shared by every plane of the group.
template <int NL>
inline __m512i plane_group(const uint8_t* wp, const int8_t* tg, const __m512i (*m)[2], int pf) {
  const __m512i mask = _mm512_set1_epi8(0x0F);
  const __m512i pat = chunk_pattern();
  __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
#pragma GCC unroll 4
  for (int L = 0; L < NL; ++L) {
    const __m512i v = _mm512_loadu_si512((const void*)(wp + 64 * L));
    if (pf) _mm_prefetch((const char*)(wp + 64 * L + pf), _MM_HINT_T1);
    const __m512i lo = _mm512_ternarylogic_epi32(v, mask, pat, 0xEA);  // (v & mask) | pat
    const __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), mask, pat, 0xEA);
    const __m512i t0 = _mm512_loadu_si512((const void*)(tg + 128 * L));
    const __m512i t1 = _mm512_loadu_si512((const void*)(tg + 128 * L + 64));
    acc0 = _mm512_dpbusd_epi32(acc0, m[L][0], _mm512_permutexvar_epi8(lo, t0));
    acc1 = _mm512_dpbusd_epi32(acc1, m[L][1], _mm512_permutexvar_epi8(hi, t1));
  }
  return _mm512_add_epi32(acc0, acc1);
}

inline __m512 xor_ps(__m512 a, __m512 b) {  // (AVX512DQ's _mm512_xor_ps without needing DQ)
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_castps_si512(b)));
}

inline __m512 load_h16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
}

inline void store_rows(__m512 v, int rb, int out, float* y) {
  const int r0 = rb * kRowBlock;
  const int n = out - r0 < kRowBlock ? out - r0 : kRowBlock;
  const __mmask16 m = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
  _mm512_mask_storeu_ps(y + r0, m, v);
}

// 16 outputs of one row block for one activation vector.
template <int BITS, int NL>
inline __m512 row_block(const uint8_t* wp, const uint16_t* sp, int ng, const int8_t* tq, const uint8_t* tm,
                        size_t gstride, const float* lut_scale, const float* xsum) {
  __m512 yacc = _mm512_setzero_ps();
  for (int G = 0; G < ng; ++G) {
    const int8_t* tg = tq + (size_t)G * gstride;
    const uint8_t* mg = tm + (size_t)G * gstride / 16;
    __m512i m[NL][2];
    for (int L = 0; L < NL; ++L) {
      m[L][0] = mult4(mg + 8 * L);
      m[L][1] = mult4(mg + 8 * L + 4);
    }
    __m512 fsum = _mm512_setzero_ps(), ssum = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int i = 0; i < BITS; ++i) {
      const __m512i acc = plane_group<NL>(wp + i * NL * 64, tg, m, g_prefetch_bytes);
      const __m512 s = load_h16(sp + 16 * i);
      fsum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), s, fsum);
      ssum = _mm512_add_ps(ssum, s);
    }
    if (g_prefetch_bytes) {  // the scale stream moves (BITS+1)·32 bytes per group
      for (int o = 0; o < (BITS + 1) * 32; o += 64)
        _mm_prefetch((const char*)sp + g_prefetch_bytes / 4 + o, _MM_HINT_T1);
    }
    // y += lut_scale·Σ_i s_i·acc_i + (z + Σ_i s_i / 2)·Σx
    const __m512 zz = _mm512_fmadd_ps(ssum, _mm512_set1_ps(0.5f), load_h16(sp + 16 * BITS));
    yacc = _mm512_fmadd_ps(fsum, _mm512_set1_ps(lut_scale[G]), yacc);
    yacc = _mm512_fmadd_ps(zz, _mm512_set1_ps(xsum[G]), yacc);
    wp += BITS * NL * 64;
    sp += (BITS + 1) * 16;
  }
  return yacc;
}

template <int BITS, int NL>
void gemv_t(const LutWeight& W, const LutTables& T, int rb0, int rb1, float* y) {
  for (int rb = rb0; rb < rb1; ++rb) {
    const uint8_t* wp = W.w + (size_t)rb * W.w_bytes_per_rb();
    const uint16_t* sp = W.sz + (size_t)rb * W.sz_elems_per_rb();
    store_rows(row_block<BITS, NL>(wp, sp, W.ng, T.tq, T.tm, T.gstride, T.lut_scale, T.xsum), rb, W.out, y);
  }
}

// GEMM: per (row block, group) the chunk indices of all planes are computed once into an L1
// buffer and reused for every column; each column's group tables (g·4 bytes, contiguous across
// columns in the group-major table layout) are loaded once into registers and serve all planes.
template <int BITS, int NL>
void gemm_t(const LutWeight& W, const int8_t* tq, const uint8_t* tm, size_t gstride, const float* lut_scale,
            const float* xsum, int n, int rb0, int rb1, float* y, size_t ldy, float* ybuf /* [n][16] */) {
  constexpr int G4 = NL * 128;
  alignas(64) __m512i idx[BITS][NL][2];
  const __m512i mask = _mm512_set1_epi8(0x0F), pat = chunk_pattern();
  const int ng = W.ng;
  for (int rb = rb0; rb < rb1; ++rb) {
    const uint8_t* wp = W.w + (size_t)rb * W.w_bytes_per_rb();
    const uint16_t* sp = W.sz + (size_t)rb * W.sz_elems_per_rb();
    for (int c = 0; c < n; ++c) _mm512_store_ps(ybuf + 16 * c, _mm512_setzero_ps());
    for (int G = 0; G < ng; ++G) {
      for (int i = 0; i < BITS; ++i)
        for (int L = 0; L < NL; ++L) {
          const __m512i v = _mm512_loadu_si512((const void*)(wp + (i * NL + L) * 64));
          idx[i][L][0] = _mm512_ternarylogic_epi32(v, mask, pat, 0xEA);
          idx[i][L][1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), mask, pat, 0xEA);
        }
      __m512 s[BITS];
      __m512 ssum = _mm512_setzero_ps();
      for (int i = 0; i < BITS; ++i) {
        s[i] = load_h16(sp + 16 * i);
        ssum = _mm512_add_ps(ssum, s[i]);
      }
      const __m512 z = _mm512_fmadd_ps(ssum, _mm512_set1_ps(0.5f), load_h16(sp + 16 * BITS));  // z + Σs/2
      const int8_t* tg = tq + (size_t)G * gstride;
      const uint8_t* mg = tm + (size_t)G * gstride / 16;
      for (int c = 0; c < n; ++c, tg += G4, mg += G4 / 16) {
        // Chunk-outer, plane-inner: each chunk's tables and multipliers are loaded once and serve
        // every plane (few live registers, so 4-bit tiles do not spill).
        __m512i acc[BITS][2];
        for (int i = 0; i < BITS; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
        for (int L = 0; L < NL; ++L) {
          const __m512i t0 = _mm512_loadu_si512((const void*)(tg + 128 * L));
          const __m512i t1 = _mm512_loadu_si512((const void*)(tg + 128 * L + 64));
          const __m512i m0 = mult4(mg + 8 * L), m1 = mult4(mg + 8 * L + 4);
          for (int i = 0; i < BITS; ++i) {
            acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], m0, _mm512_permutexvar_epi8(idx[i][L][0], t0));
            acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], m1, _mm512_permutexvar_epi8(idx[i][L][1], t1));
          }
        }
        __m512 fsum = _mm512_setzero_ps();
        for (int i = 0; i < BITS; ++i)
          fsum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[i][0], acc[i][1])), s[i], fsum);
        __m512 yc = _mm512_load_ps(ybuf + 16 * c);
        yc = _mm512_fmadd_ps(fsum, _mm512_set1_ps(lut_scale[(size_t)c * ng + G]), yc);
        yc = _mm512_fmadd_ps(z, _mm512_set1_ps(xsum[(size_t)c * ng + G]), yc);
        _mm512_store_ps(ybuf + 16 * c, yc);
      }
      wp += BITS * NL * 64;
      sp += (BITS + 1) * 16;
    }
    for (int c = 0; c < n; ++c) store_rows(_mm512_load_ps(ybuf + 16 * c), rb, W.out, y + c * ldy);
  }
}

using GemvFn = void (*)(const LutWeight&, const LutTables&, int, int, float*);
using GemmFn = void (*)(const LutWeight&, const int8_t*, const uint8_t*, size_t, const float*, const float*, int, int,
                        int, float*, size_t, float*);

template <int BITS>
GemvFn pick_gemv(int nl) {
  return nl == 1 ? gemv_t<BITS, 1> : nl == 2 ? gemv_t<BITS, 2> : gemv_t<BITS, 4>;
}
template <int BITS>
GemmFn pick_gemm(int nl) {
  return nl == 1 ? gemm_t<BITS, 1> : nl == 2 ? gemm_t<BITS, 2> : gemm_t<BITS, 4>;
}

GemvFn gemv_fn(int bits, int g) {
  const int nl = g / 32;
  switch (bits) {
    case 1: return pick_gemv<1>(nl);
    case 2: return pick_gemv<2>(nl);
    case 3: return pick_gemv<3>(nl);
    default: return pick_gemv<4>(nl);
  }
}
GemmFn gemm_fn(int bits, int g) {
  const int nl = g / 32;
  switch (bits) {
    case 1: return pick_gemm<1>(nl);
    case 2: return pick_gemm<2>(nl);
    case 3: return pick_gemm<3>(nl);
    default: return pick_gemm<4>(nl);
  }
}

}  // namespace

void gemv_rows_avx512(const LutWeight& W, const LutTables& T, int rb0, int rb1, float* y) {
  gemv_fn(W.bits, W.g)(W, T, rb0, rb1, y);
}

void gemm_rows_avx512(const LutWeight& W, const int8_t* tq, const uint8_t* tm, size_t gstride,
                      const float* lut_scale, const float* xsum, int n, int rb0, int rb1, float* y, size_t ldy) {
  float* ybuf = (float*)_mm_malloc(sizeof(float) * 16 * (size_t)n, 64);
  gemm_fn(W.bits, W.g)(W, tq, tm, gstride, lut_scale, xsum, n, rb0, rb1, y, ldy, ybuf);
  _mm_free(ybuf);
}

// Tables: one zmm holds the 16 signed entries of one run, ((±x0 ± x1) ± x2) ± x3 with the signs
// applied by xor (matching the scalar reference bit for bit), then quantized with the group's
// max |U| (see lut_scalar.cpp).
void build_tables_avx512(const float* x, int in, int g, int ng, int8_t* tq, uint8_t* tm, size_t gstride,
                         float* lut_scale, float* xsum) {
  // sign bit set in the entries m whose bit t is 0
  const __m512 sgn = _mm512_set1_ps(-0.0f), zero = _mm512_setzero_ps();
  const __m512 neg0 = _mm512_mask_mov_ps(sgn, 0xAAAA, zero), neg1 = _mm512_mask_mov_ps(sgn, 0xCCCC, zero);
  const __m512 neg2 = _mm512_mask_mov_ps(sgn, 0xF0F0, zero), neg3 = _mm512_mask_mov_ps(sgn, 0xFF00, zero);
  __m512 t[32];
  float peak[32];
  alignas(64) float xg[128];
  for (int G = 0; G < ng; ++G) {
    const int c0 = G * g;
    const int nreal = in - c0 < g ? in - c0 : g;
    const float* xp = x + c0;
    if (nreal < g) {  // short last group: zero-pad
      for (int c = 0; c < g; ++c) xg[c] = c < nreal ? xp[c] : 0.0f;
      xp = xg;
    }
    float m = 0.0f;
    float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // Σx in the canonical order (lut_scalar.cpp)
    for (int k = 0; k < g / 4; ++k) {
      const float* x4 = xp + 4 * k;
      part[k & 3] += (x4[0] + x4[1]) + (x4[2] + x4[3]);
      __m512 v = xor_ps(_mm512_set1_ps(x4[0]), neg0);
      v = _mm512_add_ps(v, xor_ps(_mm512_set1_ps(x4[1]), neg1));
      v = _mm512_add_ps(v, xor_ps(_mm512_set1_ps(x4[2]), neg2));
      v = _mm512_add_ps(v, xor_ps(_mm512_set1_ps(x4[3]), neg3));
      t[k] = v;
      peak[k] = run_peak(x4);
      m = m > peak[k] ? m : peak[k];
    }
    const float inv = m > 0.0f ? 127.0f / m : 0.0f;
    int8_t* q = tq + (size_t)G * gstride;
    uint8_t* mult = tm + (size_t)G * gstride / 16;
    for (int k = 0; k < g / 4; ++k) {
      const int e = run_exponent(peak[k], m);
      const __m512 inv_k = _mm512_set1_ps(inv * (float)(1 << e));
      const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(t[k], inv_k));  // round to nearest even
      _mm_storeu_si128((__m128i*)(q + 16 * k), _mm512_cvtsepi32_epi8(qi));
      mult[k] = (uint8_t)(8 >> e);
    }
    lut_scale[G] = m / 2032.0f;
    xsum[G] = (part[0] + part[1]) + (part[2] + part[3]);
  }
}

// Dense fp16 rows (lut.h): 4 rows at a time share each load of X; vcvtph2ps widens the weights.
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
