// HLQ decode for training (finetune.py's trainable views, which keep the codes packed): the float weight
// from packed bit-planes, and the gradient of the scales and offsets from the weight's gradient.
//   q    u8  [bits][out][nb]      bit-planes, nb = ⌈in/8⌉; bit k of byte b of plane i is bit i of the code
//                                 of weight 8b + k (LSB first, hlq.pack_bitplanes)
//   lv   f32 [out][ng][2^bits]    each group's levels, z + Σ_i s_i·bit_i(c) (hlq.levels), ng = ⌈in/g⌉
//   w,gw f32 [out][in]
//   gs   f32 [out][ng][bits], gz f32 [out][ng]
// decode:  w[o][j] = lv[o][j/g][code(o, j)]  — the same float torch's gather picks, so bit-identical
// grad:    gz[o][G] = Σ_{j∈G} gw[o][j],  gs[o][G][i] = Σ_{j∈G} gw[o][j]·bit_i(code(o, j))  (double sums)
// Rows are split over the kernel thread pool; memory-bound, so plain loops.
#pragma once

#include <cstdint>

namespace elutq {

void hlq_decode(const uint8_t* q, const float* lv, int bits, int out, int in, int g, float* w, int threads);
void hlq_decode_grad(const uint8_t* q, const float* gw, int bits, int out, int in, int g, float* gs, float* gz,
                     int threads);

}  // namespace elutq
