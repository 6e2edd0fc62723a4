// NEON (AArch64, baseline ARMv8-A) LUT kernel.  Scalar reference: lut_scalar.cpp.
//
// Shapes and layouts: see lut.h.  A 64-byte weight chunk (16 rows × 8 runs, one plane) is four
// 16-byte quarters (rows 4q..4q+3).  For each quarter:
//   lo = (v & 0x0F) | 16·(p mod 4),  hi = (v >> 4) | 16·(p mod 4)
//   vqtbl4q_u8(T[k0..k0+3] as 4 q-registers, lo)   → 16 int8 lookups (4 rows × 4 runs), same for hi
//   vmull_s8 by the runs' multipliers (lut.h: 1..127, byte j ↔ run k0 + j) widens to int16 and
//   vpaddq_s16 sums byte pairs (runs j = 0+1, 2+3); these accumulate over the group in int16
//   (|sum| ≤ 127·Σ_k mult_k ≤ 127·8·g/4 ≤ 32512: lut.h's group_mults keeps Σ mult_k within 8 per
//   run, so no overflow), then vpaddlq_s16 gives one int32 per row.
// Tables are built with the scalar builder (they are small next to the weights).
#if defined(__aarch64__)
#include <arm_neon.h>

#include <cstring>

#include "lut.h"

namespace elutq {

namespace {

// Σ of adjacent byte pairs of r, each byte times its run's multiplier (m: mult[k0..k0+3] as bytes).
inline int16x8_t pair_sums(int8x16_t r, int8x16_t m) {
  return vpaddq_s16(vmull_s8(vget_low_s8(r), vget_low_s8(m)), vmull_high_s8(r, m));
}

inline int8x16_t mult4(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return vreinterpretq_s8_u32(vdupq_n_u32(v));
}

template <int BITS, int NL>
void gemv_t(const LutWeight& W, const LutTables& T, int rb0, int rb1, float* y) {
  const uint8x16_t nib = vdupq_n_u8(0x0F);
  const uint8x16_t pat = vreinterpretq_u8_u32(vdupq_n_u32(0x30201000u));
  for (int rb = rb0; rb < rb1; ++rb) {
    const uint8_t* wp = W.w + (size_t)rb * W.w_bytes_per_rb();
    const uint16_t* sp = W.sz + (size_t)rb * W.sz_elems_per_rb();
    float32x4_t yv[4];
    for (int q = 0; q < 4; ++q) yv[q] = vdupq_n_f32(0.0f);
    for (int G = 0; G < W.ng; ++G) {
      const int8_t* tg = T.tq + (size_t)G * T.gstride;
      const uint8_t* mg = T.tm + (size_t)G * T.gstride / 16;
      float32x4_t f[4], ss[4];
      for (int q = 0; q < 4; ++q) f[q] = ss[q] = vdupq_n_f32(0.0f);
      for (int i = 0; i < BITS; ++i) {
        int16x8_t a[4];
        for (int q = 0; q < 4; ++q) a[q] = vdupq_n_s16(0);
        for (int L = 0; L < NL; ++L, wp += kChunkBytes) {
          if (g_prefetch_bytes) __builtin_prefetch(wp + g_prefetch_bytes, 0, 2);
          const uint8x16x4_t t0 = vld1q_u8_x4((const uint8_t*)(tg + 128 * L));
          const uint8x16x4_t t1 = vld1q_u8_x4((const uint8_t*)(tg + 128 * L + 64));
          const int8x16_t m0 = mult4(mg + 8 * L), m1 = mult4(mg + 8 * L + 4);
          for (int q = 0; q < 4; ++q) {
            const uint8x16_t v = vld1q_u8(wp + 16 * q);
            const uint8x16_t lo = vorrq_u8(vandq_u8(v, nib), pat);
            const uint8x16_t hi = vorrq_u8(vshrq_n_u8(v, 4), pat);
            const int8x16_t rlo = vreinterpretq_s8_u8(vqtbl4q_u8(t0, lo));
            const int8x16_t rhi = vreinterpretq_s8_u8(vqtbl4q_u8(t1, hi));
            a[q] = vaddq_s16(a[q], vaddq_s16(pair_sums(rlo, m0), pair_sums(rhi, m1)));
          }
        }
        for (int q = 0; q < 4; ++q) {
          const float32x4_t s = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sp + 16 * i + 4 * q)));
          f[q] = vfmaq_f32(f[q], vcvtq_f32_s32(vpaddlq_s16(a[q])), s);
          ss[q] = vaddq_f32(ss[q], s);
        }
      }
      const float32x4_t ls = vdupq_n_f32(T.lut_scale[G]), xs = vdupq_n_f32(T.xsum[G]);
      for (int q = 0; q < 4; ++q) {
        float32x4_t z = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sp + 16 * BITS + 4 * q)));
        z = vfmaq_n_f32(z, ss[q], 0.5f);  // z + Σ_i s_i / 2
        yv[q] = vfmaq_f32(yv[q], f[q], ls);
        yv[q] = vfmaq_f32(yv[q], z, xs);
      }
      sp += (BITS + 1) * 16;
    }
    float tmp[16];
    for (int q = 0; q < 4; ++q) vst1q_f32(tmp + 4 * q, yv[q]);
    const int r0 = rb * kRowBlock;
    const int n = W.out - r0 < kRowBlock ? W.out - r0 : kRowBlock;
    for (int m = 0; m < n; ++m) y[r0 + m] = tmp[m];
  }
}

using GemvFn = void (*)(const LutWeight&, const LutTables&, int, int, float*);

template <int BITS>
GemvFn pick(int nl) {
  return nl == 1 ? gemv_t<BITS, 1> : nl == 2 ? gemv_t<BITS, 2> : gemv_t<BITS, 4>;
}

}  // namespace

void gemv_rows_neon(const LutWeight& W, const LutTables& T, int rb0, int rb1, float* y) {
  const int nl = W.g / 32;
  GemvFn f = W.bits == 1 ? pick<1>(nl) : W.bits == 2 ? pick<2>(nl) : W.bits == 3 ? pick<3>(nl) : pick<4>(nl);
  f(W, T, rb0, rb1, y);
}

}  // namespace elutq
#endif  // __aarch64__
