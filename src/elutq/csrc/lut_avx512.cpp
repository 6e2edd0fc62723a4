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
// vcvtph2ps (signed tables, see lut.h).  With residual tables (LutTables::tr) the same lo/hi indices
// also go through vpermb + vpdpbusd on them, into their own accumulators: acc_i + racc_i/254 above.
//
// Only intrinsics and plain functions live here (no std templates), so no AVX-512 code can leak
// into inline functions shared with baseline translation units.
#include <immintrin.h>

#include <cstring>

#include "lut.h"
#include "simd_x86.h"

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

// Sum of one plane over one group for 16 rows: NL chunks of 64 bytes; t: the group's tables (low-nibble
// and high-nibble halves per chunk) and m: the chunks' multipliers, both loaded once per group and
// shared by every plane.  RES: also the residual tables' lookups at the same indices (tr: the group's
// residual tables, read from L1 as memory operands), summed into racc.
template <int NL, bool RES>
inline __m512i plane_group(const uint8_t* wp, const __m512i (*t)[2], const __m512i (*m)[2], const int8_t* tr, int pf,
                           __m512i* racc) {
  const __m512i mask = _mm512_set1_epi8(0x0F);
  const __m512i pat = chunk_pattern();
  __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
  __m512i res0 = _mm512_setzero_si512(), res1 = _mm512_setzero_si512();
#pragma GCC unroll 4
  for (int L = 0; L < NL; ++L) {
    const __m512i v = _mm512_loadu_si512((const void*)(wp + 64 * L));
    if (pf) _mm_prefetch((const char*)(wp + 64 * L + pf), _MM_HINT_T1);
    const __m512i lo = _mm512_ternarylogic_epi32(v, mask, pat, 0xEA);  // (v & mask) | pat
    const __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), mask, pat, 0xEA);
    acc0 = _mm512_dpbusd_epi32(acc0, m[L][0], _mm512_permutexvar_epi8(lo, t[L][0]));
    acc1 = _mm512_dpbusd_epi32(acc1, m[L][1], _mm512_permutexvar_epi8(hi, t[L][1]));
    if constexpr (RES) {
      res0 = _mm512_dpbusd_epi32(res0, m[L][0], _mm512_permutexvar_epi8(lo, _mm512_loadu_si512(tr + 128 * L)));
      res1 = _mm512_dpbusd_epi32(res1, m[L][1], _mm512_permutexvar_epi8(hi, _mm512_loadu_si512(tr + 128 * L + 64)));
    }
  }
  if constexpr (RES) *racc = _mm512_add_epi32(res0, res1);
  return _mm512_add_epi32(acc0, acc1);
}

inline __m512 xor_ps(__m512 a, __m512 b) {  // (AVX512DQ's _mm512_xor_ps without needing DQ)
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_castps_si512(b)));
}

inline void store_rows(__m512 v, int rb, int out, float* y) {
  const int r0 = rb * kRowBlock;
  const int n = out - r0 < kRowBlock ? out - r0 : kRowBlock;
  const __mmask16 m = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
  _mm512_mask_storeu_ps(y + r0, m, v);
}

// 16 outputs of each of K row blocks (weights w[k], scales s[k]) for one activation vector, group by
// group: one load of the group's tables and multipliers serves all K blocks, and K weight streams keep
// more lines in flight than one (measurements: docs/KERNELS.md; K = 4 spills registers and is slower).
// Each block's arithmetic is the same for any K and any pairing.
template <int BITS, int NL, bool RES, int K>
inline void row_blocks(const uint8_t* const* w, const uint16_t* const* s, int ng, const int8_t* tq, const uint8_t* tm,
                       size_t gstride, const float* lut_scale, const float* xsum, const int8_t* tr, __m512* y) {
  for (int k = 0; k < K; ++k) y[k] = _mm512_setzero_ps();
  for (int G = 0; G < ng; ++G) {
    const int8_t* tg = tq + (size_t)G * gstride;
    const uint8_t* mg = tm + (size_t)G * gstride / 16;
    __m512i m[NL][2], t[NL][2];
    for (int L = 0; L < NL; ++L) {
      m[L][0] = mult4(mg + 8 * L);
      m[L][1] = mult4(mg + 8 * L + 4);
      t[L][0] = _mm512_loadu_si512((const void*)(tg + 128 * L));
      t[L][1] = _mm512_loadu_si512((const void*)(tg + 128 * L + 64));
    }
    const int8_t* trg = RES ? tr + (size_t)G * gstride : nullptr;
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {
      const uint8_t* wp = w[k] + (size_t)G * BITS * NL * 64;
      const uint16_t* sp = s[k] + (size_t)G * (BITS + 1) * 16;
      __m512 fsum = _mm512_setzero_ps(), rsum = _mm512_setzero_ps(), ssum = _mm512_setzero_ps();
#pragma GCC unroll 4
      for (int i = 0; i < BITS; ++i) {
        __m512i racc;
        const __m512i acc = plane_group<NL, RES>(wp + i * NL * 64, t, m, trg, g_prefetch_bytes, &racc);
        const __m512 sc = load_h16(sp + 16 * i);
        fsum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), sc, fsum);
        if constexpr (RES) rsum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(racc), sc, rsum);
        ssum = _mm512_add_ps(ssum, sc);
      }
      if constexpr (RES) fsum = _mm512_fmadd_ps(rsum, _mm512_set1_ps(1.0f / 254.0f), fsum);
      if (g_prefetch_bytes) {
        for (int o = 0; o < (BITS + 1) * 32; o += 64)
          _mm_prefetch((const char*)sp + g_prefetch_bytes / 4 + o, _MM_HINT_T1);
      }
      const __m512 zz = _mm512_fmadd_ps(ssum, _mm512_set1_ps(0.5f), load_h16(sp + 16 * BITS));
      const __m512 yacc = _mm512_fmadd_ps(fsum, _mm512_set1_ps(lut_scale[G]), y[k]);
      y[k] = _mm512_fmadd_ps(zz, _mm512_set1_ps(xsum[G]), yacc);
    }
  }
}

// Row blocks ra[k] + i of Ws[k] (k < K, i < count) into ys[k].
template <int BITS, int NL, bool RES, int K>
inline void gemv_k(const LutWeight* const* Ws, const int* ra, float* const* ys, int count, const LutTables& T) {
  for (int i = 0; i < count; ++i) {
    const uint8_t* w[K];
    const uint16_t* s[K];
    for (int k = 0; k < K; ++k) {
      w[k] = Ws[k]->w + (size_t)(ra[k] + i) * Ws[k]->w_bytes_per_rb();
      s[k] = Ws[k]->sz + (size_t)(ra[k] + i) * Ws[k]->sz_elems_per_rb();
    }
    __m512 yk[K];
    row_blocks<BITS, NL, RES, K>(w, s, Ws[0]->ng, T.tq, T.tm, T.gstride, T.lut_scale, T.xsum, T.tr, yk);
    for (int k = 0; k < K; ++k) store_rows(yk[k], ra[k] + i, Ws[k]->out, ys[k]);
  }
}

// Two runs of row blocks side by side, row block a0 + i of Wa beside b0 + i of Wb: two continuous
// weight streams at once, at every bit width (two neighbouring blocks at a time, 16 KiB runs jumping
// every pair, streamed slower, and at 3-4 bits no faster than one: docs/KERNELS.md).
template <int BITS, int NL, bool RES>
void gemv_pair_t(const LutWeight& Wa, int a0, float* ya, const LutWeight& Wb, int b0, float* yb, int count,
                 const LutTables& T) {
  const LutWeight* Ws[2] = {&Wa, &Wb};
  const int ra[2] = {a0, b0};
  float* ys[2] = {ya, yb};
  gemv_k<BITS, NL, RES, 2>(Ws, ra, ys, count, T);
}

// Row blocks [rb0, rb1): the two halves side by side, then an odd last block alone.
template <int BITS, int NL, bool RES>
void gemv_t(const LutWeight& W, const LutTables& T, int rb0, int rb1, float* y) {
  const int h = (rb1 - rb0) / 2;
  gemv_pair_t<BITS, NL, RES>(W, rb0, y, W, rb0 + h, y, h, T);
  const LutWeight* Ws[1] = {&W};
  const int ra[1] = {rb0 + 2 * h};
  gemv_k<BITS, NL, RES, 1>(Ws, ra, &y, rb1 - ra[0], T);
}

// GEMM: per (row block, group) the chunk indices of all planes are computed once into an L1
// buffer and reused for every column.  Columns go NC at a time (4 for 1-2 bits, 2 for 3-4): each
// index register loaded from L1 then serves NC columns' lookups, which keeps the loads (indices,
// tables, multipliers) below the permute/dot-product work — with one column at a time the loads
// were the bottleneck.  Each column's group tables (g·4 bytes, contiguous across columns in the
// group-major layout) are read once per group.  The epilogue is the GEMV's, operation for
// operation, so a GEMM column equals the GEMV bit for bit.
template <int BITS, int NL, int NC, bool RES>
inline void gemm_cols(const __m512i (*idx)[NL][2], const __m512* s, __m512 z, const int8_t* tg, const int8_t* rg,
                      const uint8_t* mg, const float* ls, const float* xs, int ng, float* yb) {
  constexpr int G4 = NL * 128;
  __m512i acc[NC][BITS], racc[NC][BITS];
  for (int c = 0; c < NC; ++c)
    for (int i = 0; i < BITS; ++i) acc[c][i] = racc[c][i] = _mm512_setzero_si512();
  for (int L = 0; L < NL; ++L) {
    __m512i t0[NC], t1[NC], r0[NC], r1[NC], m0[NC], m1[NC];
    for (int c = 0; c < NC; ++c) {
      t0[c] = _mm512_loadu_si512((const void*)(tg + c * G4 + 128 * L));
      t1[c] = _mm512_loadu_si512((const void*)(tg + c * G4 + 128 * L + 64));
      if constexpr (RES) {
        r0[c] = _mm512_loadu_si512((const void*)(rg + c * G4 + 128 * L));
        r1[c] = _mm512_loadu_si512((const void*)(rg + c * G4 + 128 * L + 64));
      }
      m0[c] = mult4(mg + c * (G4 / 16) + 8 * L);
      m1[c] = mult4(mg + c * (G4 / 16) + 8 * L + 4);
    }
    for (int i = 0; i < BITS; ++i) {
      const __m512i lo = _mm512_load_si512((const void*)&idx[i][L][0]);
      const __m512i hi = _mm512_load_si512((const void*)&idx[i][L][1]);
      for (int c = 0; c < NC; ++c) {
        acc[c][i] = _mm512_dpbusd_epi32(acc[c][i], m0[c], _mm512_permutexvar_epi8(lo, t0[c]));
        acc[c][i] = _mm512_dpbusd_epi32(acc[c][i], m1[c], _mm512_permutexvar_epi8(hi, t1[c]));
        if constexpr (RES) {
          racc[c][i] = _mm512_dpbusd_epi32(racc[c][i], m0[c], _mm512_permutexvar_epi8(lo, r0[c]));
          racc[c][i] = _mm512_dpbusd_epi32(racc[c][i], m1[c], _mm512_permutexvar_epi8(hi, r1[c]));
        }
      }
    }
  }
  for (int c = 0; c < NC; ++c) {
    __m512 fsum = _mm512_setzero_ps(), rsum = _mm512_setzero_ps();
    for (int i = 0; i < BITS; ++i) {
      fsum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[c][i]), s[i], fsum);
      if constexpr (RES) rsum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(racc[c][i]), s[i], rsum);
    }
    if constexpr (RES) fsum = _mm512_fmadd_ps(rsum, _mm512_set1_ps(1.0f / 254.0f), fsum);
    __m512 yc = _mm512_load_ps(yb + 16 * c);
    yc = _mm512_fmadd_ps(fsum, _mm512_set1_ps(ls[(size_t)c * ng]), yc);
    yc = _mm512_fmadd_ps(z, _mm512_set1_ps(xs[(size_t)c * ng]), yc);
    _mm512_store_ps(yb + 16 * c, yc);
  }
}

template <int BITS, int NL, bool RES>
void gemm_t(const LutWeight& W, const int8_t* tq, const int8_t* tr, const uint8_t* tm, size_t gstride,
            const float* lut_scale, const float* xsum, int n, int rb0, int rb1, float* y, size_t ldy,
            float* ybuf /* [n][16] */) {
  constexpr int G4 = NL * 128;
  // Columns per pass: the residual tables need as many registers again.
  constexpr int NC = RES ? (BITS <= 2 ? 2 : 1) : (BITS <= 2 ? 4 : 2);
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
      const int8_t* rg = RES ? tr + (size_t)G * gstride : nullptr;
      const uint8_t* mg = tm + (size_t)G * gstride / 16;
      const float* ls = lut_scale + G;
      const float* xs = xsum + G;
      int c = 0;
      for (; c + NC <= n; c += NC)
        gemm_cols<BITS, NL, NC, RES>(idx, s, z, tg + (size_t)c * G4, RES ? rg + (size_t)c * G4 : nullptr,
                                     mg + (size_t)c * G4 / 16, ls + (size_t)c * ng, xs + (size_t)c * ng, ng,
                                     ybuf + 16 * c);
      for (; c < n; ++c)
        gemm_cols<BITS, NL, 1, RES>(idx, s, z, tg + (size_t)c * G4, RES ? rg + (size_t)c * G4 : nullptr,
                                    mg + (size_t)c * G4 / 16, ls + (size_t)c * ng, xs + (size_t)c * ng, ng,
                                    ybuf + 16 * c);
      wp += BITS * NL * 64;
      sp += (BITS + 1) * 16;
    }
    for (int c = 0; c < n; ++c) store_rows(_mm512_load_ps(ybuf + 16 * c), rb, W.out, y + c * ldy);
  }
}

using GemvFn = void (*)(const LutWeight&, const LutTables&, int, int, float*);
using GemmFn = void (*)(const LutWeight&, const int8_t*, const int8_t*, const uint8_t*, size_t, const float*,
                        const float*, int, int, int, float*, size_t, float*);

template <int BITS, bool RES>
GemvFn pick_gemv(int nl) {
  return nl == 1 ? gemv_t<BITS, 1, RES> : nl == 2 ? gemv_t<BITS, 2, RES> : gemv_t<BITS, 4, RES>;
}
template <int BITS, bool RES>
GemmFn pick_gemm(int nl) {
  return nl == 1 ? gemm_t<BITS, 1, RES> : nl == 2 ? gemm_t<BITS, 2, RES> : gemm_t<BITS, 4, RES>;
}

using GemvPairFn = void (*)(const LutWeight&, int, float*, const LutWeight&, int, float*, int, const LutTables&);
template <int BITS, bool RES>
GemvPairFn pick_gemv_pair(int nl) {
  return nl == 1 ? gemv_pair_t<BITS, 1, RES> : nl == 2 ? gemv_pair_t<BITS, 2, RES> : gemv_pair_t<BITS, 4, RES>;
}
template <bool RES>
GemvPairFn gemv_pair_fn(int bits, int g) {
  const int nl = g / 32;
  switch (bits) {
    case 1: return pick_gemv_pair<1, RES>(nl);
    case 2: return pick_gemv_pair<2, RES>(nl);
    case 3: return pick_gemv_pair<3, RES>(nl);
    default: return pick_gemv_pair<4, RES>(nl);
  }
}

template <bool RES>
GemvFn gemv_fn(int bits, int g) {
  const int nl = g / 32;
  switch (bits) {
    case 1: return pick_gemv<1, RES>(nl);
    case 2: return pick_gemv<2, RES>(nl);
    case 3: return pick_gemv<3, RES>(nl);
    default: return pick_gemv<4, RES>(nl);
  }
}
template <bool RES>
GemmFn gemm_fn(int bits, int g) {
  const int nl = g / 32;
  switch (bits) {
    case 1: return pick_gemm<1, RES>(nl);
    case 2: return pick_gemm<2, RES>(nl);
    case 3: return pick_gemm<3, RES>(nl);
    default: return pick_gemm<4, RES>(nl);
  }
}

}  // namespace

void gemv_rows_avx512(const LutWeight& W, const LutTables& T, int rb0, int rb1, float* y) {
  (T.tr ? gemv_fn<true>(W.bits, W.g) : gemv_fn<false>(W.bits, W.g))(W, T, rb0, rb1, y);
}

void gemv_pair_avx512(const LutWeight& Wa, int a0, float* ya, const LutWeight& Wb, int b0, float* yb, int count,
                      const LutTables& T) {
  if (count <= 0) return;
  (T.tr ? gemv_pair_fn<true>(Wa.bits, Wa.g) : gemv_pair_fn<false>(Wa.bits, Wa.g))(Wa, a0, ya, Wb, b0, yb, count, T);
}

void gemm_rows_avx512(const LutWeight& W, const int8_t* tq, const uint8_t* tm, size_t gstride,
                      const float* lut_scale, const float* xsum, int n, int rb0, int rb1, float* y, size_t ldy,
                      const int8_t* tr) {
  float* ybuf = (float*)_mm_malloc(sizeof(float) * 16 * (size_t)n, 64);
  (tr ? gemm_fn<true>(W.bits, W.g) : gemm_fn<false>(W.bits, W.g))(W, tq, tr, tm, gstride, lut_scale, xsum, n, rb0,
                                                                    rb1, y, ldy, ybuf);
  _mm_free(ybuf);
}

// Tables, 16 runs at a time with one run per lane (lut_scalar.cpp is the reference, matched bit for
// bit).  Four loads of 16 floats hold runs 0-3, 4-7, 8-11, 12-15 (one run per 128-bit lane); a 4×4
// transpose inside each 128-bit lane gives X_t (element t of every run), lane f = 4·l + i holding
// run 4·i + l.  The 8 entries with bit 3 set are ((±x0 ± x1) ± x2) + x3, the other 8 their exact
// negations (U[15−m] = −U[m]: every partial sum negates exactly).  Entries are scaled by the run's
// 127·2^e/M, rounded to nearest even, packed to int8 with two saturating packs, and one byte
// permute per 4 output runs puts them in run-major order (kTablePerm).
namespace {

constexpr int kRunLane[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};  // run r is in lane kRunLane[r]

// After packs_epi16(packs_epi32(E_4j, E_4j+1), packs_epi32(E_4j+2, E_4j+3)) =: Z_j, entry m of the
// run in lane f sits in Z_{m/4} at byte 16·(f/4) + 4·(m%4) + f%4.  Output zmm b (runs 4b..4b+3,
// 16 entries each) takes m < 8 from (Z0, Z1) and m >= 8 from (Z2, Z3) with one two-source permute
// each and a blend.
// Built at compile time (constexpr): a constructor run when the library loads would be compiled with
// this file's AVX-512 flags and kill the import on a CPU without them.
struct TablePerm {
  alignas(64) uint8_t idx[4][64] = {};
  uint64_t hi_mask = 0;
  alignas(64) int32_t run_lane[16] = {};  // lane of run r (its own inverse: also the run in lane f)
  constexpr TablePerm() {
    for (int b = 0; b < 4; ++b)
      for (int rho = 0; rho < 4; ++rho)
        for (int m = 0; m < 16; ++m) {
          const int f = kRunLane[4 * b + rho];
          const int pos = 16 * (f / 4) + 4 * (m % 4) + f % 4;
          idx[b][16 * rho + m] = (uint8_t)(pos + 64 * ((m / 4) & 1));
          if (b == 0 && m >= 8) hi_mask |= 1ull << (16 * rho + m);
        }
    for (int r = 0; r < 16; ++r) run_lane[r] = kRunLane[r];
  }
};
constexpr TablePerm kTablePerm;

inline void transpose4_lanes(__m512& a, __m512& b, __m512& c, __m512& d) {  // 4×4 in every 128-bit lane
  const __m512 t0 = _mm512_unpacklo_ps(a, b), t1 = _mm512_unpackhi_ps(a, b);
  const __m512 t2 = _mm512_unpacklo_ps(c, d), t3 = _mm512_unpackhi_ps(c, d);
  a = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  b = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  c = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
  d = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
}

inline __m512 abs_ps(__m512 v) {
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF)));
}

// X_0..X_3 of the runs at xp (nruns = 16, or 8 for g = 32: the other lanes are zero).
inline void load_runs(const float* xp, int nruns, __m512 X[4]) {
  const __m512 z = _mm512_setzero_ps();
  X[0] = _mm512_loadu_ps(xp);
  X[1] = _mm512_loadu_ps(xp + 16);
  X[2] = nruns > 8 ? _mm512_loadu_ps(xp + 32) : z;
  X[3] = nruns > 8 ? _mm512_loadu_ps(xp + 48) : z;
  transpose4_lanes(X[0], X[1], X[2], X[3]);
}

inline __m512 run_peaks(const __m512 X[4]) {  // ((|x0| + |x1|) + |x2|) + |x3|, as run_peak
  return _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(abs_ps(X[0]), abs_ps(X[1])), abs_ps(X[2])), abs_ps(X[3]));
}

// Tables of `nruns` runs (16, or 8) at q; mlane: the runs' multipliers in lane order (int32),
// c = 127·B/M (0 for M = 0): run k's entries are scaled by c / mult_k (lut.h).
inline void runs_tables(const __m512 X[4], __m512i mlane, float c, int nruns, int8_t* q) {
  const __m512 sgn = _mm512_set1_ps(-0.0f);
  auto neg = [&](__m512 v) { return xor_ps(v, sgn); };
  const __m512 inv_k = _mm512_div_ps(_mm512_set1_ps(c), _mm512_cvtepi32_ps(mlane));  // IEEE, as the scalar
  // Entries 8 + j (bit 3 set): a = ±x0 ± x1 (bits 0, 1 of j), b = a ± x2 (bit 2), U = b + x3.
  const __m512 app = _mm512_add_ps(X[0], X[1]), anp = _mm512_sub_ps(X[1], X[0]);
  const __m512 a[4] = {neg(app), neg(anp), anp, app};  // j & 3 = 0: −x0 − x1, 1: x0 − x1, 2: −x0 + x1, 3
  __m512i E[16];
  for (int j = 0; j < 8; ++j) {
    const __m512 b = (j & 4) ? _mm512_add_ps(a[j & 3], X[2]) : _mm512_sub_ps(a[j & 3], X[2]);
    const __m512 u = _mm512_add_ps(b, X[3]);
    E[8 + j] = _mm512_cvtps_epi32(_mm512_mul_ps(u, inv_k));
    E[7 - j] = _mm512_cvtps_epi32(_mm512_mul_ps(neg(u), inv_k));
  }
  __m512i Z[4];
  for (int k = 0; k < 4; ++k)
    Z[k] = _mm512_packs_epi16(_mm512_packs_epi32(E[4 * k], E[4 * k + 1]), _mm512_packs_epi32(E[4 * k + 2], E[4 * k + 3]));
  const __mmask64 hm = kTablePerm.hi_mask;
  for (int b = 0; b < nruns / 4; ++b) {
    const __m512i ix = _mm512_load_si512((const void*)kTablePerm.idx[b]);
    const __m512i lo = _mm512_permutex2var_epi8(Z[0], ix, Z[1]), hi = _mm512_permutex2var_epi8(Z[2], ix, Z[3]);
    _mm512_storeu_si512((void*)(q + 64 * b), _mm512_mask_blend_epi8(hm, lo, hi));
  }
}

}  // namespace

void build_tables_avx512(const float* x, int in, int g, int ng, int8_t* tq, uint8_t* tm, size_t gstride,
                         float* lut_scale, float* xsum) {
  const int nruns = g / 4 < 16 ? g / 4 : 16;  // runs per batch of lanes
  const int nb = g / 4 / nruns;               // batches per group (1 or 2)
  alignas(64) float xg[128];
  alignas(64) float s16[16];
  for (int G = 0; G < ng; ++G) {
    const int c0 = G * g;
    const int nreal = in - c0 < g ? in - c0 : g;
    const float* xp = x + c0;
    if (nreal < g) {  // short last group: zero-pad
      for (int c = 0; c < g; ++c) xg[c] = c < nreal ? xp[c] : 0.0f;
      xp = xg;
    }
    __m512 X[2][4], peak[2];
    alignas(64) float pk[32];
    for (int b = 0; b < nb; ++b) {
      load_runs(xp + 64 * b, nruns, X[b]);
      peak[b] = run_peaks(X[b]);
      // peaks in run order, for group_mults (lane kRunLane[r] holds run r; the permutation is its own inverse)
      _mm512_store_ps(pk + 16 * b, _mm512_permutexvar_ps(_mm512_load_si512((const void*)kTablePerm.run_lane), peak[b]));
    }
    const float M = _mm512_reduce_max_ps(nb == 2 ? _mm512_max_ps(peak[0], peak[1]) : peak[0]);
    uint8_t* mult = tm + (size_t)G * gstride / 16;
    const int B = group_mults(pk, g / 4, M, mult);
    const float c = M > 0.0f ? 127.0f * (float)B / M : 0.0f;
    float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // Σx in the canonical order (lut_scalar.cpp)
    for (int b = 0; b < nb; ++b) {
      __m128i mb;  // this batch's multipliers, run order, then lane order as int32
      if (nruns == 16) {
        mb = _mm_loadu_si128((const __m128i*)(mult + 16 * b));
      } else {
        mb = _mm_loadl_epi64((const __m128i*)(mult + 16 * b));
        mb = _mm_or_si128(mb, _mm_slli_si128(_mm_set1_epi8(1), 8));  // padding lanes: 1 (their entries are 0)
      }
      const __m512i mlane = _mm512_permutexvar_epi32(_mm512_load_si512((const void*)kTablePerm.run_lane),
                                                     _mm512_cvtepu8_epi32(mb));
      runs_tables(X[b], mlane, c, nruns, tq + (size_t)G * gstride + 256 * b);
      _mm512_store_ps(s16, _mm512_add_ps(_mm512_add_ps(X[b][0], X[b][1]), _mm512_add_ps(X[b][2], X[b][3])));
      for (int r = 0; r < nruns; ++r) part[r & 3] += s16[kRunLane[r]];
    }
    lut_scale[G] = M / (254.0f * (float)B);
    xsum[G] = (part[0] + part[1]) + (part[2] + part[3]);
  }
}

}  // namespace elutq
