// Shared by every op family of the native code (LUT matmul, attention, dense fp16 rows, the runtime):
// the kernel paths, the function-multiversioning macro and IEEE half <-> float conversions.
#pragma once

#include <cstdint>
#include <cstring>

// Plain C++ loops that GCC vectorizes, compiled for AVX-512, AVX2 and the baseline, picked at load time.
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define ELUTQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ELUTQ_CLONES
#endif

namespace elutq {

// The SIMD paths, each chosen at run time after CPU detection (lut_driver.h: path_available).
enum class Path : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Neon = 3 };

// IEEE half <-> float, exact (every half is a float) and round-to-nearest-even (what F16C's vcvtps2ph,
// NumPy and torch's .half() do), without branches on the value so loops over them vectorize.
static inline float fp16_to_float(uint16_t h) {
  // Exponent and mantissa moved into a float's fields, then scaled by 2^(127-15): exact for normal
  // halves and subnormal ones alike (a float subnormal times 2^112 is the normal float it names).
  const uint32_t mag = (uint32_t)(h & 0x7FFFu) << 13;
  float f;
  std::memcpy(&f, &mag, 4);
  f *= 0x1p112f;
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((h & 0x7C00u) == 0x7C00u) bits = 0x7F800000u | mag;  // inf / NaN (payload kept)
  bits |= (uint32_t)(h & 0x8000u) << 16;
  std::memcpy(&f, &bits, 4);
  return f;
}
static inline uint16_t float_to_fp16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return sign | 0x7E00u | (uint16_t)((ax >> 13) & 0x1FFu);  // NaN stays NaN (quiet)
  if (ax >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 (or inf): rounds to inf
  if (ax < 0x38800000u) {  // below 2^-14: a half subnormal (or 0).  Adding 0.5 puts the value's bits
    float a;               // at 2^-24 (a half subnormal's step) into the float mantissa, rounded by
    std::memcpy(&a, &ax, 4);  // the FPU to nearest even; what remains above 0.5 is the half's bits.
    a += 0.5f;
    uint32_t r;
    std::memcpy(&r, &a, 4);
    return sign | (uint16_t)(r - 0x3F000000u);
  }
  // Normal: re-bias the exponent (−112 in the exponent field) and round the 13 dropped mantissa bits
  // to nearest, ties to the even result (a carry into the exponent is the correct next binade).
  const uint32_t odd = (ax >> 13) & 1u;
  return sign | (uint16_t)((ax - (112u << 23) + 0xFFFu + odd) >> 13);
}

}  // namespace elutq
