// HLQ decode for training (finetune.py's trainable views, which keep the codes packed): the float weight
// from packed bit-planes, and the gradient of the scales and offsets from the weight's gradient.
//   q    u8  [bits][out][nb]      bit-planes, nb = ⌈in/8⌉; bit k of byte b of plane i is bit i of the code
//                                 of weight 8b + k (LSB first, hlq.pack_bitplanes)
//   s    f32 [out][ng][bits], z f32 [out][ng], ng = ⌈in/g⌉
//   w,gw f32 [out][in]
//   gs   f32 [out][ng][bits], gz f32 [out][ng]
// decode:  w[o][j] = lv[code(o, j)], lv[c] = z + (Σ_i s_i·bit_i(c), summed in order i = 0, 1, ...) per group,
//          the order hlq.levels sums in: the same floats as hlq.dequantize
// grad:    gz[o][G] = Σ_{j∈G} gw[o][j],  gs[o][G][i] = Σ_{j∈G} gw[o][j]·bit_i(code(o, j))
//          (float lanes of 8, summed in double per group)
// Rows are split over the kernel thread pool; memory-bound, so plain loops.
#pragma once

#include <cstdint>

namespace elutq {

void hlq_decode(const uint8_t* q, const float* s, const float* z, int bits, int out, int in, int g, float* w,
                int threads);
void hlq_decode_grad(const uint8_t* q, const float* gw, int bits, int out, int in, int g, float* gs, float* gz,
                     int threads);

}  // namespace elutq
