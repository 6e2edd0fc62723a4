// Portable scalar reference for the causal attention kernels (the SIMD paths in attention_avx2.cpp,
// attention_avx512.cpp and attention_neon.cpp must match it to float rounding).
//
// Shapes and layouts: see attention.h.  q, out f32 [grp][D]; K and V fp16 rows `stride` halves apart;
// scores f32 [grp][len]: scores, softmax (std::exp), then the weighted sum of V rows.
#include <algorithm>

#include "attention.h"

namespace elutq {

// Causal attention of one column for one KV head and the `grp` query heads that share it.  K and V are fp16.
ELUTQ_CLONES void attend_scalar(const float* q, const uint16_t* k0, const uint16_t* v0, size_t stride, int len, int D,
                                int grp, float scale, float* sc /* [grp][len] */, float* out /* [grp][D] */) {
  for (int j = 0; j < len; ++j) {
    const uint16_t* kj = k0 + (size_t)j * stride;
    for (int r = 0; r < grp; ++r) {
      const float* qr = q + (size_t)r * D;
      float acc[16] = {0};
      int d = 0;
      for (; d + 16 <= D; d += 16)
        for (int t = 0; t < 16; ++t) acc[t] += qr[d + t] * fp16_to_float(kj[d + t]);
      float s = 0.0f;
      for (int t = 0; t < 16; ++t) s += acc[t];
      for (; d < D; ++d) s += qr[d] * fp16_to_float(kj[d]);
      sc[(size_t)r * len + j] = s * scale;
    }
  }
  for (int r = 0; r < grp; ++r) {
    softmax_inplace(sc + (size_t)r * len, len);
    std::fill(out + (size_t)r * D, out + (size_t)(r + 1) * D, 0.0f);
  }
  for (int j = 0; j < len; ++j) {
    const uint16_t* vj = v0 + (size_t)j * stride;
    for (int r = 0; r < grp; ++r) {
      const float w = sc[(size_t)r * len + j];
      float* o = out + (size_t)r * D;
      for (int d = 0; d < D; ++d) o[d] += w * fp16_to_float(vj[d]);
    }
  }
}

}  // namespace elutq
