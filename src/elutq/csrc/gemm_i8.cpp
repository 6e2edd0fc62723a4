// The int8 prefill GEMM's driver (activation quantization, the split over threads) and its scalar
// reference kernel (gemm_i8.h has the math and layouts; gemm_i8_avx512.cpp is the fast path, equal to
// this one bit for bit).  Compiled for the baseline ISA.
#include "gemm_i8.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "lut_driver.h"

namespace elutq {

namespace {

// Round to nearest, ties to even, for |v| < 2^22 (adding 1.5·2^23 leaves the integer part in the low mantissa
// bits): what nearbyint does in the default rounding mode, inline and vectorizable (a libm call per
// weight or activation cost more than the dot products).
// (The build has no -ffast-math, which would fold the two additions away.)
static inline float round_even(float v) {
  return (v + 12582912.0f) - 12582912.0f;
}

// Column x's groups → xq (the panel's byte order), σ, Σx and 128·Σxq.
void quantize_column(const float* x, int in, int g, int ng, int8_t* xq, float* sx, float* xs, int32_t* cq) {
  for (int G = 0; G < ng; ++G) {
    const int c0 = G * g, c1 = std::min(in, c0 + g);
    float a = 0.0f, sum = 0.0f;
    for (int i = c0; i < c1; ++i) {
      a = std::max(a, std::fabs(x[i]));
      sum += x[i];
    }
    const float inv = a > 0.0f ? 127.0f / a : 0.0f;
    int32_t qsum = 0;
    for (int b = c0; b < c0 + g; b += 16)
      for (int j = 0; j < 4; ++j)
        for (int t = 0; t < 4; ++t) {
          const int i = b + 4 * j + t;
          const int q = i < c1 ? (int)round_even(x[i] * inv) : 0;  // |x·127/a| <= 127
          xq[b + 4 * t + j] = (int8_t)q;
          qsum += q;
        }
    sx[G] = a / 127.0f;
    xs[G] = sum;
    cq[G] = 128 * qsum;
  }
}

}  // namespace

void i8_group_levels(const LutWeight& W, int rb, int G, uint8_t* lvq, float* dm, float* mid) {
  const uint16_t* sp = W.sz + (size_t)rb * W.sz_elems_per_rb() + (size_t)G * (W.bits + 1) * kRowBlock;
  for (int m = 0; m < kRowBlock; ++m) {
    float s[4], lv[16];
    for (int i = 0; i < W.bits; ++i) s[i] = fp16_to_float(sp[i * kRowBlock + m]);
    const float z = fp16_to_float(sp[W.bits * kRowBlock + m]);
    float lo = z, hi = z;
    for (int c = 0; c < (1 << W.bits); ++c) {
      float acc = 0.0f;
      for (int i = 0; i < W.bits; ++i)
        if (c >> i & 1) acc += s[i];
      lv[c] = z + acc;
      lo = lv[c] < lo ? lv[c] : lo;
      hi = lv[c] > hi ? lv[c] : hi;
    }
    const float d = (hi - lo) / 254.0f, inv = d > 0.0f ? 1.0f / d : 0.0f, md = 0.5f * (lo + hi);
    for (int c = 0; c < 16; ++c) {
      const float q = c < (1 << W.bits) ? round_even((lv[c] - md) * inv) : 0.0f;
      lvq[16 * m + c] = (uint8_t)(128 + (q > 127.0f ? 127 : q < -127.0f ? -127 : (int)q));
    }
    dm[m] = d;
    mid[m] = md;
  }
}

void i8_rows_scalar(const LutWeight& W, const I8Acts& A, int rb0, int rb1, float* y, size_t ldy) {
  const int ng = W.ng, nl = W.g / 32, steps = W.g / 4;  // k-steps per group
  std::vector<uint8_t> panel((size_t)A.in_pad * 16), lvq(16 * 16);
  std::vector<float> dm((size_t)ng * 16), mid((size_t)ng * 16);
  for (int rb = rb0; rb < rb1; ++rb) {
    const uint8_t* wp = W.w + (size_t)rb * W.w_bytes_per_rb();
    for (int G = 0; G < ng; ++G) {
      i8_group_levels(W, rb, G, lvq.data(), &dm[16 * G], &mid[16 * G]);
      for (int L = 0; L < nl; ++L)
        for (int h = 0; h < 2; ++h)
          for (int t = 0; t < 4; ++t) {
            uint8_t* ps = &panel[(size_t)(G * steps + 8 * L + 4 * h + t) * 64];
            for (int m = 0; m < 16; ++m)
              for (int j = 0; j < 4; ++j) {
                int code = 0;
                for (int i = 0; i < W.bits; ++i) {
                  const uint8_t byte = wp[((size_t)(G * W.bits + i) * nl + L) * 64 + chunk_byte(W.avx2_order, m, j)];
                  code |= ((byte >> (4 * h + t)) & 1) << i;
                }
                ps[4 * m + j] = lvq[16 * m + code];
              }
          }
    }
    const int rows = std::min(16, W.out - 16 * rb);
    for (int c = 0; c < A.n; ++c) {
      const int8_t* xc = A.xq + (size_t)c * A.in_pad;
      float acc[16] = {0};
      for (int ag = 0; ag < A.ng; ++ag) {  // activation groups; weight group G
        const int G = ag * kActGroup / W.g;
        int32_t dot[16] = {0};
        for (int s = ag * kActSteps; s < (ag + 1) * kActSteps; ++s)
          for (int m = 0; m < 16; ++m)
            for (int j = 0; j < 4; ++j) dot[m] += (int32_t)panel[(size_t)s * 64 + 4 * m + j] * xc[4 * s + j];
        const size_t cg = (size_t)c * A.ng + ag;
        for (int m = 0; m < 16; ++m) {
          acc[m] = std::fma((float)(dot[m] - A.cq[cg]), dm[16 * G + m] * A.sx[cg], acc[m]);
          acc[m] = std::fma(mid[16 * G + m], A.xs[cg], acc[m]);
        }
      }
      for (int m = 0; m < rows; ++m) y[(size_t)c * ldy + 16 * rb + m] = acc[m];
    }
  }
}

void i8_matmul(const std::vector<LutWeight>& Ws, const float* X, int n, const std::vector<float*>& ys, Path p,
               int max_threads) {
  if (Ws.empty() || n <= 0) return;
  if (ys.size() != Ws.size()) throw std::invalid_argument("i8_matmul: one output per matrix");
  const LutWeight& W0 = Ws[0];
  for (const auto& W : Ws)
    if (W.in != W0.in || W.g != W0.g) throw std::invalid_argument("i8_matmul: matrices need equal in and group size");
  const int in = W0.in, in_pad = W0.ng * W0.g, ng = in_pad / kActGroup;  // activation groups
  thread_local AlignedBuf xq_buf, f_buf, cq_buf;
  xq_buf.resize((size_t)n * in_pad, false);
  f_buf.resize(sizeof(float) * 2 * (size_t)n * ng, false);
  cq_buf.resize(sizeof(int32_t) * (size_t)n * ng, false);
  // (raw pointers: inside the workers' lambdas the thread_local names would be the workers' own buffers)
  int8_t* xq = (int8_t*)xq_buf.p;
  float* sx = (float*)f_buf.p;
  float* xs = sx + (size_t)n * ng;
  int32_t* cq = (int32_t*)cq_buf.p;
  const I8Acts A{xq, sx, xs, cq, n, ng, in_pad};
  const int pool_size = pool().size();
  const int nt = std::max(1, std::min(max_threads > 0 ? max_threads : pool_size, pool_size));
  parallel_for(nt, n, 8, [&](int c0, int c1) {
    for (int c = c0; c < c1; ++c)
      quantize_column(X + (size_t)c * in, in, kActGroup, ng, xq + (size_t)c * in_pad, sx + (size_t)c * ng, xs + (size_t)c * ng,
                      cq + (size_t)c * ng);
  });
  std::vector<int> base(Ws.size() + 1, 0);
  for (size_t w = 0; w < Ws.size(); ++w) base[w + 1] = base[w] + Ws[w].nrb();
  parallel_for(nt, base.back(), 1, [&](int b0, int b1) {
    for (size_t w = 0; w < Ws.size(); ++w) {
      const int lo = std::max(b0 - base[w], 0), hi = std::min(b1 - base[w], Ws[w].nrb());
      if (lo >= hi) continue;
#if defined(__x86_64__) || defined(_M_X64)
      if (p == Path::Avx512) {
        i8_rows_avx512(Ws[w], A, lo, hi, ys[w], Ws[w].out);
        continue;
      }
#endif
      i8_rows_scalar(Ws[w], A, lo, hi, ys[w], Ws[w].out);
    }
  });
}

bool i8_prefill_pays(const std::vector<LutWeight>& Ws, int n, Path p) {
  const char* env = std::getenv("ELUTQ_PREFILL");  // (read per call: tests switch it)
  const std::string mode = env ? env : "auto";
  if (p != Path::Avx512 || mode != "int8" || Ws.empty() || Ws[0].avx2_order) return false;
  return n >= 2;  // an experiment, off by default (docs/KERNELS.md): less accurate than the LUT kernels
}

}  // namespace elutq
