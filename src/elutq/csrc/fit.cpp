// See fit.h.  Levels are at most 16 (bits <= 4), so sorting and the nearest-level search are plain loops.
#include "fit.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"
#include "lut_driver.h"

namespace elutq {

namespace {

constexpr int kMaxBits = 4;

// levels lv[c] = z + Σ_i s_i·bit_i(c), summed in order i = 0, 1, ... (hlq.levels: the same floats)
inline void make_levels(const float* s, float z, int bits, float* lv) {
  for (int c = 0; c < (1 << bits); ++c) {
    float acc = 0.0f;
    for (int i = 0; i < bits; ++i) acc = acc + s[i] * (float)((c >> i) & 1);
    lv[c] = z + acc;
  }
}

// Σ h·(w − lv[code])² (8 float lanes, then summed in double: a loop that vectorizes)
ELUTQ_CLONES double sq_error(const float* w, const float* h, const uint8_t* code, const float* lv, int g) {
  float lane[8] = {};
  int j = 0;
  for (; j + 8 <= g; j += 8)
    for (int k = 0; k < 8; ++k) {
      const float d = w[j + k] - lv[code[j + k]];
      lane[k] += d * d * h[j + k];
    }
  double e = 0.0;
  for (; j < g; ++j) {
    const float d = w[j] - lv[code[j]];
    e += (double)(d * d * h[j]);
  }
  for (int k = 0; k < 8; ++k) e += lane[k];
  return e;
}

// Each weight's nearest level (hlq.assign_nearest: levels sorted, the first midpoint at or above the weight,
// i.e. the number of midpoints below it — counted branch-free, so the loop over weights vectorizes).
ELUTQ_CLONES void assign(const float* w, const float* lv, int bits, int g, uint8_t* code) {
  const int k = 1 << bits;
  int ord[1 << kMaxBits];
  for (int c = 0; c < k; ++c) ord[c] = c;
  for (int a = 1; a < k; ++a)  // insertion sort by level
    for (int b = a; b > 0 && lv[ord[b]] < lv[ord[b - 1]]; --b) std::swap(ord[b], ord[b - 1]);
  float mid[1 << kMaxBits];
  for (int c = 0; c + 1 < k; ++c) mid[c] = (lv[ord[c + 1]] + lv[ord[c]]) * 0.5f;
  for (int j = 0; j < g; ++j) code[j] = 0;
  for (int c = 0; c + 1 < k; ++c) {
    const float m = mid[c];
    for (int j = 0; j < g; ++j) code[j] += (uint8_t)(m < w[j]);
  }
  uint8_t map[1 << kMaxBits];
  for (int c = 0; c < k; ++c) map[c] = (uint8_t)ord[c];
  for (int j = 0; j < g; ++j) code[j] = map[code[j]];
}

// [s; z] minimising Σ h·(w − lv[code])² for fixed codes; false where the system has no finite solution.
bool solve(const float* w, const float* h, const uint8_t* code, int bits, int g, float* s, float* z) {
  const int k = 1 << bits, m = bits + 1;
  double mass[1 << kMaxBits] = {}, moment[1 << kMaxBits] = {};
  for (int j = 0; j < g; ++j) {
    mass[code[j]] += (double)h[j];
    moment[code[j]] += (double)h[j] * (double)w[j];
  }
  double a[kMaxBits + 1][kMaxBits + 2] = {};  // [gram | rhs]; column `bits` of P is the offset's 1
  for (int c = 0; c < k; ++c) {
    double p[kMaxBits + 1];
    for (int i = 0; i < bits; ++i) p[i] = (double)((c >> i) & 1);
    p[bits] = 1.0;
    for (int r = 0; r < m; ++r) {
      for (int q = 0; q < m; ++q) a[r][q] += p[r] * mass[c] * p[q];
      a[r][m] += p[r] * moment[c];
    }
  }
  double diag = 0.0;
  for (int r = 0; r < m; ++r) diag += a[r][r];
  const double ridge = 1e-9 * std::fmax(diag / m, 1e-30);
  for (int r = 0; r < m; ++r) a[r][r] += ridge;
  for (int c = 0; c < m; ++c) {  // Gaussian elimination, partial pivoting
    int piv = c;
    for (int r = c + 1; r < m; ++r)
      if (std::fabs(a[r][c]) > std::fabs(a[piv][c])) piv = r;
    if (a[piv][c] == 0.0) return false;
    if (piv != c)
      for (int q = 0; q <= m; ++q) std::swap(a[c][q], a[piv][q]);
    for (int r = c + 1; r < m; ++r) {
      const double f = a[r][c] / a[c][c];
      for (int q = c; q <= m; ++q) a[r][q] -= f * a[c][q];
    }
  }
  double x[kMaxBits + 1];
  for (int r = m - 1; r >= 0; --r) {
    double v = a[r][m];
    for (int q = r + 1; q < m; ++q) v -= a[r][q] * x[q];
    x[r] = v / a[r][r];
    if (!std::isfinite(x[r])) return false;
  }
  for (int i = 0; i < bits; ++i) s[i] = (float)x[i];
  *z = (float)x[bits];
  return true;
}

void fit_group(const float* w, const float* h, int g, int bits, int iters, uint8_t* code, float* s_out,
               float* z_out) {
  const int k = 1 << bits;
  float lo = w[0], hi = w[0];
  for (int j = 1; j < g; ++j) {
    lo = std::fmin(lo, w[j]);
    hi = std::fmax(hi, w[j]);
  }
  // min-max uniform start (hlq.fit_uniform_minmax, hlq.uniform_codes)
  const float delta = (hi - lo) / (float)(k - 1), safe = delta == 0.0f ? 1.0f : delta;
  float s[kMaxBits], z = lo, lv[1 << kMaxBits];
  for (int i = 0; i < bits; ++i) s[i] = delta * (float)(1 << i);
  for (int j = 0; j < g; ++j) {
    const float q = std::nearbyint((w[j] - z) / safe);  // round half to even, as torch.round
    code[j] = (uint8_t)(q < 0.0f ? 0.0f : q > (float)(k - 1) ? (float)(k - 1) : q);
  }
  make_levels(s, z, bits, lv);
  double err = sq_error(w, h, code, lv, g);
  for (int it = 0; it < iters; ++it) {
    assign(w, lv, bits, g, code);
    float ns[kMaxBits], nz, nlv[1 << kMaxBits];
    if (!solve(w, h, code, bits, g, ns, &nz)) break;
    make_levels(ns, nz, bits, nlv);
    const double e = sq_error(w, h, code, nlv, g);
    if (!(e < err)) break;  // not better (or NaN): keep the parameters, and the next step would repeat this one
    err = e;
    z = nz;
    for (int i = 0; i < bits; ++i) s[i] = ns[i];
    for (int c = 0; c < k; ++c) lv[c] = nlv[c];
  }
  for (int i = 0; i < bits; ++i) s_out[i] = s[i];
  *z_out = z;
}

}  // namespace

void hlq_assign(const float* w, const float* s, const float* z, long n, int g, int bits, uint8_t* codes, int threads) {
  const int chunk = g >= 1024 ? 4 : 64;
  parallel_for(threads, (int)((n + chunk - 1) / chunk), 1, [&](int t0, int t1) {
    float lv[1 << kMaxBits];
    for (long r = (long)t0 * chunk; r < std::min(n, (long)t1 * chunk); ++r) {
      make_levels(s + r * bits, z[r], bits, lv);
      assign(w + r * g, lv, bits, g, codes + r * g);
    }
  });
}

void hlq_dequantize(const uint8_t* codes, const float* s, const float* z, int out, int in, int g, int bits, float* w,
                    int threads) {
  const int ng = (in + g - 1) / g;
  parallel_for(threads, out, 16, [&](int r0, int r1) {
    float lv[1 << kMaxBits];
    for (int r = r0; r < r1; ++r)
      for (int G = 0; G < ng; ++G) {
        make_levels(s + ((size_t)r * ng + G) * bits, z[(size_t)r * ng + G], bits, lv);
        const int j1 = std::min(in, (G + 1) * g);
        for (int j = G * g; j < j1; ++j) w[(size_t)r * in + j] = lv[codes[(size_t)r * in + j]];
      }
  });
}

void hlq_fit_als(const float* w, const float* h, long n, int p, int g, int bits, int iters, float* s, float* z,
                 int threads) {
  const int chunk = g >= 1024 ? 4 : 64;  // groups per task
  const long tasks = (n + chunk - 1) / chunk;
  parallel_for(threads, (int)tasks, 1, [&](int t0, int t1) {
    std::vector<uint8_t> code(g);
    const long a = (long)t0 * chunk, b = std::min(n, (long)t1 * chunk);
    for (long r = a; r < b; ++r)
      fit_group(w + r * g, h + (r % p) * g, g, bits, iters, code.data(), s + r * bits, z + r);
  });
}

}  // namespace elutq
