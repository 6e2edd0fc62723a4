// The int8 prefill GEMM on AVX-512 VNNI (gemm_i8.h: math and layouts; gemm_i8.cpp: the scalar reference,
// which this equals bit for bit).  Per row block: decode the weights into a u8 panel (L1/L2-resident),
// then sweep every column of the call, kNC columns per pass sharing each 64-byte weight load.
//
// Decoding a k-step (64 weights, 16 rows × 4 columns): a plane's chunk holds bit t of column 4j + t of
// row m at bit 4h + t of byte 4m + j, so one 16-bit shift and one masked OR per plane put the code's
// bit i at bit i + 3 of a lookup index (no bit crosses into that position from the neighbouring byte:
// |ht − i − 3| stays clear of it), with m & 7 preset in each byte; two 128-byte vpermi2b lookups
// (rows 0-7, 8-15) and a blend then give u = q + 128 of each weight.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "gemm_i8.h"
#include "lut_driver.h"
#include "simd_x86.h"

namespace elutq {

namespace {

constexpr int kNC = 8;  // columns per pass: 8 int32 + 8 float accumulators

// acc += w (u8) · k-step s of x (4 s8 bytes, broadcast), as one vpdpbusd with an embedded broadcast.
// (Inline asm: GCC copied every accumulator in and out of a spare register around each intrinsic
// call, three instructions per multiply-add.)
inline __m512i dp(__m512i acc, __m512i w, const int8_t* x, int s) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*(const int32_t*)(x + 4 * s)));
  return acc;
}

// Activation group ag's contribution to column c (d, md: its weight group's Δ and mid):
// Δ·σ·(Σ u·xq − 128·Σxq) + mid·Σx.
inline __m512 scale_group(__m512i acc, const I8Acts& A, int c, int ag, __m512 d, __m512 md, __m512 y) {
  const size_t cg = (size_t)c * A.ng + ag;
  const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, _mm512_set1_epi32(A.cq[cg])));
  y = _mm512_fmadd_ps(f, _mm512_mul_ps(d, _mm512_set1_ps(A.sx[cg])), y);
  return _mm512_fmadd_ps(md, _mm512_set1_ps(A.xs[cg]), y);
}

// kNC columns c0.. of one row block, each 64-byte weight load serving all of them.
inline void columns8(const uint8_t* panel, const I8Acts& A, int c0, int per, const float* dm, const float* mid,
                     __m512* y) {
  const int8_t* x0 = A.xq + (size_t)c0 * A.in_pad;
  const int8_t *x1 = x0 + A.in_pad, *x2 = x1 + A.in_pad, *x3 = x2 + A.in_pad, *x4 = x3 + A.in_pad;
  const int8_t *x5 = x4 + A.in_pad, *x6 = x5 + A.in_pad, *x7 = x6 + A.in_pad;
  for (int c = 0; c < kNC; ++c) y[c] = _mm512_setzero_ps();
  for (int ag = 0; ag < A.ng; ++ag) {  // activation groups (kActGroup columns); weight group ag / per
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int s = ag * kActSteps; s < (ag + 1) * kActSteps; ++s) {
      const __m512i w = _mm512_load_si512((const void*)(panel + (size_t)s * 64));
      a0 = dp(a0, w, x0, s);
      a1 = dp(a1, w, x1, s);
      a2 = dp(a2, w, x2, s);
      a3 = dp(a3, w, x3, s);
      a4 = dp(a4, w, x4, s);
      a5 = dp(a5, w, x5, s);
      a6 = dp(a6, w, x6, s);
      a7 = dp(a7, w, x7, s);
    }
    const int G = ag / per;
    const __m512 d = _mm512_load_ps(dm + 16 * G), md = _mm512_load_ps(mid + 16 * G);
    y[0] = scale_group(a0, A, c0, ag, d, md, y[0]);
    y[1] = scale_group(a1, A, c0 + 1, ag, d, md, y[1]);
    y[2] = scale_group(a2, A, c0 + 2, ag, d, md, y[2]);
    y[3] = scale_group(a3, A, c0 + 3, ag, d, md, y[3]);
    y[4] = scale_group(a4, A, c0 + 4, ag, d, md, y[4]);
    y[5] = scale_group(a5, A, c0 + 5, ag, d, md, y[5]);
    y[6] = scale_group(a6, A, c0 + 6, ag, d, md, y[6]);
    y[7] = scale_group(a7, A, c0 + 7, ag, d, md, y[7]);
  }
}

inline void column1(const uint8_t* panel, const I8Acts& A, int c, int per, const float* dm, const float* mid,
                    __m512* y) {
  const int8_t* x = A.xq + (size_t)c * A.in_pad;
  *y = _mm512_setzero_ps();
  for (int ag = 0; ag < A.ng; ++ag) {
    __m512i a = _mm512_setzero_si512();
    for (int s = ag * kActSteps; s < (ag + 1) * kActSteps; ++s)
      a = dp(a, _mm512_load_si512((const void*)(panel + (size_t)s * 64)), x, s);
    const int G = ag / per;
    *y = scale_group(a, A, c, ag, _mm512_load_ps(dm + 16 * G), _mm512_load_ps(mid + 16 * G), *y);
  }
}

// i8_group_levels for the 16 rows at once (lanes = rows), the same float operations in the same order, so
// the same bytes; written as the two 128-byte lookup tables of rows 0-7 (ta) and 8-15 (tb), byte
// 8·code + (row & 7) (a lookup's index is then the code's bits moved up by 3, plus the row).
inline void group_tables(const uint16_t* sp, int bits, uint8_t* ta, uint8_t* tb, float* dm, float* mid) {
  __m512 s[4], lv[16];
  for (int i = 0; i < bits; ++i) s[i] = load_h16(sp + 16 * i);
  const __m512 z = load_h16(sp + 16 * bits);
  __m512 lo = z, hi = z;
  for (int c = 0; c < (1 << bits); ++c) {
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < bits; ++i)
      if (c >> i & 1) acc = _mm512_add_ps(acc, s[i]);
    lv[c] = _mm512_add_ps(z, acc);
    lo = _mm512_min_ps(lo, lv[c]);
    hi = _mm512_max_ps(hi, lv[c]);
  }
  const __m512 d = _mm512_div_ps(_mm512_sub_ps(hi, lo), _mm512_set1_ps(254.0f));
  const __m512 inv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_GT_OQ), _mm512_set1_ps(1.0f), d);
  const __m512 md = _mm512_mul_ps(_mm512_set1_ps(0.5f), _mm512_add_ps(lo, hi));
  _mm512_store_ps(dm, d);
  _mm512_store_ps(mid, md);
  for (int c = 0; c < (1 << bits); ++c) {
    __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(lv[c], md), inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(_mm512_max_ps(q, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
    const __m128i u = _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(q), _mm512_set1_epi32(128)));
    _mm_storel_epi64((__m128i*)(ta + 8 * c), u);
    _mm_storel_epi64((__m128i*)(tb + 8 * c), _mm_unpackhi_epi64(u, u));
  }
}

}  // namespace

void i8_rows_avx512(const LutWeight& W, const I8Acts& A, int rb0, int rb1, float* y, size_t ldy) {
  const int ng = W.ng, nl = W.g / 32, steps = W.g / 4, bits = W.bits;
  thread_local AlignedBuf panel_buf, f_buf;  // the panel; Δ and mid of each group, [ng][16] each
  panel_buf.resize((size_t)A.in_pad * 16, false);
  f_buf.resize(sizeof(float) * 32 * (size_t)ng, false);
  uint8_t* panel = (uint8_t*)panel_buf.p;
  float* dm = (float*)f_buf.p;
  float* mid = dm + 16 * (size_t)ng;
  alignas(64) uint8_t tab[256] = {0};  // rows 0-7, then rows 8-15 (group_tables)
  alignas(64) int8_t rowoff_b[64];
  for (int p = 0; p < 64; ++p) rowoff_b[p] = (int8_t)((p / 4) & 7);
  const __m512i rowoff = _mm512_load_si512((const void*)rowoff_b);
  const __mmask64 upper = 0xFFFFFFFF00000000ULL;  // bytes of rows 8-15
  for (int rb = rb0; rb < rb1; ++rb) {
    const uint8_t* wp = W.w + (size_t)rb * W.w_bytes_per_rb();
    const uint16_t* sp = W.sz + (size_t)rb * W.sz_elems_per_rb();
    for (int G = 0; G < ng; ++G) {
      group_tables(sp + (size_t)G * (bits + 1) * 16, bits, tab, tab + 128, dm + 16 * G, mid + 16 * G);
      const __m512i ta0 = _mm512_load_si512((const void*)tab), ta1 = _mm512_load_si512((const void*)(tab + 64));
      const __m512i tb0 = _mm512_load_si512((const void*)(tab + 128)), tb1 = _mm512_load_si512((const void*)(tab + 192));
      for (int L = 0; L < nl; ++L) {
        __m512i v[4];
        for (int i = 0; i < bits; ++i) v[i] = _mm512_loadu_si512((const void*)(wp + ((size_t)(G * bits + i) * nl + L) * 64));
        for (int ht = 0; ht < 8; ++ht) {  // h = ht / 4, t = ht % 4: bit ht of each byte
          __m512i idx = rowoff;
          for (int i = 0; i < bits; ++i) {  // bit ht of plane i's byte → bit i + 3 of the index
            const int sh = ht - i - 3;
            const __m512i b = sh >= 0 ? _mm512_srl_epi16(v[i], _mm_cvtsi32_si128(sh))
                                      : _mm512_sll_epi16(v[i], _mm_cvtsi32_si128(-sh));
            idx = _mm512_ternarylogic_epi32(idx, b, _mm512_set1_epi8((char)(8 << i)), 0xF8);  // idx | (b & bit)
          }
          const __m512i lo = _mm512_permutex2var_epi8(ta0, idx, ta1), hi = _mm512_permutex2var_epi8(tb0, idx, tb1);
          _mm512_store_si512((void*)(panel + (size_t)(G * steps + 8 * L + ht) * 64), _mm512_mask_blend_epi8(upper, lo, hi));
        }
      }
    }
    const int rows = std::min(16, W.out - 16 * rb);
    const __mmask16 keep = (__mmask16)((1u << rows) - 1);
    __m512 yacc[kNC];
    int c = 0;
    for (; c + kNC <= A.n; c += kNC) {
      columns8(panel, A, c, W.g / kActGroup, dm, mid, yacc);
      for (int k = 0; k < kNC; ++k) _mm512_mask_storeu_ps(y + (size_t)(c + k) * ldy + 16 * rb, keep, yacc[k]);
    }
    for (; c < A.n; ++c) {
      column1(panel, A, c, W.g / kActGroup, dm, mid, yacc);
      _mm512_mask_storeu_ps(y + (size_t)c * ldy + 16 * rb, keep, yacc[0]);
    }
  }
}

}  // namespace elutq
