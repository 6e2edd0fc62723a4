// The decode loop (see runtime.h for shapes).  Matrices go through the LUT kernels (lut_matmul) or
// the dense fp16 kernels; everything else (norms, RoPE, attention, SwiGLU) is here, in fp32.
// Compiled for the baseline ISA; the few hot vector loops are cloned per ISA by the compiler
// (target_clones, chosen at load time by CPU detection), never by -march=native.
#include "runtime.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>

#include "attention.h"
#include "dense.h"

namespace elutq {

// ------------------------------------------------------------------------------ vector helpers
// 16 independent partial sums: vectorizable without reassociating a single chain.

ELUTQ_CLONES static void rmsnorm(const float* x, const float* w, float* y, int n, float eps) {
  float acc[16] = {0};
  int i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += x[i + j] * x[i + j];
  float ss = 0.0f;
  for (int j = 0; j < 16; ++j) ss += acc[j];
  for (; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.0f / std::sqrt(ss / (float)n + eps);
  for (i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

ELUTQ_CLONES static void add(float* y, const float* x, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] += x[i];
}

// e^x in plain float operations the compiler can vectorize (std::exp is a libm call per value):
// x = n·ln2 + r with |r| <= ln2/2 (ln2 split in two for an exact product), e^r by its degree-7
// Taylor polynomial (truncation < 1e-8 relative), 2^n from the exponent bits, so the error is a few
// fp32 roundings; inputs beyond [-87, 88] are clamped (e^-87 ~ 1.6e-38, e^88 ~ 1.7e38), which is
// exact enough for SiLU and sampling, its users.
static inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // (std::fmin/fmax would keep GCC from vectorizing)
  const float shift = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer in the low mantissa bits
  const float t = x * 1.44269504f + shift;
  int32_t ti;
  std::memcpy(&ti, &t, 4);
  const float n = t - shift;
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (int32_t)((uint32_t)((ti - 0x4B400000) + 127) << 23);  // 2^n (n in -126..127)
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// SiLU(g)·u in place over n values.
ELUTQ_CLONES static void swiglu(float* g, const float* u, size_t n) {
  for (size_t i = 0; i < n; ++i) g[i] = g[i] / (1.0f + exp_approx(-g[i])) * u[i];
}

static float* fbuf(AlignedBuf& b, size_t n) {
  b.resize(n * sizeof(float));
  return (float*)b.p;
}

// ------------------------------------------------------------------------------------ state

KVCache::KVCache(int n_layers_, int max_ctx_, int n_kv_heads_, int head_dim_)
    : n_layers(n_layers_), max_ctx(max_ctx_), n_kv_heads(n_kv_heads_), head_dim(head_dim_) {
  if (n_layers <= 0 || max_ctx <= 0 || n_kv_heads <= 0 || head_dim <= 0)
    throw std::invalid_argument("KV cache dimensions must be positive");
  // No huge pages: a short conversation touches the first few positions of every (layer, head) row of a
  // max_ctx-long cache, and with 2 MiB pages each touch would make 2 MiB resident (224 MiB for Qwen2.5-1.5B's
  // 32k context after one token).
  k.resize(nbytes() / 2, false);
  v.resize(nbytes() / 2, false);
}

Runtime::Runtime(RtConfig c) : cfg(std::move(c)), layers(cfg.n_layers) {
  if (cfg.n_layers <= 0 || cfg.hidden <= 0 || cfg.inter <= 0 || cfg.vocab <= 0 || cfg.n_heads <= 0 ||
      cfg.n_kv_heads <= 0 || cfg.head_dim <= 0 || cfg.head_dim % 2)
    throw std::invalid_argument("model dimensions must be positive (and head_dim even)");
  if (cfg.n_heads % cfg.n_kv_heads) throw std::invalid_argument("n_heads must be a multiple of n_kv_heads");
  if ((int)cfg.inv_freq.size() != cfg.head_dim / 2) throw std::invalid_argument("inv_freq must have head_dim/2 entries");
  path = default_path();
}

void Runtime::check_complete() const {
  auto need = [](bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument("runtime is missing " + what);
  };
  for (int l = 0; l < cfg.n_layers; ++l) {
    const RtLayer& L = layers[l];
    for (int i = 0; i < kNumLinears; ++i) need(L.lin[i].set(), "linear " + std::to_string(i) + " of layer " + std::to_string(l));
    need(!L.attn_norm.empty() && !L.mlp_norm.empty(), "norms of layer " + std::to_string(l));
  }
  need(embed_from_head ? lm_head.lut && lm_head.out == cfg.vocab && lm_head.in == cfg.hidden
                        : embed.p != nullptr || embed_q.set(),
       "the embedding");
  need(!final_norm.empty(), "the final norm");
  need(lm_head.set(), "lm_head");
  if (final_rot.set() && (final_rot.out != cfg.hidden || final_rot.in != cfg.hidden))
    throw std::invalid_argument("the final norm's rotation must be [hidden, hidden]");
}

void HlqEmbedding::row(int token, float* x, int H) const {
  const uint8_t* planes = (const uint8_t*)qw.p + (size_t)token * row_bytes;
  const uint16_t* s = (const uint16_t*)sc.p + (size_t)token * ng * bits;
  const uint16_t* z = (const uint16_t*)zr.p + (size_t)token * ng;
  for (int G = 0; G < ng; ++G) {
    float level[16];  // z + Σ_b s_b·bit_b(code), summed as hlq.levels sums it: the scales, then z
    for (int code = 0; code < (1 << bits); ++code) {
      float acc = 0.0f;
      for (int b = 0; b < bits; ++b)
        if (code >> b & 1) acc += fp16_to_float(s[G * bits + b]);
      level[code] = fp16_to_float(z[G]) + acc;
    }
    for (int i = G * g; i < std::min(H, (G + 1) * g); ++i) {
      int code = 0;
      for (int b = 0; b < bits; ++b) code |= (planes[(size_t)b * vocab * row_bytes + i / 8] >> (i % 8) & 1) << b;
      x[i] = level[code];
    }
  }
}

size_t Runtime::weight_bytes() const {
  size_t b = lm_head.nbytes() + final_rot.nbytes();
  for (const auto& L : layers)
    for (const auto& lin : L.lin) b += lin.nbytes();
  return b;
}

// Matrices reading the same input: HLQ ones with equal shape of input share one table build.
void Runtime::matmul(std::initializer_list<const RtLinear*> ws, const float* x, int n, std::initializer_list<float*> ys) {
  std::vector<LutWeight> views;
  std::vector<float*> outs;
  auto y = ys.begin();
  for (const RtLinear* w : ws) {
    float* yw = *y++;
    if (w->lut) {
      views.push_back(w->lut->view);
      outs.push_back(yw);
    } else {
      const uint16_t* W = w->w16;
      const int in = w->in, out = w->out;
      const Path p = path;
      parallel_for(pool().size(), out, 64, [&](int r0, int r1) {
        switch (p) {
#if defined(__x86_64__) || defined(_M_X64)
          case Path::Avx512: dense_rows_avx512(W, in, x, n, r0, r1, yw, out); break;
          case Path::Avx2: dense_rows_avx2(W, in, x, n, r0, r1, yw, out); break;
#endif
          default: dense_rows_scalar(W, in, x, n, r0, r1, yw, out);
        }
      });
    }
  }
  if (!views.empty()) {
    bool same = true;
    for (const auto& v : views) same = same && v.in == views[0].in && v.g == views[0].g;
    if (same) {
      lut_matmul(views, x, n, outs, path, float_tables, 0, residual_tables);
    } else {
      for (size_t i = 0; i < views.size(); ++i)
        lut_matmul({views[i]}, x, n, {outs[i]}, path, float_tables, 0, residual_tables);
    }
  }
  y = ys.begin();
  for (const RtLinear* w : ws) {
    float* yw = *y++;
    if (!w->bias.empty())
      for (int c = 0; c < n; ++c) add(yw + (size_t)c * w->out, w->bias.data(), w->out);
  }
}

// ---------------------------------------------------------------------------------- forward

void Runtime::forward(const std::vector<SeqSpan>& seqs, const int32_t* tokens, float* logits) {
  const int H = cfg.hidden, I = cfg.inter, D = cfg.head_dim, nh = cfg.n_heads, nkv = cfg.n_kv_heads;
  const int qd = nh * D, kvd = nkv * D, half = D / 2, grp = nh / nkv;
  int N = 0, R = 0;
  for (const auto& s : seqs) {
    if (!s.cache) throw std::invalid_argument("sequence without a KV cache");
    if (s.cache->n_layers != cfg.n_layers || s.cache->n_kv_heads != nkv || s.cache->head_dim != D)
      throw std::invalid_argument("KV cache was made for another model");
    if (s.n <= 0) throw std::invalid_argument("every sequence needs at least one new token");
    if (s.pos < 0 || s.pos + s.n > s.cache->max_ctx)
      throw std::length_error("context overflow: " + std::to_string(s.pos + s.n) + " tokens, the KV cache holds " +
                              std::to_string(s.cache->max_ctx));
    N += s.n;
    R += s.all_logits ? s.n : 1;
  }
  if (N == 0) return;
  for (int i = 0; i < N; ++i)
    if (tokens[i] < 0 || tokens[i] >= cfg.vocab)
      throw std::out_of_range("token id " + std::to_string(tokens[i]) + " outside the vocabulary (" +
                              std::to_string(cfg.vocab) + ")");

  float* x = fbuf(x_, (size_t)N * H);
  float* h = fbuf(h_, (size_t)N * H);
  float* q = fbuf(q_, (size_t)N * qd);
  float* k = fbuf(k_, (size_t)N * kvd);
  float* v = fbuf(v_, (size_t)N * kvd);
  float* att = fbuf(att_, (size_t)N * qd);
  float* g = fbuf(g_, (size_t)N * I);
  float* u = fbuf(u_, (size_t)N * I);
  float* tmp = fbuf(tmp_, (size_t)N * H);
  float* rope = fbuf(rope_, (size_t)N * D);  // per column: cos[half], sin[half]

  // Per column: its sequence and absolute position.
  std::vector<int> col_seq(N), col_pos(N);
  for (int s = 0, c = 0; s < (int)seqs.size(); ++s)
    for (int i = 0; i < seqs[s].n; ++i, ++c) {
      col_seq[c] = s;
      col_pos[c] = seqs[s].pos + i;
    }
  // Attention's column blocks: up to kAttendCols consecutive columns of one sequence.
  constexpr int kAttendCols = 8;
  std::vector<std::pair<int, int>> blocks;  // (first column, columns)
  for (int s = 0, c = 0; s < (int)seqs.size(); c += seqs[s].n, ++s)
    for (int i = 0; i < seqs[s].n; i += kAttendCols) blocks.emplace_back(c + i, std::min(kAttendCols, seqs[s].n - i));

  const int nt = pool().size();
  // Per-column work (norms, RoPE, SwiGLU) is split over the threads by column: serial, it would
  // cost a batched step as much as a large share of its matrix work.
  auto columns = [&](const std::function<void(int)>& f) {
    parallel_for(N >= 2 ? nt : 1, N, 1, [&](int c0, int c1) {
      for (int c = c0; c < c1; ++c) f(c);
    });
  };
  const uint16_t* E = (const uint16_t*)embed.p;
  columns([&](int c) {
    if (embed_from_head) {
      lut_row(lm_head.lut->view, tokens[c], x + (size_t)c * H);
    } else if (embed_q.set()) {
      embed_q.row(tokens[c], x + (size_t)c * H, H);
    } else {
      const uint16_t* e = E + (size_t)tokens[c] * H;
      for (int i = 0; i < H; ++i) x[(size_t)c * H + i] = fp16_to_float(e[i]);
    }
    float* cs = rope + (size_t)c * D;
    for (int i = 0; i < half; ++i) {
      const float ang = (float)col_pos[c] * cfg.inv_freq[i];  // fp32 product, as transformers computes it
      cs[i] = std::cos(ang) * cfg.rope_scale;
      cs[half + i] = std::sin(ang) * cfg.rope_scale;
    }
  });
  auto apply_rope = [&](float* t, int heads, int c) {
    const float* cs = rope + (size_t)c * D;
    for (int hd = 0; hd < heads; ++hd) {
      float* p = t + (size_t)hd * D;
      for (int i = 0; i < half; ++i) {
        const float a = p[i], b = p[half + i];
        p[i] = a * cs[i] - b * cs[half + i];
        p[half + i] = b * cs[i] + a * cs[half + i];
      }
    }
  };
  const float scale = 1.0f / std::sqrt((float)D);

  for (int l = 0; l < cfg.n_layers; ++l) {
    RtLayer& L = layers[l];
    // ---- attention
    columns([&](int c) { rmsnorm(x + (size_t)c * H, L.attn_norm.data(), h + (size_t)c * H, H, cfg.rms_eps); });
    matmul({&L.lin[kQ], &L.lin[kK], &L.lin[kV]}, h, N, {q, k, v});
    columns([&](int c) {
      float* qc = q + (size_t)c * qd;
      float* kc = k + (size_t)c * kvd;
      if (!L.q_norm.empty()) {
        for (int hd = 0; hd < nh; ++hd) rmsnorm(qc + hd * D, L.q_norm.data(), qc + hd * D, D, cfg.rms_eps);
        for (int hd = 0; hd < nkv; ++hd) rmsnorm(kc + hd * D, L.k_norm.data(), kc + hd * D, D, cfg.rms_eps);
      }
      apply_rope(qc, nh, c);
      apply_rope(kc, nkv, c);
      KVCache* kv = seqs[col_seq[c]].cache;
      const float* vc = v + (size_t)c * kvd;
      for (int hd = 0; hd < nkv; ++hd) {
        uint16_t* kd = kv->kp(l, hd, col_pos[c]);
        uint16_t* vd = kv->vp(l, hd, col_pos[c]);
        for (int i = 0; i < D; ++i) {
          kd[i] = float_to_fp16(kc[hd * D + i]);
          vd[i] = float_to_fp16(vc[hd * D + i]);
        }
      }
    });
    // causal attention, one (KV head, block of a sequence's columns) pair per task, head-major: the
    // blocks that follow each other reread one head's K and V from L2, and a block's columns share
    // each load of it (attend_columns)
    const int nb = (int)blocks.size();
    parallel_for(nt, nkv * nb, 1, [&](int t0, int t1) {
      thread_local std::vector<float> sc, qs, os;
      for (int t = t0; t < t1; ++t) {
        const int kh = t / nb;
        const auto [c0, nc] = blocks[t % nb];
        KVCache* kv = seqs[col_seq[c0]].cache;
        const int len = col_pos[c0 + nc - 1] + 1;
        const size_t rows = (size_t)nc * grp, off = (size_t)kh * grp * D, row_bytes = sizeof(float) * grp * D;
        if (sc.size() < rows * len) sc.resize(rows * len);
        qs.resize(rows * D), os.resize(rows * D);  // the block's query rows, gathered (grp·D floats a column)
        for (int i = 0; i < nc; ++i) std::memcpy(&qs[(size_t)i * grp * D], q + (size_t)(c0 + i) * qd + off, row_bytes);
        attend_columns(path, qs.data(), kv->kp(l, kh, 0), kv->vp(l, kh, 0), D, len, D, grp, nc, scale, sc.data(),
                       os.data());
        for (int i = 0; i < nc; ++i) std::memcpy(att + (size_t)(c0 + i) * qd + off, &os[(size_t)i * grp * D], row_bytes);
      }
    });
    matmul({&L.lin[kO]}, att, N, {tmp});
    add(x, tmp, (size_t)N * H);
    // ---- SwiGLU MLP
    columns([&](int c) { rmsnorm(x + (size_t)c * H, L.mlp_norm.data(), h + (size_t)c * H, H, cfg.rms_eps); });
    matmul({&L.lin[kGate], &L.lin[kUp]}, h, N, {g, u});
    columns([&](int c) {
      swiglu(g + (size_t)c * I, u + (size_t)c * I, I);
      if (down_rot.n) hadamard_transform(down_rot, g + (size_t)c * I, u + (size_t)c * I, path);  // u: done, scratch
    });
    matmul({&L.lin[kDown]}, g, N, {tmp});
    add(x, tmp, (size_t)N * H);
  }

  // ---- logits for the requested columns
  int r = 0;
  for (int s = 0, c = 0; s < (int)seqs.size(); c += seqs[s].n, ++s) {
    const int first = seqs[s].all_logits ? c : c + seqs[s].n - 1;
    for (int cc = first; cc < c + seqs[s].n; ++cc, ++r)
      rmsnorm(x + (size_t)cc * H, final_norm.data(), h + (size_t)r * H, H, cfg.rms_eps);
  }
  const float* head_in = h;
  if (final_rot.set()) {
    matmul({&final_rot}, h, R, {tmp});
    head_in = tmp;
  }
  matmul({&lm_head}, head_in, R, {logits});
}

// ---------------------------------------------------------------------------------- sampling

constexpr int kDrawBlock = 512;  // the draw walks block sums, then one block

// p = e^(x·it − mx) for x·it >= kth, else 0 (also 0 below e^−87); bsum[b] = Σ p over block b, in double.
ELUTQ_CLONES static void exp_weights(float* p, const float* x, int n, float it, float mx, float kth, double* bsum) {
  for (int b0 = 0, b = 0; b0 < n; b0 += kDrawBlock, ++b) {
    const int e = std::min(n, b0 + kDrawBlock);
    float acc[16] = {0};
    int i = b0;
    for (; i + 16 <= e; i += 16)
      for (int t = 0; t < 16; ++t) {
        const float xs = x[i + t] * it, d = xs - mx;
        const float w = (d > -87.0f && xs >= kth) ? exp_approx(d) : 0.0f;
        p[i + t] = w;
        acc[t] += w;
      }
    double sum = 0.0;
    for (int t = 0; t < 16; ++t) sum += acc[t];
    for (; i < e; ++i) {
      const float xs = x[i] * it, d = xs - mx;
      p[i] = (d > -87.0f && xs >= kth) ? exp_approx(d) : 0.0f;
      sum += p[i];
    }
    bsum[b] = sum;
  }
}

ELUTQ_CLONES static float max_scaled(const float* x, int n, float it) {
  float m[16];
  for (int t = 0; t < 16; ++t) m[t] = -INFINITY;
  int i = 0;
  for (; i + 16 <= n; i += 16)
    for (int t = 0; t < 16; ++t) m[t] = x[i + t] * it > m[t] ? x[i + t] * it : m[t];  // NaN never wins
  float r = -INFINITY;
  for (int t = 0; t < 16; ++t) r = m[t] > r ? m[t] : r;
  for (; i < n; ++i) r = x[i] * it > r ? x[i] * it : r;
  return r;
}

static int argmax_row(const float* x, int n) {
  int best = 0;
  for (int i = 1; i < n; ++i)
    if (x[i] > x[best]) best = i;
  return best;
}

// The last index below n with a non-zero weight.
static int last_nonzero(const float* p, int n) {
  for (int i = n - 1; i > 0; --i)
    if (p[i] > 0.0f) return i;
  return 0;
}

struct SampleScratch {
  std::vector<float> p, tmp;
  std::vector<double> bsum;
  std::vector<int> cand;
};

static int sample_row(const float* x, int V, float it, int top_k, float top_p, double u, SampleScratch& S) {
  if (it == 0.0f) return argmax_row(x, V);
  S.p.resize(V);
  S.bsum.resize((V + kDrawBlock - 1) / kDrawBlock);
  float* p = S.p.data();
  const float mx = max_scaled(x, V, it);
  float kth = -INFINITY;  // top-k: the k-th largest scaled logit
  if (top_k > 0 && top_k < V) {
    S.tmp.resize(V);
    for (int i = 0; i < V; ++i) S.tmp[i] = x[i] * it == x[i] * it ? x[i] * it : -INFINITY;  // NaN: never kept
    std::nth_element(S.tmp.begin(), S.tmp.begin() + (top_k - 1), S.tmp.end(), std::greater<float>());
    kth = S.tmp[top_k - 1];
  }
  exp_weights(p, x, V, it, mx, kth, S.bsum.data());
  double total = 0.0;
  for (double b : S.bsum) total += b;
  if (!(total > 0.0)) return argmax_row(x, V);
  if (top_p >= 1.0f) {  // inverse CDF over block sums, then inside the block
    const double target = u * total;
    double cum = 0.0;
    size_t b = 0;
    for (; b + 1 < S.bsum.size() && cum + S.bsum[b] <= target; ++b) cum += S.bsum[b];
    const int b0 = (int)b * kDrawBlock, e = std::min(V, b0 + kDrawBlock);
    for (int i = b0; i < e; ++i) {
      cum += p[i];
      if (cum > target && p[i] > 0.0f) return i;
    }
    // Rounding (the block sum and this walk add in different orders) carried the target past the
    // block's end: its last non-zero weight, else the last one before it.
    return last_nonzero(p, e);
  }
  // top-p: the largest weights (ties: lower index first) until their mass reaches top_p·total.  The
  // weights lie in [0, 1] (the largest is e^0); a histogram of their float exponents finds the
  // exponent above which the head must lie, so only that head (usually short) is sorted.
  double mass[256] = {0};
  for (int i = 0; i < V; ++i) {
    uint32_t bits;
    std::memcpy(&bits, p + i, 4);
    mass[bits >> 23] += p[i];
  }
  const double need = (double)top_p * total;
  int lo = 255;
  for (double cum = 0.0; lo > 0; --lo) {
    cum += mass[lo];
    if (cum >= need) break;
  }
  lo = std::max(lo - 1, 0);  // one exponent of slack for rounding
  S.cand.clear();
  for (int i = 0; i < V; ++i) {
    uint32_t bits;
    std::memcpy(&bits, p + i, 4);
    if ((int)(bits >> 23) >= lo && p[i] > 0.0f) S.cand.push_back(i);
  }
  std::sort(S.cand.begin(), S.cand.end(), [&](int a, int b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
  size_t kept = 0;
  for (double m = 0.0; kept < S.cand.size() && m < need; ++kept) m += p[S.cand[kept]];
  std::sort(S.cand.begin(), S.cand.begin() + kept);  // draw in vocabulary order
  double kept_total = 0.0;
  for (size_t j = 0; j < kept; ++j) kept_total += p[S.cand[j]];
  const double target = u * kept_total;
  double cum = 0.0;
  for (size_t j = 0; j < kept; ++j) {
    cum += p[S.cand[j]];
    if (cum > target) return S.cand[j];
  }
  return S.cand[kept - 1];
}

void sample_rows(const float* logits, int R, int V, const float* inv_t, const int32_t* top_k, const float* top_p,
                 const double* u, int32_t* out) {
  parallel_for(pool().size(), R, 1, [&](int r0, int r1) {
    thread_local SampleScratch scratch;
    for (int r = r0; r < r1; ++r) out[r] = sample_row(logits + (size_t)r * V, V, inv_t[r], top_k[r], top_p[r], u[r], scratch);
  });
}

}  // namespace elutq
