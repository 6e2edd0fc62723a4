// Prefill GEMM for long batches: HLQ weights re-quantized to int8 one row block at a time, activations
// to int8 per (column, group), int32 dot products (vpdpbusd), scaled per group.
//
// Why.  A LUT lookup does per weight and plane about the work of one multiply, so at 3-4 bits the LUT
// GEMM of a 2048-token window runs at a small multiple of fp32's rate; an int8 dot product does 64
// multiply-adds per instruction whatever the bits.  Decoding a row block's weights costs O(16·in) and
// serves every column of the call, so it pays from a few dozen columns on (the runtime decides:
// i8_prefill_pays; the Python LUTLinear stays on the LUT kernels).
//
// Math.  For row r and group G, HLQ's levels lv[c] = z + Σ_i s_i·bit_i(c) (summed as hlq.levels sums
// them) lie in [lo, hi]; with mid = (lo + hi)/2 and Δ = (hi − lo)/254 each level is stored as
// q[c] = rint((lv[c] − mid)/Δ) ∈ [−127, 127] (the rounding adds Δ/2 = (hi − lo)/508 at most, ~1/30 of a
// 4-bit step).  Column x's activation group A (kActGroup columns inside one weight group) gets
// σ = max|x_A|/127 and xq = rint(x/σ) ∈ [−127, 127].  Then
//     y_r = Σ_A [ Δ·σ·Σ_k q_k·xq_k + mid·Σx_A ]          (Σx_A from the float input, exact)
// vpdpbusd multiplies unsigned by signed bytes, so the weights are stored as u = q + 128 ∈ [1, 255]:
//     Σ_k q_k·xq_k = Σ_k u_k·xq_k − 128·Σ_k xq_k,  the second term per (column, group) (cq below).
//
// Layouts (in_pad = ng·g, columns past `in` are zero; k-step s = 4 consecutive bytes of a column):
//   panel  u8  [in_pad/4][64]   one row block's weights: k-step s of 16-column block b = s/4, t = s%4
//          holds at byte 4m + j the weight of row m, column 16b + 4j + t — exactly what a chunk's nibbles
//          give without transposing (lut.h: chunk byte 4m + j holds runs j and j + 4 of row m).
//   xq     s8  [n][in_pad]      column c's bytes in the same order: xq[16b + 4t + j] = x[16b + 4j + t]
//   sx, xs f32 [n][na]          σ and Σx of each activation group (kActGroup columns, na = in_pad/32);
//   cq     i32 [n][na]          128·Σ_k xq_k
//   per row block and group: lvq u8 [16 rows][16 codes] (u of each code), dm, mid f32 [16]
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "lut.h"

namespace elutq {

// Activations get one scale per kActGroup columns (8 k-steps), finer than the weights' groups: with a scale
// per 128 columns an outlier channel coarsened its whole group, and the default model's logits moved 5× as
// far from torch's as the LUT kernels' (docs/KERNELS.md).
constexpr int kActGroup = 32, kActSteps = kActGroup / 4;

// Activations of one call, quantized once and shared by every matrix (all have `in` and `g` alike).
struct I8Acts {
  const int8_t* xq;
  const float *sx, *xs;
  const int32_t* cq;
  int n, ng, in_pad;  // ng: activation groups per column (in_pad / kActGroup)
};

// Row block rb, group G: each row's levels as u8 (lvq[16·m + code]), Δ and mid (the math above; padded
// rows have zero scales, so Δ = 0 and every u is 128).  One definition for both paths (gemm_i8.cpp,
// compiled without FMA contraction), so both get the same bytes.
void i8_group_levels(const LutWeight& W, int rb, int G, uint8_t* lvq, float* dm, float* mid);

// Rows of row blocks [rb0, rb1) of Y = W·Xᵀ for the n columns of A: column c's y at y + c·ldy (real rows only).
void i8_rows_scalar(const LutWeight& W, const I8Acts& A, int rb0, int rb1, float* y, size_t ldy);
#if defined(__x86_64__) || defined(_M_X64)
void i8_rows_avx512(const LutWeight& W, const I8Acts& A, int rb0, int rb1, float* y, size_t ldy);  // same result
#endif

// Y_w = W_w·Xᵀ for every matrix (equal in and g), X [n][in], ys[w] [n][out_w]; p: Scalar or Avx512.
void i8_matmul(const std::vector<LutWeight>& Ws, const float* X, int n, const std::vector<float*>& ys, Path p,
               int max_threads = 0);
// Whether the runtime hands a call of n columns over these matrices to i8_matmul on path p
// (ELUTQ_PREFILL=lut turns it off, =int8 forces it from 2 columns on).
bool i8_prefill_pays(const std::vector<LutWeight>& Ws, int n, Path p);

}  // namespace elutq
