// AVX2 (+FMA, F16C) LUT kernels.  Compiled with per-file target flags (see CMakeLists.txt) and
// only called after run-time CPU detection.  Scalar reference: lut_scalar.cpp.
//
// Shapes and layouts: see lut.h.  vpshufb has one 16-entry table per 128-bit lane, while byte
// p = 4m + j of a 64-byte chunk (16 rows × 8 runs, one plane) needs table T[k0 + j] (low nibble)
// or T[k0 + 4 + j] (high nibble).  So each chunk is first transposed so that one lane holds the 16
// rows' bytes of one j (in row order):
//   vpshufb (4×4 byte transpose per lane) → vpermd → vpunpck{l,h}qdq:  A = [j0 | j1], B = [j2 | j3]
// A matrix loaded for this path is stored in the AVX2 order (lut.h), which is A and B already:
// two plain loads, no transposition (ORDER = true below; false reads the standard order).
// Then one vpshufb per ymm looks up 32 entries, with the tables as plain 32-byte loads
// ([T[k0] | T[k0+1]], [T[k0+2] | T[k0+3]], and +64 bytes for the high nibbles).  vpunpck{l,h}bw
// of the A and B results pairs j0 with j2 (lane 0) and j1 with j3 (lane 1) for the same row, and
// vpmaddubsw with the pair's run multipliers (lut.h: 1..127; [m0, m2] in lane 0, [m1, m3] in lane 1)
// adds each pair into int16, accumulated per group; the two lanes are added once per plane and
// group, still in int16: |sum| ≤ 127·Σ_k mult_k ≤ 127·8·g/4 ≤ 32512 for g ≤ 128 (lut.h: group_mults
// keeps Σ mult_k within 8 per run), so nothing overflows.  Residual tables (LutTables::tr, same
// bound) are looked up with the same indices into their own accumulators, added at 1/254 per group.
//
// Only intrinsics and plain functions live here (no std templates).
#include <immintrin.h>

#include <cstring>

#include "lut.h"
#include "simd_x86.h"

namespace elutq {

namespace {

struct Consts {
  __m256i nib, tr_bytes, tr_dwords, mult_lo, mult_hi;
};

inline Consts make_consts() {
  Consts c;
  c.nib = _mm256_set1_epi8(0x0F);
  // run multipliers of a chunk (8 bytes mult[k0..k0+7]) in the byte order of the vpmaddubsw pairs
  c.mult_lo = _mm256_setr_epi8(0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2,  //
                               1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3);
  c.mult_hi = _mm256_setr_epi8(4, 6, 4, 6, 4, 6, 4, 6, 4, 6, 4, 6, 4, 6, 4, 6,  //
                               5, 7, 5, 7, 5, 7, 5, 7, 5, 7, 5, 7, 5, 7, 5, 7);
  // in-lane 4×4 byte transpose: position 4j + m takes byte 4m + j
  c.tr_bytes = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,  //
                                0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  // [L0.d0 L1.d0 L0.d2 L1.d2 | L0.d1 L1.d1 L0.d3 L1.d3] (d_j: 4 rows of one j, L: source lane)
  c.tr_dwords = _mm256_setr_epi32(0, 4, 2, 6, 1, 5, 3, 7);
  return c;
}

// The 4 index vectors of one chunk: idx[0] = low nibbles of lanes j0 | j1, idx[1] = low nibbles of
// j2 | j3, idx[2], idx[3] = the high nibbles (bytes = rows 0..15 in order).
template <bool ORDER>
inline void chunk_indices(const uint8_t* wp, const Consts& c, __m256i* idx) {
  if (ORDER) {
    const __m256i a = _mm256_loadu_si256((const __m256i*)wp), b = _mm256_loadu_si256((const __m256i*)(wp + 32));
    idx[0] = _mm256_and_si256(a, c.nib);
    idx[1] = _mm256_and_si256(b, c.nib);
    idx[2] = _mm256_and_si256(_mm256_srli_epi16(a, 4), c.nib);
    idx[3] = _mm256_and_si256(_mm256_srli_epi16(b, 4), c.nib);
    return;
  }
  const __m256i y0 = _mm256_permutevar8x32_epi32(
      _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i*)wp), c.tr_bytes), c.tr_dwords);
  const __m256i y1 = _mm256_permutevar8x32_epi32(
      _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i*)(wp + 32)), c.tr_bytes), c.tr_dwords);
  const __m256i a = _mm256_unpacklo_epi64(y0, y1);  // lanes j0 | j1, bytes = rows 0..15
  const __m256i b = _mm256_unpackhi_epi64(y0, y1);  // lanes j2 | j3
  idx[0] = _mm256_and_si256(a, c.nib);
  idx[1] = _mm256_and_si256(b, c.nib);
  idx[2] = _mm256_and_si256(_mm256_srli_epi16(a, 4), c.nib);
  idx[3] = _mm256_and_si256(_mm256_srli_epi16(b, 4), c.nib);
}

// The multiplier vectors of one chunk (low-nibble runs k0..k0+3, high-nibble runs k0+4..k0+7).
inline void chunk_mults(const uint8_t* m, const Consts& c, __m256i& mlo, __m256i& mhi) {
  long long v;
  std::memcpy(&v, m, 8);
  const __m256i b = _mm256_set1_epi64x(v);
  mlo = _mm256_shuffle_epi8(b, c.mult_lo);
  mhi = _mm256_shuffle_epi8(b, c.mult_hi);
}

// int16 per-row partial sums of one chunk: r07 (rows 0–7) and r815 (rows 8–15), lane 0 holding
// j = 0, 2 and lane 1 j = 1, 3 (for both nibbles).  t: the chunk's 128 table bytes.
inline void chunk_lookup(const __m256i* idx, const int8_t* t, __m256i mlo, __m256i mhi, __m256i& r07,
                         __m256i& r815) {
  const __m256i alo = idx[0], blo = idx[1], ahi = idx[2], bhi = idx[3];
  const __m256i sa = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i*)t), alo);
  const __m256i sb = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i*)(t + 32)), blo);
  const __m256i ha = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i*)(t + 64)), ahi);
  const __m256i hb = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i*)(t + 96)), bhi);
  r07 = _mm256_add_epi16(_mm256_maddubs_epi16(mlo, _mm256_unpacklo_epi8(sa, sb)),
                         _mm256_maddubs_epi16(mhi, _mm256_unpacklo_epi8(ha, hb)));
  r815 = _mm256_add_epi16(_mm256_maddubs_epi16(mlo, _mm256_unpackhi_epi8(sa, sb)),
                          _mm256_maddubs_epi16(mhi, _mm256_unpackhi_epi8(ha, hb)));
}

// Lanes of an int16 accumulator added → 8 int32 (one per row).
inline __m256i lanes_to_i32(__m256i a) {
  return _mm256_cvtepi16_epi32(_mm_add_epi16(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1)));
}

// RES: also the residual tables T.tr at the same indices (lut.h), summed apart and added at 1/254.
template <int BITS, int NL, bool ORDER, bool RES>
void gemv_t(const LutWeight& W, const LutTables& T, int rb0, int rb1, float* y) {
  const Consts c = make_consts();
  for (int rb = rb0; rb < rb1; ++rb) {
    const uint8_t* wp = W.w + (size_t)rb * W.w_bytes_per_rb();
    const uint16_t* sp = W.sz + (size_t)rb * W.sz_elems_per_rb();
    __m256 y0 = _mm256_setzero_ps(), y1 = _mm256_setzero_ps();
    for (int G = 0; G < W.ng; ++G) {
      const int8_t* tg = T.tq + (size_t)G * T.gstride;
      const int8_t* rg = RES ? T.tr + (size_t)G * T.gstride : nullptr;
      __m256i mlo[NL], mhi[NL];
      for (int L = 0; L < NL; ++L) chunk_mults(T.tm + (size_t)G * T.gstride / 16 + 8 * L, c, mlo[L], mhi[L]);
      __m256 f0 = _mm256_setzero_ps(), f1 = _mm256_setzero_ps(), q0 = _mm256_setzero_ps(), q1 = q0;
      __m256 e0 = _mm256_setzero_ps(), e1 = _mm256_setzero_ps();
      for (int i = 0; i < BITS; ++i) {
        __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256(), b0 = a0, b1 = a0;
        for (int L = 0; L < NL; ++L, wp += kChunkBytes) {
          __m256i r07, r815, idx[4];
          if (g_prefetch_bytes) _mm_prefetch((const char*)wp + g_prefetch_bytes, _MM_HINT_T1);
          chunk_indices<ORDER>(wp, c, idx);
          chunk_lookup(idx, tg + 128 * L, mlo[L], mhi[L], r07, r815);
          a0 = _mm256_add_epi16(a0, r07);
          a1 = _mm256_add_epi16(a1, r815);
          if constexpr (RES) {
            chunk_lookup(idx, rg + 128 * L, mlo[L], mhi[L], r07, r815);
            b0 = _mm256_add_epi16(b0, r07);
            b1 = _mm256_add_epi16(b1, r815);
          }
        }
        const __m256 s0 = load_h8(sp + 16 * i), s1 = load_h8(sp + 16 * i + 8);
        q0 = _mm256_add_ps(q0, s0);
        q1 = _mm256_add_ps(q1, s1);
        f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes_to_i32(a0)), s0, f0);
        f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes_to_i32(a1)), s1, f1);
        if constexpr (RES) {
          e0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes_to_i32(b0)), s0, e0);
          e1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes_to_i32(b1)), s1, e1);
        }
      }
      if constexpr (RES) {  // the residual grid
        f0 = _mm256_fmadd_ps(e0, _mm256_set1_ps(1.0f / 254.0f), f0);
        f1 = _mm256_fmadd_ps(e1, _mm256_set1_ps(1.0f / 254.0f), f1);
      }
      const __m256 ls = _mm256_set1_ps(T.lut_scale[G]), xs = _mm256_set1_ps(T.xsum[G]);
      y0 = _mm256_fmadd_ps(f0, ls, y0);
      y1 = _mm256_fmadd_ps(f1, ls, y1);
      const __m256 half = _mm256_set1_ps(0.5f);  // y += (z + Σ_i s_i / 2)·Σx
      y0 = _mm256_fmadd_ps(_mm256_fmadd_ps(q0, half, load_h8(sp + 16 * BITS)), xs, y0);
      y1 = _mm256_fmadd_ps(_mm256_fmadd_ps(q1, half, load_h8(sp + 16 * BITS + 8)), xs, y1);
      sp += (BITS + 1) * 16;
    }
    const int r0 = rb * kRowBlock;
    if (W.out - r0 >= kRowBlock) {
      _mm256_storeu_ps(y + r0, y0);
      _mm256_storeu_ps(y + r0 + 8, y1);
    } else {
      float tmp[16];
      _mm256_storeu_ps(tmp, y0);
      _mm256_storeu_ps(tmp + 8, y1);
      for (int m = 0; m < W.out - r0; ++m) y[r0 + m] = tmp[m];
    }
  }
}

// GEMM: per (row block, group) the transposed indices of all planes are computed once and reused
// for every column (same arithmetic, in the same order, as gemv_t for each column).
template <int BITS, int NL, bool ORDER, bool RES>
void gemm_t(const LutWeight& W, const int8_t* tq, const int8_t* tr, const uint8_t* tm, size_t gstride,
            const float* lut_scale, const float* xsum, int n, int rb0, int rb1, float* y, size_t ldy,
            float* ybuf /* [n][16] */) {
  constexpr int G4 = NL * 128;
  const Consts c = make_consts();
  alignas(32) __m256i idx[BITS][NL][4];
  const int ng = W.ng;
  const __m256 half = _mm256_set1_ps(0.5f);
  for (int rb = rb0; rb < rb1; ++rb) {
    const uint8_t* wp = W.w + (size_t)rb * W.w_bytes_per_rb();
    const uint16_t* sp = W.sz + (size_t)rb * W.sz_elems_per_rb();
    for (int k = 0; k < 2 * n; ++k) _mm256_store_ps(ybuf + 8 * k, _mm256_setzero_ps());
    for (int G = 0; G < ng; ++G) {
      for (int i = 0; i < BITS; ++i)
        for (int L = 0; L < NL; ++L) chunk_indices<ORDER>(wp + (i * NL + L) * kChunkBytes, c, idx[i][L]);
      __m256 s0[BITS], s1[BITS], q0 = _mm256_setzero_ps(), q1 = q0;
      for (int i = 0; i < BITS; ++i) {
        s0[i] = load_h8(sp + 16 * i);
        s1[i] = load_h8(sp + 16 * i + 8);
        q0 = _mm256_add_ps(q0, s0[i]);
        q1 = _mm256_add_ps(q1, s1[i]);
      }
      const __m256 z0 = _mm256_fmadd_ps(q0, half, load_h8(sp + 16 * BITS));  // z + Σs/2
      const __m256 z1 = _mm256_fmadd_ps(q1, half, load_h8(sp + 16 * BITS + 8));
      const int8_t* tg = tq + (size_t)G * gstride;
      const int8_t* rg = RES ? tr + (size_t)G * gstride : nullptr;
      const uint8_t* mg = tm + (size_t)G * gstride / 16;
      for (int col = 0; col < n; ++col, tg += G4, rg += RES ? G4 : 0, mg += G4 / 16) {
        __m256i mlo[NL], mhi[NL];
        for (int L = 0; L < NL; ++L) chunk_mults(mg + 8 * L, c, mlo[L], mhi[L]);
        __m256 f0 = _mm256_setzero_ps(), f1 = _mm256_setzero_ps(), e0 = f0, e1 = f0;
        for (int i = 0; i < BITS; ++i) {
          __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256(), b0 = a0, b1 = a0;
          for (int L = 0; L < NL; ++L) {
            __m256i r07, r815;
            chunk_lookup(idx[i][L], tg + 128 * L, mlo[L], mhi[L], r07, r815);
            a0 = _mm256_add_epi16(a0, r07);
            a1 = _mm256_add_epi16(a1, r815);
            if constexpr (RES) {
              chunk_lookup(idx[i][L], rg + 128 * L, mlo[L], mhi[L], r07, r815);
              b0 = _mm256_add_epi16(b0, r07);
              b1 = _mm256_add_epi16(b1, r815);
            }
          }
          f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes_to_i32(a0)), s0[i], f0);
          f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes_to_i32(a1)), s1[i], f1);
          if constexpr (RES) {
            e0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes_to_i32(b0)), s0[i], e0);
            e1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes_to_i32(b1)), s1[i], e1);
          }
        }
        if constexpr (RES) {
          f0 = _mm256_fmadd_ps(e0, _mm256_set1_ps(1.0f / 254.0f), f0);
          f1 = _mm256_fmadd_ps(e1, _mm256_set1_ps(1.0f / 254.0f), f1);
        }
        const __m256 ls = _mm256_set1_ps(lut_scale[(size_t)col * ng + G]);
        const __m256 xs = _mm256_set1_ps(xsum[(size_t)col * ng + G]);
        float* yb = ybuf + 16 * col;
        __m256 y0 = _mm256_load_ps(yb), y1 = _mm256_load_ps(yb + 8);
        y0 = _mm256_fmadd_ps(f0, ls, y0);
        y1 = _mm256_fmadd_ps(f1, ls, y1);
        y0 = _mm256_fmadd_ps(z0, xs, y0);
        y1 = _mm256_fmadd_ps(z1, xs, y1);
        _mm256_store_ps(yb, y0);
        _mm256_store_ps(yb + 8, y1);
      }
      wp += BITS * NL * kChunkBytes;
      sp += (BITS + 1) * 16;
    }
    const int r0 = rb * kRowBlock;
    const int nr = W.out - r0 < kRowBlock ? W.out - r0 : kRowBlock;
    for (int col = 0; col < n; ++col)
      for (int m = 0; m < nr; ++m) y[col * ldy + r0 + m] = ybuf[16 * col + m];
  }
}

using GemvFn = void (*)(const LutWeight&, const LutTables&, int, int, float*);
using GemmFn = void (*)(const LutWeight&, const int8_t*, const int8_t*, const uint8_t*, size_t, const float*,
                        const float*, int, int, int, float*, size_t, float*);

template <int BITS, bool ORDER, bool RES>
GemvFn pick_nl(int nl) {
  return nl == 1 ? gemv_t<BITS, 1, ORDER, RES> : nl == 2 ? gemv_t<BITS, 2, ORDER, RES> : gemv_t<BITS, 4, ORDER, RES>;
}
template <int BITS, bool ORDER, bool RES>
GemmFn pick_gemm_nl(int nl) {
  return nl == 1 ? gemm_t<BITS, 1, ORDER, RES> : nl == 2 ? gemm_t<BITS, 2, ORDER, RES> : gemm_t<BITS, 4, ORDER, RES>;
}
template <int BITS, bool RES>
GemvFn pick(int nl, bool order) {
  return order ? pick_nl<BITS, true, RES>(nl) : pick_nl<BITS, false, RES>(nl);
}
template <int BITS, bool RES>
GemmFn pick_gemm(int nl, bool order) {
  return order ? pick_gemm_nl<BITS, true, RES>(nl) : pick_gemm_nl<BITS, false, RES>(nl);
}
template <bool RES>
GemvFn gemv_fn(int bits, int nl, bool o) {
  return bits == 1 ? pick<1, RES>(nl, o) : bits == 2 ? pick<2, RES>(nl, o) : bits == 3 ? pick<3, RES>(nl, o)
                                                                                       : pick<4, RES>(nl, o);
}
template <bool RES>
GemmFn gemm_fn(int bits, int nl, bool o) {
  return bits == 1   ? pick_gemm<1, RES>(nl, o)
         : bits == 2 ? pick_gemm<2, RES>(nl, o)
         : bits == 3 ? pick_gemm<3, RES>(nl, o)
                     : pick_gemm<4, RES>(nl, o);
}

}  // namespace

void gemv_rows_avx2(const LutWeight& W, const LutTables& T, int rb0, int rb1, float* y) {
  const int nl = W.g / 32;
  (T.tr ? gemv_fn<true>(W.bits, nl, W.avx2_order) : gemv_fn<false>(W.bits, nl, W.avx2_order))(W, T, rb0, rb1, y);
}

void gemm_rows_avx2(const LutWeight& W, const int8_t* tq, const uint8_t* tm, size_t gstride, const float* lut_scale,
                    const float* xsum, int n, int rb0, int rb1, float* y, size_t ldy, const int8_t* tr) {
  const int nl = W.g / 32;
  GemmFn f = tr ? gemm_fn<true>(W.bits, nl, W.avx2_order) : gemm_fn<false>(W.bits, nl, W.avx2_order);
  float* ybuf = (float*)_mm_malloc(sizeof(float) * 16 * (size_t)n, 32);
  f(W, tq, tr, tm, gstride, lut_scale, xsum, n, rb0, rb1, y, ldy, ybuf);
  _mm_free(ybuf);
}

// Tables: each run's 16 signed entries as two ymm (entries 0–7, 8–15), built in the scalar order
// ((±x0 ± x1) ± x2) ± x3 with signs applied by xor.
void build_tables_avx2(const float* x, int in, int g, int ng, int8_t* tq, uint8_t* tm, size_t gstride,
                       float* lut_scale, float* xsum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  // sign bit where bit t of entry m (m = 0–7) is 0; bit 3 is 0 in entries 0–7, 1 in 8–15
  const int S = (int)0x80000000u;
  const __m256 n0 = _mm256_castsi256_ps(_mm256_setr_epi32(S, 0, S, 0, S, 0, S, 0));
  const __m256 n1 = _mm256_castsi256_ps(_mm256_setr_epi32(S, S, 0, 0, S, S, 0, 0));
  const __m256 n2 = _mm256_castsi256_ps(_mm256_setr_epi32(S, S, S, S, 0, 0, 0, 0));
  __m256 t[64];
  float peak[32];
  alignas(32) float xg[128];
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
      __m256 v = _mm256_xor_ps(_mm256_set1_ps(x4[0]), n0);
      v = _mm256_add_ps(v, _mm256_xor_ps(_mm256_set1_ps(x4[1]), n1));
      v = _mm256_add_ps(v, _mm256_xor_ps(_mm256_set1_ps(x4[2]), n2));
      const __m256 x3 = _mm256_set1_ps(x4[3]);
      const __m256 w = _mm256_add_ps(v, x3);                   // entries 8–15
      v = _mm256_add_ps(v, _mm256_xor_ps(x3, sign));           // entries 0–7
      t[2 * k] = v;
      t[2 * k + 1] = w;
      peak[k] = run_peak(x4);
      m = m > peak[k] ? m : peak[k];
    }
    int8_t* q = tq + (size_t)G * gstride;
    uint8_t* mult = tm + (size_t)G * gstride / 16;
    const int B = group_mults(peak, g / 4, m, mult);
    const float c = m > 0.0f ? 127.0f * (float)B / m : 0.0f;
    for (int k = 0; k < g / 4; ++k) {
      const __m256 inv = _mm256_set1_ps(c / (float)mult[k]);
      const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(t[2 * k], inv));
      const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(t[2 * k + 1], inv));
      const __m256i p16 = _mm256_packs_epi32(a, b);  // lanes: a0-3 b0-3 | a4-7 b4-7
      const __m128i p8 = _mm_packs_epi16(_mm256_castsi256_si128(p16), _mm256_extracti128_si256(p16, 1));
      // p8 = a0-3 b0-3 a4-7 b4-7 → reorder to a0-7 b0-7
      _mm_storeu_si128((__m128i*)(q + 16 * k), _mm_shuffle_epi32(p8, _MM_SHUFFLE(3, 1, 2, 0)));
    }
    lut_scale[G] = m / (254.0f * (float)B);
    xsum[G] = (part[0] + part[1]) + (part[2] + part[3]);
  }
}

}  // namespace elutq
