// Portable scalar reference for the LUT kernels (the other paths must match it).
//
// Shapes and layouts: see lut.h.  x [in] fp32 → tq int8 [in_pad/4][16], lut_scale/xsum f32 [ng];
// W repacked as w uint8 [nrb][ng][bits][g/32][64], sz fp16 [nrb][ng][bits+1][16]; y f32 [out].
//
// The integer part (tables and per-plane lookup sums) is bit-identical across all paths; only the
// final float epilogue (order of fp32 multiply-adds) may differ by rounding.
#include <cmath>
#include <cstring>

#include "lut.h"

namespace elutq {

// Signed table of one run for the int8 path: U[m] = Σ_t (2·bit_t(m) − 1)·x_t, summed in the order
// t = 0..3 as ((±x0 ± x1) ± x2) ± x3 (all paths do the same, so the int8 tables are identical
// everywhere).  U = 2T − Σx_run is antisymmetric (U[15−m] = −U[m]) and its range Σ|x| is centred,
// which halves the rounding error of the {0,1} table's worst case.
static inline void run_table_signed(const float* x4, float* t) {
  for (int m = 0; m < 16; ++m) {
    float v = (m & 1) ? x4[0] : -x4[0];
    v += (m & 2) ? x4[1] : -x4[1];
    v += (m & 4) ? x4[2] : -x4[2];
    v += (m & 8) ? x4[3] : -x4[3];
    t[m] = v;
  }
}

// Table of one run for the float path: T[m] = Σ_t bit_t(m)·x_t.
static inline void run_table(const float* x4, float* t) {
  for (int m = 0; m < 16; ++m) {
    float v = 0.0f;
    if (m & 1) v += x4[0];
    if (m & 2) v += x4[1];
    if (m & 4) v += x4[2];
    if (m & 8) v += x4[3];
    t[m] = v;
  }
}

// The activations of group G, zero-padded to g values.
static inline void group_x(const float* x, int in, int g, int G, float* xg) {
  for (int c = 0; c < g; ++c) {
    const int col = G * g + c;
    xg[c] = col < in ? x[col] : 0.0f;
  }
}

// Σx of a group in the canonical order every path uses: per run (x0+x1)+(x2+x3), runs added into
// 4 partial sums by k mod 4, combined as (p0+p1)+(p2+p3).
static inline float group_sum(const float* xg, int g) {
  float p[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int k = 0; k < g / 4; ++k) p[k & 3] += (xg[4 * k] + xg[4 * k + 1]) + (xg[4 * k + 2] + xg[4 * k + 3]);
  return (p[0] + p[1]) + (p[2] + p[3]);
}

void build_tables_scalar(const float* x, int in, int g, int ng, int8_t* tq, uint8_t* tm, size_t gstride,
                         float* lut_scale, float* xsum) {
  float xg[128];
  float t[32 * 16], peak[32];
  for (int G = 0; G < ng; ++G) {
    group_x(x, in, g, G, xg);
    float amax = 0.0f;
    const float s = group_sum(xg, g);
    for (int k = 0; k < g / 4; ++k) {
      run_table_signed(xg + 4 * k, t + 16 * k);
      peak[k] = run_peak(xg + 4 * k);
      amax = std::fmax(amax, peak[k]);
    }
    int8_t* q = tq + (size_t)G * gstride;
    uint8_t* mult = tm + (size_t)G * gstride / 16;
    const int B = group_mults(peak, g / 4, amax, mult);
    const float c = amax > 0.0f ? 127.0f * (float)B / amax : 0.0f;
    for (int k = 0; k < g / 4; ++k) {
      const float inv_k = c / (float)mult[k];
      for (int m = 0; m < 16; ++m) q[16 * k + m] = (int8_t)std::nearbyint(t[16 * k + m] * inv_k);
    }
    lut_scale[G] = amax / (254.0f * (float)B);  // (b·x) = lut_scale·Σ mult·q + Σx/2
    xsum[G] = s;
  }
}

void build_float_tables_scalar(const float* x, int in, int g, int ng, float* tf, float* xsum) {
  float xg[128];
  for (int G = 0; G < ng; ++G) {
    group_x(x, in, g, G, xg);
    const float s = group_sum(xg, g);
    for (int k = 0; k < g / 4; ++k) run_table(xg + 4 * k, tf + (size_t)G * g * 4 + 16 * k);
    xsum[G] = s;
  }
}

// Not the reference's summation order: U is recomputed as Σ_t sign(m, t)·x_t, 16 entries in one vector
// (a 1-ulp difference from the table's own U moves the residual by 1 ulp, far below its grid).
ELUTQ_CLONES void build_residual_tables_scalar(const float* x, int in, int g, int ng, const int8_t* tq,
                                               const uint8_t* tm, size_t gstride, const float* lut_scale,
                                               int8_t* tq2) {
  static constexpr float kSign[4][16] = {
      {-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1},
      {-1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1},
      {-1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1},
      {-1, -1, -1, -1, -1, -1, -1, -1, 1, 1, 1, 1, 1, 1, 1, 1},
  };  // kSign[t][m] = 2·bit_t(m) − 1
  float xg[128];
  for (int G = 0; G < ng; ++G) {
    const int8_t* q = tq + (size_t)G * gstride;
    const uint8_t* mult = tm + (size_t)G * gstride / 16;
    int8_t* q2 = tq2 + (size_t)G * gstride;
    if (!(lut_scale[G] > 0.0f)) {  // an all-zero group: nothing to correct
      for (int e = 0; e < g * 4; ++e) q2[e] = 0;
      continue;
    }
    group_x(x, in, g, G, xg);
    for (int k = 0; k < g / 4; ++k) {
      const float x0 = xg[4 * k], x1 = xg[4 * k + 1], x2 = xg[4 * k + 2], x3 = xg[4 * k + 3];
      const float step = 2.0f * lut_scale[G] * (float)mult[k];  // one int8 unit of run k
      for (int m = 0; m < 16; ++m) {
        const float u = ((kSign[0][m] * x0 + kSign[1][m] * x1) + kSign[2][m] * x2) + kSign[3][m] * x3;
        // r / step first: |r| <= step/2 keeps it finite even when step is subnormal (254/step is not).
        float v = __builtin_rintf((u - step * (float)q[16 * k + m]) / step * 254.0f);
        v = v > 127.0f ? 127.0f : v;
        q2[16 * k + m] = (int8_t)(v < -127.0f ? -127.0f : v);
      }
    }
  }
}

// Store the 16 results of a row block, skipping padded rows.
static inline void store_rows(const float* y16, int rb, int out, float* y) {
  const int r0 = rb * kRowBlock;
  const int n = out - r0 < kRowBlock ? out - r0 : kRowBlock;
  for (int m = 0; m < n; ++m) y[r0 + m] = y16[m];
}

void gemv_rows_scalar(const LutWeight& W, const LutTables& T, int rb0, int rb1, float* y) {
  const int bits = W.bits, g = W.g, nl = g / 32;
  for (int rb = rb0; rb < rb1; ++rb) {
    const uint8_t* wp = W.w + (size_t)rb * W.w_bytes_per_rb();
    const uint16_t* sp = W.sz + (size_t)rb * W.sz_elems_per_rb();
    float y16[kRowBlock] = {0};
    for (int G = 0; G < W.ng; ++G) {
      const int8_t* tg = T.tq + (size_t)G * T.gstride;
      const uint8_t* mg = T.tm + (size_t)G * T.gstride / 16;
      float fsum[kRowBlock] = {0}, ssum[kRowBlock] = {0};
      for (int i = 0; i < bits; ++i) {
        int32_t acc[kRowBlock] = {0};
        for (int L = 0; L < nl; ++L, wp += kChunkBytes) {
          const int8_t* t0 = tg + L * 128;  // T[k0 .. k0+3]
          const int8_t* t1 = t0 + 64;       // T[k0+4 .. k0+7]
          const uint8_t* m0 = mg + 8 * L;   // mult[k0 .. k0+7]
          for (int m = 0; m < kRowBlock; ++m)
            for (int j = 0; j < 4; ++j) {
              const uint8_t b = wp[chunk_byte(W.avx2_order, m, j)];
              acc[m] += m0[j] * t0[16 * j + (b & 15)] + m0[4 + j] * t1[16 * j + (b >> 4)];
            }
        }
        for (int m = 0; m < kRowBlock; ++m) {
          const float s = fp16_to_float(sp[i * 16 + m]);
          fsum[m] += (float)acc[m] * s;
          ssum[m] += s;
        }
      }
      // y += lut_scale·Σ_i s_i·acc_i + (z + Σ_i s_i / 2)·Σx
      for (int m = 0; m < kRowBlock; ++m)
        y16[m] += fsum[m] * T.lut_scale[G] + (fp16_to_float(sp[bits * 16 + m]) + 0.5f * ssum[m]) * T.xsum[G];
      sp += (bits + 1) * 16;
    }
    store_rows(y16, rb, W.out, y);
  }
}

void gemv_rows_float_scalar(const LutWeight& W, const LutTables& T, int rb0, int rb1, float* y) {
  const int bits = W.bits, g = W.g, nl = g / 32;
  for (int rb = rb0; rb < rb1; ++rb) {
    const uint8_t* wp = W.w + (size_t)rb * W.w_bytes_per_rb();
    const uint16_t* sp = W.sz + (size_t)rb * W.sz_elems_per_rb();
    double y16[kRowBlock] = {0};
    for (int G = 0; G < W.ng; ++G) {
      const float* tg = T.tf + (size_t)G * g * 4;
      for (int i = 0; i < bits; ++i) {
        double acc[kRowBlock] = {0};
        for (int L = 0; L < nl; ++L, wp += kChunkBytes) {
          const float* t0 = tg + L * 128;
          const float* t1 = t0 + 64;
          for (int m = 0; m < kRowBlock; ++m)
            for (int j = 0; j < 4; ++j) {
              const uint8_t b = wp[chunk_byte(W.avx2_order, m, j)];
              acc[m] += (double)t0[16 * j + (b & 15)] + (double)t1[16 * j + (b >> 4)];
            }
        }
        for (int m = 0; m < kRowBlock; ++m) y16[m] += acc[m] * (double)fp16_to_float(sp[i * 16 + m]);
      }
      for (int m = 0; m < kRowBlock; ++m) y16[m] += (double)fp16_to_float(sp[bits * 16 + m]) * (double)T.xsum[G];
      sp += (bits + 1) * 16;
    }
    float yf[kRowBlock];
    for (int m = 0; m < kRowBlock; ++m) yf[m] = (float)y16[m];
    store_rows(yf, rb, W.out, y);
  }
}

}  // namespace elutq
