// Dense fp16 rows, for the layers a checkpoint keeps in 16 bits (e.g. a tied lm_head): the kernels are
// dense_scalar.cpp (the reference), dense_avx2.cpp and dense_avx512.cpp; the runtime picks one per path
// (runtime.cpp: Runtime::matmul).
//
// Shapes and layouts:
//   W fp16 [out][in] (row-major), X f32 [n][in];  Y[c·ldy + r] = Σ_k W[r][k]·X[c][k]  for r in [r0, r1).
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.h"

namespace elutq {

void dense_rows_scalar(const uint16_t* W, int in, const float* X, int n, int r0, int r1, float* Y, size_t ldy);
#if defined(__x86_64__) || defined(_M_X64)
void dense_rows_avx2(const uint16_t* W, int in, const float* X, int n, int r0, int r1, float* Y, size_t ldy);
void dense_rows_avx512(const uint16_t* W, int in, const float* X, int n, int r0, int r1, float* Y, size_t ldy);
#endif

}  // namespace elutq
