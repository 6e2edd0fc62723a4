// See decode.h.
#include "decode.h"

#include <cstring>
#include <vector>

#include "lut_driver.h"

namespace elutq {

namespace {

// spread[v]: byte k of the result = bit k of v, so the 8 codes of a byte position are Σ_i spread[q_i] << i.
struct Spread {
  uint64_t t[256];
  constexpr Spread() : t() {
    for (int v = 0; v < 256; ++v) {
      uint64_t r = 0;
      for (int k = 0; k < 8; ++k) r |= (uint64_t)((v >> k) & 1) << (8 * k);
      t[v] = r;
    }
  }
};
constexpr Spread kSpread;

// The codes of weights 8b .. 8b + 7 of row o, one per byte.
inline uint64_t codes8(const uint8_t* q, int bits, size_t plane, size_t off) {
  uint64_t c = 0;
  for (int i = 0; i < bits; ++i) c |= kSpread.t[q[i * plane + off]] << i;
  return c;
}

void decode_row(const uint8_t* q, size_t plane, const float* lv, int bits, int in, int g, float* w) {
  const int L = 1 << bits;
  for (int j0 = 0; j0 < in; j0 += 8) {
    const uint64_t c = codes8(q, bits, plane, (size_t)(j0 >> 3));
    const int n = in - j0 < 8 ? in - j0 : 8;
    for (int k = 0; k < n; ++k) {
      const int j = j0 + k;
      w[j] = lv[(size_t)(j / g) * L + ((c >> (8 * k)) & 0xff)];
    }
  }
}

// acc: [ng][bits + 1] doubles of scratch (the sums of gs, then of gz, per group).
void grad_row(const uint8_t* q, size_t plane, const float* gw, int bits, int in, int g, double* acc, float* gs,
              float* gz) {
  const int ng = (in + g - 1) / g, B = bits + 1;
  std::memset(acc, 0, sizeof(double) * ng * B);
  for (int j0 = 0; j0 < in; j0 += 8) {
    const uint64_t c = codes8(q, bits, plane, (size_t)(j0 >> 3));
    const int n = in - j0 < 8 ? in - j0 : 8;
    for (int k = 0; k < n; ++k) {
      const int j = j0 + k, code = (int)((c >> (8 * k)) & 0xff);
      const double x = gw[j];
      double* a = acc + (size_t)(j / g) * B;
      for (int i = 0; i < bits; ++i) a[i] += ((code >> i) & 1) ? x : 0.0;
      a[bits] += x;
    }
  }
  for (int G = 0; G < ng; ++G) {
    for (int i = 0; i < bits; ++i) gs[(size_t)G * bits + i] = (float)acc[(size_t)G * B + i];
    gz[G] = (float)acc[(size_t)G * B + bits];
  }
}

}  // namespace

void hlq_decode(const uint8_t* q, const float* lv, int bits, int out, int in, int g, float* w, int threads) {
  const size_t nb = (size_t)(in + 7) / 8, ng = (size_t)(in + g - 1) / g, plane = (size_t)out * nb;
  parallel_for(threads, out, 16, [&](int r0, int r1) {
    for (int o = r0; o < r1; ++o)
      decode_row(q + o * nb, plane, lv + o * ng * ((size_t)1 << bits), bits, in, g, w + (size_t)o * in);
  });
}

void hlq_decode_grad(const uint8_t* q, const float* gw, int bits, int out, int in, int g, float* gs, float* gz,
                     int threads) {
  const size_t nb = (size_t)(in + 7) / 8, ng = (size_t)(in + g - 1) / g, plane = (size_t)out * nb;
  parallel_for(threads, out, 16, [&](int r0, int r1) {
    std::vector<double> acc(ng * (bits + 1));
    for (int o = r0; o < r1; ++o)
      grad_row(q + o * nb, plane, gw + (size_t)o * in, bits, in, g, acc.data(), gs + o * ng * bits, gz + o * ng);
  });
}

}  // namespace elutq
