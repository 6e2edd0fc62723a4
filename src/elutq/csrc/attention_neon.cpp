// NEON (AArch64, baseline ARMv8-A) causal attention.  Scalar reference: attention_scalar.cpp.
//
// Shapes and layouts: see attention.h.  attend_neon (D % 32 == 0, D <= 256): each fp16 key row is
// widened once (vcvt_f32_f16) into a stack buffer and dotted with every query row sharing it (GQA), 4
// accumulators over D; softmax as the scalar reference; then per query row and 32-dim slice, 8
// accumulators stay in registers over all positions while each V row slice is widened and FMA'd.
#if defined(__aarch64__)
#include <arm_neon.h>

#include "attention.h"

namespace elutq {

namespace {

inline float32x4_t load_h4(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }

}  // namespace

void attend_neon(const float* q, const uint16_t* k0, const uint16_t* v0, size_t stride, int len, int D, int grp,
                 float scale, float* sc, float* out) {
  float kf[256];
  for (int j = 0; j < len; ++j) {
    const uint16_t* kj = k0 + (size_t)j * stride;
    for (int d = 0; d < D; d += 4) vst1q_f32(kf + d, load_h4(kj + d));
    for (int r = 0; r < grp; ++r) {
      const float* qr = q + (size_t)r * D;
      float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0;
      for (int d = 0; d < D; d += 16) {
        a0 = vfmaq_f32(a0, vld1q_f32(qr + d), vld1q_f32(kf + d));
        a1 = vfmaq_f32(a1, vld1q_f32(qr + d + 4), vld1q_f32(kf + d + 4));
        a2 = vfmaq_f32(a2, vld1q_f32(qr + d + 8), vld1q_f32(kf + d + 8));
        a3 = vfmaq_f32(a3, vld1q_f32(qr + d + 12), vld1q_f32(kf + d + 12));
      }
      sc[(size_t)r * len + j] = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3))) * scale;
    }
  }
  for (int r = 0; r < grp; ++r) {
    softmax_inplace(sc + (size_t)r * len, len);
  }
  for (int r = 0; r < grp; ++r) {
    const float* p = sc + (size_t)r * len;
    for (int d0 = 0; d0 < D; d0 += 32) {
      float32x4_t o[8];
      for (int t = 0; t < 8; ++t) o[t] = vdupq_n_f32(0.0f);
      const uint16_t* vd = v0 + d0;
      for (int j = 0; j < len; ++j, vd += stride) {
        const float w = p[j];
        for (int t = 0; t < 8; ++t) o[t] = vfmaq_n_f32(o[t], load_h4(vd + 4 * t), w);
      }
      for (int t = 0; t < 8; ++t) vst1q_f32(out + (size_t)r * D + d0 + 4 * t, o[t]);
    }
  }
}

}  // namespace elutq
#endif  // __aarch64__
