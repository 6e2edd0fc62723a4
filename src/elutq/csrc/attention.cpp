// Attention dispatch: which attend_* kernel (attention.h) a path runs, and a prompt's columns at once.
// Compiled for the baseline ISA; the SIMD kernels are only called after CPU detection (lut_driver.h).
#include "attention.h"

#include <cstddef>
#include <stdexcept>

namespace elutq {

AttendFn attention_kernel(Path p, int head_dim) {
#if defined(__x86_64__) || defined(_M_X64)
  if (p == Path::Avx512 && head_dim % 64 == 0) return attend_avx512;
  if ((p == Path::Avx2 || p == Path::Avx512) && head_dim % 32 == 0) return attend_avx2;
#endif
#if defined(__aarch64__)
  if (p == Path::Neon && head_dim % 32 == 0 && head_dim <= 256) return attend_neon;
#endif
  (void)p, (void)head_dim;
  return attend_scalar;
}

void attend_columns(Path p, const float* q, const uint16_t* k0, const uint16_t* v0, size_t stride, int len, int D,
                    int grp, int ncol, float scale, float* sc, float* out) {
  if (ncol < 1 || ncol > len) throw std::invalid_argument("attend_columns needs 1 <= ncol <= len");
  const AttendFn one = attention_kernel(p, D);
#if defined(__x86_64__) || defined(_M_X64)
  if (one == attend_avx512) return attend_cols_avx512(q, k0, v0, stride, len, D, grp, ncol, scale, sc, out);
  if (one == attend_avx2) return attend_cols_avx2(q, k0, v0, stride, len, D, grp, ncol, scale, sc, out);
#endif
  for (int i = 0; i < ncol; ++i)
    one(q + (size_t)i * grp * D, k0, v0, stride, len - ncol + 1 + i, D, grp, scale, sc, out + (size_t)i * grp * D);
}

}  // namespace elutq
