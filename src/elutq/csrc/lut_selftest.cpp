// Standalone self-test of the LUT kernels (no Python): used by scripts/test_neon.sh, which
// cross-compiles it for AArch64 and runs it under qemu-user.  Not part of the Python extension.
//
// For random matrices in the kernel layout (lut.h) it checks, for every path this CPU has:
//   1. the scalar float-table kernel against a float64 product computed straight from the layout
//      definition (so the layout interpretation itself is checked), rel. error < 1e-5;
//   2. each SIMD int8-table kernel against the scalar int8-table kernel (identical integer sums;
//      only fp32 rounding in the epilogue may differ), rel. error < 1e-5;
//   3. exactness for small-integer data (every run's grid step 1, integer scales/zeros);
//   4. the threaded multi-column driver (lut_matmul) equals per-column GEMV, 1 vs 2 threads;
//   5. each path's attention kernel (attention_kernel, attend_columns) against the scalar one over
//      fp16 K/V with GQA, rel. error < 1e-5.
// Exit status 0 on success, 1 on any mismatch.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "attention.h"
#include "lut_driver.h"

using namespace elutq;

namespace {

int g_failures = 0;

void check(bool ok, const char* what, double val) {
  if (!ok) {
    std::printf("FAIL %s (%g)\n", what, val);
    ++g_failures;
  }
}

struct Matrix {
  std::vector<uint8_t> w;
  std::vector<uint16_t> sz;
  LutWeight W;
};

uint16_t fp16_bits(float v) {  // exact for the values used here (small integers and 2^-k multiples)
  if (v == 0.0f) return 0;
  uint32_t b;
  std::memcpy(&b, &v, 4);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const int exp = (int)((b >> 23) & 0xFF) - 127 + 15;
  const uint32_t man = (b >> 13) & 0x3FFu;
  return (uint16_t)(sign | ((uint32_t)exp << 10) | man);
}

Matrix random_matrix(int out, int in, int bits, int g, std::mt19937& rng, bool integer) {
  Matrix m;
  LutWeight& W = m.W;
  W.out = out;
  W.in = in;
  W.bits = bits;
  W.g = g;
  W.ng = (in + g - 1) / g;
  m.w.resize((size_t)W.nrb() * W.w_bytes_per_rb());
  m.sz.resize((size_t)W.nrb() * W.sz_elems_per_rb());
  for (auto& b : m.w) b = (uint8_t)(rng() & 0xFF);
  std::uniform_int_distribution<int> small(-8, 8), pos(1, 4), mant(0, 1023), ex(6, 13);
  for (size_t e = 0; e < m.sz.size(); ++e) {
    if (integer)
      m.sz[e] = fp16_bits((float)((e / 16) % (bits + 1) == (size_t)bits ? small(rng) : pos(rng)));
    else
      m.sz[e] = (uint16_t)(((rng() & 1) << 15) | (ex(rng) << 10) | mant(rng));
  }
  W.w = m.w.data();
  W.sz = m.sz.data();
  return m;
}

// y = W x in float64 straight from the layout definition in lut.h.
std::vector<double> layout_reference(const LutWeight& W, const float* x) {
  std::vector<double> y(W.out, 0.0);
  const int nl = W.g / 32;
  for (int rb = 0; rb < W.nrb(); ++rb)
    for (int G = 0; G < W.ng; ++G) {
      const uint16_t* sp = W.sz + (size_t)rb * W.sz_elems_per_rb() + (size_t)G * (W.bits + 1) * 16;
      for (int m = 0; m < 16; ++m) {
        const int r = rb * 16 + m;
        if (r >= W.out) continue;
        double acc = 0.0, xs = 0.0;
        for (int c = G * W.g; c < std::min(W.in, (G + 1) * W.g); ++c) xs += x[c];
        acc += fp16_to_float(sp[W.bits * 16 + m]) * xs;
        for (int i = 0; i < W.bits; ++i)
          for (int L = 0; L < nl; ++L) {
            const uint8_t* chunk = W.w + (size_t)rb * W.w_bytes_per_rb() +
                                   (((size_t)G * W.bits + i) * nl + L) * kChunkBytes;
            for (int j = 0; j < 4; ++j)
              for (int h = 0; h < 2; ++h) {
                const int nib = (chunk[4 * m + j] >> (4 * h)) & 15;
                const int k = G * W.g / 4 + 8 * L + 4 * h + j;
                for (int t = 0; t < 4; ++t) {
                  const int c = 4 * k + t;
                  if (((nib >> t) & 1) && c < W.in) acc += fp16_to_float(sp[16 * i + m]) * x[c];
                }
              }
          }
        y[r] += acc;
      }
    }
  return y;
}

double rel_err(const float* a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

void run_case(int out, int in, int bits, int g, std::mt19937& rng) {
  Matrix M = random_matrix(out, in, bits, g, rng, false);
  const LutWeight& W = M.W;
  std::normal_distribution<float> nd;
  std::vector<float> x(in);
  for (auto& v : x) v = nd(rng);
  const int ng = W.ng;
  std::vector<int8_t> tq((size_t)ng * g * 4);
  std::vector<uint8_t> tm((size_t)ng * g / 4);
  std::vector<float> tf((size_t)ng * g * 4), ls(ng), xs(ng), xsf(ng);

  // 1. float tables vs the layout definition
  build_float_tables_scalar(x.data(), in, g, ng, tf.data(), xsf.data());
  LutTables TF;
  TF.tf = tf.data();
  TF.xsum = xsf.data();
  std::vector<float> yf(out);
  gemv_rows_float_scalar(W, TF, 0, W.nrb(), yf.data());
  const std::vector<double> ref = layout_reference(W, x.data());
  double e = rel_err(yf.data(), ref);
  check(e < 1e-5, "float-table vs layout reference", e);

  // 2. every SIMD path vs scalar int8
  build_tables_scalar(x.data(), in, g, ng, tq.data(), tm.data(), (size_t)g * 4, ls.data(), xs.data());
  LutTables T;
  T.tq = tq.data();
  T.tm = tm.data();
  T.gstride = (size_t)g * 4;
  T.lut_scale = ls.data();
  T.xsum = xs.data();
  std::vector<float> ys(out);
  gemv_rows_scalar(W, T, 0, W.nrb(), ys.data());
  std::vector<double> ysd(ys.begin(), ys.end());
  for (Path p : available_paths()) {
    if (p == Path::Scalar) continue;
    std::vector<int8_t> tq2(tq.size());
    std::vector<uint8_t> tm2(tm.size());
    std::vector<float> ls2(ng), xs2(ng), y(out);
    build_tables(p, x.data(), in, g, ng, tq2.data(), tm2.data(), (size_t)g * 4, ls2.data(), xs2.data());
    check(tq2 == tq && tm2 == tm && ls2 == ls && xs2 == xs, "tables identical to scalar", 0);
    std::vector<float*> outs{y.data()};
    lut_matmul({W}, x.data(), 1, outs, p, false, 1);
    e = rel_err(y.data(), ysd);
    if (e >= 1e-5) std::printf("  path %s out=%d in=%d bits=%d g=%d\n", path_name(p), out, in, bits, g);
    check(e < 1e-5, "SIMD int8 vs scalar int8", e);
  }

  // 3. exact small-integer case
  Matrix MI = random_matrix(out, in, bits, g, rng, true);
  std::uniform_int_distribution<int> xi(-31, 31);
  // every run (4 columns) has Σ|x| = 127, so every run's grid step is 1 (lut.h: group_mults)
  for (int c0 = 0; c0 < in; c0 += 4) {
    const int n4 = in - c0 < 4 ? in - c0 : 4;
    int left = 127;
    for (int t = 0; t + 1 < n4; ++t) {
      x[c0 + t] = (float)xi(rng);
      left -= (int)std::fabs(x[c0 + t]);
    }
    x[c0 + n4 - 1] = (float)(xi(rng) < 0 ? -left : left);
  }
  const std::vector<double> refi = layout_reference(MI.W, x.data());
  for (Path p : available_paths()) {
    std::vector<float> y(out);
    std::vector<float*> outs{y.data()};
    lut_matmul({MI.W}, x.data(), 1, outs, p, false, 1);
    bool exact = true;
    for (int r = 0; r < out; ++r) exact = exact && (double)y[r] == refi[r];
    if (!exact) std::printf("  path %s out=%d in=%d bits=%d g=%d\n", path_name(p), out, in, bits, g);
    check(exact, "exact for small-integer activations", 0);
  }
}

void run_driver_case(std::mt19937& rng) {
  const int out = 300, in = 576, bits = 3, g = 64, n = 5;
  Matrix A = random_matrix(out, in, bits, g, rng, false), B = random_matrix(40, in, bits, g, rng, false);
  std::normal_distribution<float> nd;
  std::vector<float> X((size_t)n * in);
  for (auto& v : X) v = nd(rng);
  for (Path p : available_paths()) {
    std::vector<float> ya1((size_t)n * out), yb1((size_t)n * 40), ya2(ya1.size()), yb2(yb1.size()), yv(out);
    set_num_threads(1);
    lut_matmul({A.W, B.W}, X.data(), n, {ya1.data(), yb1.data()}, p, false);
    set_num_threads(2);
    lut_matmul({A.W, B.W}, X.data(), n, {ya2.data(), yb2.data()}, p, false);
    check(ya1 == ya2 && yb1 == yb2, "1 vs 2 threads identical", 0);
    for (int c = 0; c < n; ++c) {
      lut_matmul({A.W}, X.data() + (size_t)c * in, 1, {yv.data()}, p, false);
      check(std::memcmp(yv.data(), ya2.data() + (size_t)c * out, out * sizeof(float)) == 0, "GEMM column == GEMV",
            c);
    }
  }
}

// out = softmax(q·Kᵀ·scale)·V for grp query rows over len positions (K/V rows `stride` halves apart),
// each SIMD path against attend_scalar; then 3 columns at once (attend_columns) against one at a time.
void run_attention_cases(std::mt19937& rng) {
  std::normal_distribution<float> nd;
  for (int D : {32, 64, 128, 256})
    for (int grp : {1, 4, 7})
      for (int len : {1, 5, 33, 300}) {
        const size_t stride = (size_t)D * 3;  // as a head-major cache with other heads between
        std::vector<uint16_t> k(stride * len), v(stride * len);
        for (auto& h : k) h = float_to_fp16(nd(rng));
        for (auto& h : v) h = float_to_fp16(nd(rng));
        std::vector<float> q((size_t)3 * grp * D), sc((size_t)3 * grp * len), ref((size_t)3 * grp * D);
        for (auto& x : q) x = nd(rng);
        const float scale = 1.0f / std::sqrt((float)D);
        attend_scalar(q.data(), k.data(), v.data(), stride, len, D, grp, scale, sc.data(), ref.data());
        for (Path p : available_paths()) {
          std::vector<float> got(ref.size());
          attention_kernel(p, D)(q.data(), k.data(), v.data(), stride, len, D, grp, scale, sc.data(), got.data());
          double num = 0, den = 0;
          for (int e = 0; e < grp * D; ++e) {
            num += ((double)got[e] - ref[e]) * ((double)got[e] - ref[e]);
            den += (double)ref[e] * ref[e];
          }
          check(std::sqrt(num / den) < 1e-5, "attention vs scalar", std::sqrt(num / den));
          if (len < 3) continue;
          std::vector<float> one(ref.size()), cols(ref.size());
          for (int c = 0; c < 3; ++c)
            attention_kernel(p, D)(q.data() + (size_t)c * grp * D, k.data(), v.data(), stride, len - 2 + c, D, grp,
                                   scale, sc.data(), one.data() + (size_t)c * grp * D);
          attend_columns(p, q.data(), k.data(), v.data(), stride, len, D, grp, 3, scale, sc.data(), cols.data());
          check(one == cols, "attention columns == one at a time", len);
        }
      }
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  std::printf("paths:");
  for (Path p : available_paths()) std::printf(" %s", path_name(p));
  std::printf("\n");
  const int shapes[][2] = {{37, 576}, {16, 128}, {50, 200}, {33, 96}, {5, 40}};
  int cases = 0;
  for (int bits = 1; bits <= 4; ++bits)
    for (int g : {32, 64, 128})
      for (const auto& s : shapes) {
        run_case(s[0], s[1], bits, g, rng);
        ++cases;
      }
  run_driver_case(rng);
  run_attention_cases(rng);
  std::printf("%d cases, %d failures\n", cases, g_failures);
  return g_failures ? 1 : 0;
}
