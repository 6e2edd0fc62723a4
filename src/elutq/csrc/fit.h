// HLQ parameter fitting, native twin of hlq.fit_hlq_als (the torch reference, also the CUDA path).
//   w  f32 [N][g]      groups as rows
//   h  f32 [P][g]      element weights (0: padding); group n uses row n % P (P = 1: one pattern for all, P = N)
//   s  f32 [N][bits]   out: the scales s_i of the levels z + Σ_i s_i·b_i
//   z  f32 [N]         out: the offsets
// Per group, from the min-max uniform start: (a) every weight takes its nearest level, (b) [s; z] is re-solved
// in closed form for those codes (weighted least squares, sums in double, a 1e-9 ridge).  A group takes a step
// only if its weighted squared error fell and stops at the first that did not, so the error never rises — the
// reference's algorithm step for step; results agree up to summation order.  Groups are independent: split
// over the kernel thread pool, each group's codes in a per-thread buffer (g bytes; a whole row for per-row).
#pragma once

#include <cstdint>

namespace elutq {

// codes u8 [N][g]: each weight's nearest level under s [N][bits], z [N] (hlq.assign_nearest's twin: levels
// sorted, the first midpoint at or above the weight).
void hlq_assign(const float* w, const float* s, const float* z, long n, int g, int bits, uint8_t* codes, int threads);
// w f32 [out][in] = the levels of codes u8 [out][in] under s [out][ng][bits], z [out][ng], ng = ⌈in/g⌉
// (hlq.dequantize's twin; the levels summed as make_levels / hlq.levels, so the same floats).
void hlq_dequantize(const uint8_t* codes, const float* s, const float* z, int out, int in, int g, int bits, float* w,
                    int threads);
void hlq_fit_als(const float* w, const float* h, long n, int p, int g, int bits, int iters, float* s, float* z,
                 int threads);

}  // namespace elutq
