// See decode.h.  Groups are walked whole (no division per weight); inside a group, 8 weights a byte.
#include "decode.h"

#include <cstring>
#include <vector>

#include "common.h"
#include "lut_driver.h"

namespace elutq {

namespace {

// spread[v]: byte k = bit k of v, so the 8 codes at a byte position are Σ_i spread[q_i] << i.
// bits[v][k]: bit k of v as a float (the gradient's mask).
struct Tables {
  uint64_t spread[256];
  float bits[256][8];
  constexpr Tables() : spread(), bits() {
    for (int v = 0; v < 256; ++v)
      for (int k = 0; k < 8; ++k) {
        spread[v] |= (uint64_t)((v >> k) & 1) << (8 * k);
        bits[v][k] = (float)((v >> k) & 1);
      }
  }
};
constexpr Tables kT;

// The codes of weights 8b .. 8b + 7 of a row, one per byte (q: the row's first byte in plane 0).
inline uint64_t codes8(const uint8_t* q, int bits, size_t plane, int b) {
  uint64_t c = 0;
  for (int i = 0; i < bits; ++i) c |= kT.spread[q[i * plane + b]] << i;
  return c;
}

inline int code_at(const uint8_t* q, int bits, size_t plane, int j) {
  int c = 0;
  for (int i = 0; i < bits; ++i) c |= ((q[i * plane + (j >> 3)] >> (j & 7)) & 1) << i;
  return c;
}

void decode_row(const uint8_t* q, size_t plane, const float* s, const float* z, int bits, int in, int g, float* w) {
  const int L = 1 << bits;
  float lv[256];
  for (int j0 = 0, G = 0; j0 < in; j0 += g, ++G) {
    for (int c = 0; c < L; ++c) {
      float acc = 0.0f;
      for (int i = 0; i < bits; ++i) acc = acc + s[G * bits + i] * (float)((c >> i) & 1);
      lv[c] = z[G] + acc;
    }
    const int j1 = j0 + g < in ? j0 + g : in;
    int j = j0;
    if (j0 % 8 == 0)
      for (; j + 8 <= j1; j += 8) {
        const uint64_t c = codes8(q, bits, plane, j >> 3);
        for (int k = 0; k < 8; ++k) w[j + k] = lv[(c >> (8 * k)) & 0xff];
      }
    for (; j < j1; ++j) w[j] = lv[code_at(q, bits, plane, j)];  // a group's tail that ends mid-byte
  }
}

// Per group: 8 float lanes per plane (and one for the plain sum) over its bytes, then summed in double.
ELUTQ_CLONES void grad_row(const uint8_t* q, size_t plane, const float* gw, int bits, int in, int g, float* gs,
                           float* gz) {
  for (int j0 = 0, G = 0; j0 < in; j0 += g, ++G) {
    const int j1 = j0 + g < in ? j0 + g : in;
    float lane[9][8] = {};
    double acc[9] = {};
    int j = j0;
    if (j0 % 8 == 0)
      for (; j + 8 <= j1; j += 8) {
        const float* x = gw + j;
        for (int k = 0; k < 8; ++k) lane[bits][k] += x[k];
        for (int i = 0; i < bits; ++i) {
          const float* m = kT.bits[q[i * plane + (j >> 3)]];
          for (int k = 0; k < 8; ++k) lane[i][k] += x[k] * m[k];
        }
      }
    for (; j < j1; ++j) {
      const int c = code_at(q, bits, plane, j);
      acc[bits] += gw[j];
      for (int i = 0; i < bits; ++i) acc[i] += ((c >> i) & 1) ? gw[j] : 0.0;
    }
    for (int i = 0; i <= bits; ++i)
      for (int k = 0; k < 8; ++k) acc[i] += lane[i][k];
    for (int i = 0; i < bits; ++i) gs[(size_t)G * bits + i] = (float)acc[i];
    gz[G] = (float)acc[bits];
  }
}

}  // namespace

void hlq_decode(const uint8_t* q, const float* s, const float* z, int bits, int out, int in, int g, float* w,
                int threads) {
  const size_t nb = (size_t)(in + 7) / 8, ng = (size_t)(in + g - 1) / g, plane = (size_t)out * nb;
  parallel_for(threads, out, 16, [&](int r0, int r1) {
    for (int o = r0; o < r1; ++o)
      decode_row(q + o * nb, plane, s + o * ng * bits, z + o * ng, bits, in, g, w + (size_t)o * in);
  });
}

void hlq_decode_grad(const uint8_t* q, const float* gw, int bits, int out, int in, int g, float* gs, float* gz,
                     int threads) {
  const size_t nb = (size_t)(in + 7) / 8, ng = (size_t)(in + g - 1) / g, plane = (size_t)out * nb;
  parallel_for(threads, out, 16, [&](int r0, int r1) {
    for (int o = r0; o < r1; ++o)
      grad_row(q + o * nb, plane, gw + (size_t)o * in, bits, in, g, gs + o * ng * bits, gz + o * ng);
  });
}

}  // namespace elutq
