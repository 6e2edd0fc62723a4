// Causal attention of the decode loop over the fp16 KV cache: shared declarations (the kernels live
// in attention_scalar.cpp, the reference, and attention_avx2.cpp / attention_avx512.cpp /
// attention_neon.cpp; attention.cpp picks one per path).
//
// Shapes and layouts.  One call is one column (or ncol consecutive columns of one prompt) for one KV
// head and the grp query heads that share it (GQA; contiguous in q and out, as transformers' repeat_kv
// maps them):
//   q, out  f32  [ncol][grp][D]      query rows; out[r] = softmax(scale·q[r]·Kᵀ)·V
//   k0, v0  fp16 [len] rows of D     position j's key at k0 + j·stride, its value at v0 + j·stride
//                                    (the KV cache's [max_ctx][head_dim] rows of this head: stride = D)
//   sc      f32  [ncol·grp][len]     scratch for the scores (contents unspecified afterwards)
// Column i of a prompt block attends to its first len − ncol + 1 + i positions; len >= 1.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "common.h"

namespace elutq {

// p[0..len) ← softmax(p) in place (the scalar and NEON attention; static, so each file compiles its own).
static inline void softmax_inplace(float* p, int len) {
  float mx = -INFINITY;
  for (int j = 0; j < len; ++j) mx = p[j] > mx ? p[j] : mx;
  float sum = 0.0f;
  for (int j = 0; j < len; ++j) {
    p[j] = std::exp(p[j] - mx);
    sum += p[j];
  }
  const float inv = 1.0f / sum;
  for (int j = 0; j < len; ++j) p[j] *= inv;
}

// A decode step's attention reads one head's K, then its V, from memory (the weights evict them between
// layers).  The AVX2 and AVX-512 kernels prefetch the rows kAttendAhead positions ahead into L1, which
// took 10-25 % off a call streaming from memory (docs/KERNELS.md).
constexpr int kAttendAhead = 16;
// n fp16 values from p into L1 (32 fp16 = one 64-byte line).
static inline void prefetch_fp16(const uint16_t* p, int n) {
  for (int i = 0; i < n; i += 32) __builtin_prefetch(p + i, 0, 3);
}
// Row t of K (t < len), else row t − len of V: the key pass's last blocks start V's stream.
static inline void prefetch_kv_row(const uint16_t* k0, const uint16_t* v0, size_t stride, int len, int D, int t) {
  prefetch_fp16(t < len ? k0 + (size_t)t * stride : v0 + (size_t)(t - len) * stride, D);
}

// Causal attention of one column for one KV head and the grp query heads that share it (contiguous
// in q and out, as transformers' repeat_kv maps them): out[r] = softmax(scale·q[r]·Kᵀ)·V over the
// len positions k0 + j·stride, v0 + j·stride (fp16 K and V rows: position 0 of this KV head, `stride`
// halves between positions), len >= 1.  q, out: [grp][D]; sc: scratch [grp][len] (contents unspecified afterwards).
void attend_scalar(const float* q, const uint16_t* k0, const uint16_t* v0, size_t stride, int len, int D, int grp,
                   float scale, float* sc, float* out);
#if defined(__x86_64__) || defined(_M_X64)
void attend_avx2(const float* q, const uint16_t* k0, const uint16_t* v0, size_t stride, int len, int D, int grp,
                 float scale, float* sc, float* out);  // D % 32 == 0
void attend_avx512(const float* q, const uint16_t* k0, const uint16_t* v0, size_t stride, int len, int D, int grp,
                   float scale, float* sc, float* out);  // D % 64 == 0, D <= 256
// ncol consecutive columns of one sequence at once (attend_columns; the same D).
void attend_cols_avx2(const float* q, const uint16_t* k0, const uint16_t* v0, size_t stride, int len, int D, int grp,
                      int ncol, float scale, float* sc, float* out);
void attend_cols_avx512(const float* q, const uint16_t* k0, const uint16_t* v0, size_t stride, int len, int D,
                        int grp, int ncol, float scale, float* sc, float* out);
#endif
#if defined(__aarch64__)
void attend_neon(const float* q, const uint16_t* k0, const uint16_t* v0, size_t stride, int len, int D, int grp,
                 float scale, float* sc, float* out);  // D % 32 == 0, D <= 256
#endif

// The attend_* kernel (above) a path runs for heads of head_dim dimensions.
using AttendFn = void (*)(const float* q, const uint16_t* k0, const uint16_t* v0, size_t stride, int len, int D, int grp,
                          float scale, float* sc, float* out);
AttendFn attention_kernel(Path p, int head_dim);
// ncol consecutive columns of one sequence (a prompt's positions len − ncol .. len − 1) for one KV head:
// q, out [ncol][grp][D]; sc scratch [ncol·grp][len]; column i attends to its first len − ncol + 1 + i
// positions.  AVX-512 and AVX2 score each block of keys once for all ncol·grp query rows (a prompt's
// columns share K and V as GQA's query heads do); scalar and NEON run column by column.
void attend_columns(Path p, const float* q, const uint16_t* k0, const uint16_t* v0, size_t stride, int len, int D,
                    int grp, int ncol, float scale, float* sc, float* out);

}  // namespace elutq
