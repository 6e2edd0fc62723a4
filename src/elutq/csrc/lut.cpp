// LUT kernel driver: path selection, the persistent thread pool, table building and the split of
// output rows into contiguous per-thread ranges.  Compiled for the baseline ISA; the SIMD paths
// live in lut_avx2.cpp / lut_avx512.cpp / lut_neon.cpp and are only called after CPU detection.
#include "lut_driver.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ELUTQ_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define ELUTQ_PAUSE() asm volatile("yield")
#else
#define ELUTQ_PAUSE() ((void)0)
#endif

namespace elutq {

// ---------------------------------------------------------------------------------- paths

const char* path_name(Path p) {
  switch (p) {
    case Path::Scalar: return "scalar";
    case Path::Avx2: return "avx2";
    case Path::Avx512: return "avx512";
    case Path::Neon: return "neon";
  }
  return "?";
}

bool path_available(Path p) {
  switch (p) {
    case Path::Scalar: return true;
#if defined(__x86_64__) || defined(_M_X64)
    case Path::Avx2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case Path::Avx512:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi") &&
             __builtin_cpu_supports("avx512vnni");
#endif
#if defined(__aarch64__)
    case Path::Neon: return true;
#endif
    default: return false;
  }
}

std::vector<Path> available_paths() {
  std::vector<Path> v;
  for (Path p : {Path::Scalar, Path::Avx2, Path::Avx512, Path::Neon})
    if (path_available(p)) v.push_back(p);
  return v;
}

Path parse_path(const std::string& name) {
  for (Path p : {Path::Scalar, Path::Avx2, Path::Avx512, Path::Neon})
    if (name == path_name(p)) {
      if (!path_available(p)) throw std::invalid_argument("kernel path '" + name + "' is not supported by this CPU");
      return p;
    }
  throw std::invalid_argument("unknown kernel path '" + name + "' (expected scalar, avx2, avx512 or neon)");
}

Path best_path() {
  Path best = Path::Scalar;
  for (Path p : available_paths()) best = p;  // listed in increasing preference
  return best;
}

Path default_path() {
  const char* env = std::getenv("ELUTQ_KERNEL");
  if (env && *env && std::string(env) != "auto") return parse_path(env);
  return best_path();
}

// Software prefetch distance (bytes ahead, into L2) of the AVX-512 GEMV's weight stream: one
// core's demand misses alone do not reach the memory bandwidth.  ELUTQ_PF=0 turns it off.
int g_prefetch_bytes = [] {
  const char* e = std::getenv("ELUTQ_PF");
  return e ? std::max(0, std::atoi(e)) : 4096;
}();

// ---------------------------------------------------------------------------------- thread pool

ThreadPool::ThreadPool(int n) : n_(std::max(1, n)) {
  for (int t = 1; t < n_; ++t) threads_.emplace_back([this, t] { worker(t); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
    gen_.fetch_add(1);
  }
  cv_.notify_all();
  for (auto& th : threads_) th.join();
}

// A worker joins a run only while it is open (state_ without kClosed), by incrementing the count
// of participants; the caller closes the run once it has finished its own part and then waits
// for the participants only.  A worker that wakes late (e.g. descheduled on a busy machine)
// therefore never delays a run it did not join, and never touches a finished run's job.
void ThreadPool::worker(int tid) {
  uint64_t seen = 0;
  for (;;) {
    // Spin briefly (decode calls arrive back to back), then block.
    const auto t0 = std::chrono::steady_clock::now();
    for (int it = 0; gen_.load(std::memory_order_acquire) == seen; ++it) {
      ELUTQ_PAUSE();
      if ((it & 255) == 255 && std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(spin_us_)) {
        std::unique_lock<std::mutex> lk(mu_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        cv_.wait(lk, [&] { return gen_.load(std::memory_order_seq_cst) != seen; });
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
        break;
      }
    }
    seen = gen_.load(std::memory_order_acquire);
    if (stop_) return;
    int st = state_.load(std::memory_order_acquire);
    while (!(st & kClosed)) {
      if (state_.compare_exchange_weak(st, st + 1, std::memory_order_acq_rel)) {
        if (tid < active_) (*job_)(tid, active_);
        finished_.fetch_add(1, std::memory_order_acq_rel);
        break;
      }
    }
  }
}

void ThreadPool::run(int nthreads, const std::function<void(int, int)>& f) {
  nthreads = std::max(1, std::min(nthreads, n_));
  if (nthreads == 1) {
    f(0, 1);
    return;
  }
  std::lock_guard<std::mutex> run_lock(run_mu_);
  job_ = &f;
  active_ = nthreads;
  finished_.store(0, std::memory_order_relaxed);
  state_.store(0, std::memory_order_release);
  // Spinning workers see gen_ change; only sleeping ones need the mutex and a notify (a futex
  // syscall).  No wake-up is lost: a worker counts itself in sleepers_ under mu_ before it checks
  // gen_, so either it sees the new gen_ or this load sees it counted (both seq_cst).
  gen_.fetch_add(1, std::memory_order_seq_cst);
  if (sleepers_.load(std::memory_order_seq_cst) > 0) {
    { std::lock_guard<std::mutex> lk(mu_); }
    cv_.notify_all();
  }
  f(0, nthreads);
  const int joined = state_.fetch_or(kClosed, std::memory_order_acq_rel) & ~kClosed;
  for (int it = 0; finished_.load(std::memory_order_acquire) < joined; ++it) {
    if (it < 4096)
      ELUTQ_PAUSE();
    else
      std::this_thread::yield();
  }
}

// Thread t first takes chunks of [bounds[t], bounds[t + 1]), then the remaining chunks of the others.
static void run_shares(ThreadPool& tp, int nthreads, const std::vector<int>& bounds, int chunk, const std::function<void(int, int)>& body) {
  struct alignas(64) Share {
    std::atomic<int> next;
    int end;
  };
  std::unique_ptr<Share[]> sh(new Share[nthreads]);
  for (int t = 0; t < nthreads; ++t) {
    sh[t].next.store(bounds[t], std::memory_order_relaxed);
    sh[t].end = bounds[t + 1];
  }
  tp.run(nthreads, [&](int tid, int n) {
    for (int k = 0; k < n; ++k) {  // own share first, then help the others
      Share& s = sh[(tid + k) % n];
      for (;;) {
        const int b = s.next.fetch_add(chunk, std::memory_order_relaxed);
        if (b >= s.end) break;
        body(b, std::min(b + chunk, s.end));
      }
    }
  });
}

void parallel_for(int nthreads, int total, int chunk, const std::function<void(int, int)>& body) {
  if (total <= 0) return;
  chunk = std::max(1, chunk);
  ThreadPool& tp = pool();
  nthreads = std::max(1, std::min({nthreads, tp.size(), (total + chunk - 1) / chunk}));
  if (nthreads == 1) {
    body(0, total);
    return;
  }
  std::vector<int> bounds(nthreads + 1);
  for (int t = 0; t <= nthreads; ++t) bounds[t] = (int)((long long)total * t / nthreads);
  run_shares(tp, nthreads, bounds, chunk, body);
}

void parallel_halves(int nthreads, int total, int step, const std::function<void(int, int, int, int)>& body) {
  if (total <= 0) return;
  step = std::max(1, step);
  ThreadPool& tp = pool();
  nthreads = std::max(1, std::min({nthreads, tp.size(), (total + 2 * step - 1) / (2 * step)}));
  std::vector<int> lo(nthreads), mid(nthreads), hi(nthreads), bounds(nthreads + 1, 0);
  for (int t = 0; t < nthreads; ++t) {
    lo[t] = (int)((long long)total * t / nthreads);
    hi[t] = (int)((long long)total * (t + 1) / nthreads);
    mid[t] = lo[t] + (hi[t] - lo[t] + 1) / 2;
    bounds[t + 1] = bounds[t] + (mid[t] - lo[t] + step - 1) / step;  // steps of share t
  }
  if (nthreads == 1) {
    body(0, mid[0], mid[0], total);
    return;
  }
  run_shares(tp, nthreads, bounds, 1, [&](int j, int) {
    int t = 0;
    while (j >= bounds[t + 1]) ++t;
    const int off = (j - bounds[t]) * step;
    body(lo[t] + off, std::min(mid[t], lo[t] + off + step), std::min(hi[t], mid[t] + off),
         std::min(hi[t], mid[t] + off + step));
  });
}

static std::mutex g_pool_mu;
static std::unique_ptr<ThreadPool> g_pool;

static int default_threads() {
  const char* env = std::getenv("ELUTQ_NUM_THREADS");
  if (env && std::atoi(env) > 0) return std::atoi(env);
  const unsigned hc = std::thread::hardware_concurrency();
  return hc ? (int)hc : 1;
}

ThreadPool& pool() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  if (!g_pool) g_pool = std::make_unique<ThreadPool>(default_threads());
  return *g_pool;
}

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("number of threads must be >= 1");
  std::lock_guard<std::mutex> lk(g_pool_mu);
  if (g_pool && g_pool->size() == n) return;
  g_pool.reset();
  g_pool = std::make_unique<ThreadPool>(n);
}

int get_num_threads() { return pool().size(); }

// ---------------------------------------------------------------------------------- buffers

// Large buffers (weights, big tables) are 2 MiB-aligned and asked for transparent huge pages:
// a GEMV streams them once per call, and 4 KiB pages cost a TLB walk (and a hardware-prefetch
// restart) every 4 KiB.
void AlignedBuf::resize(size_t bytes, bool huge_pages) {
  if (bytes <= cap) return;
  std::free(p);
  constexpr size_t kHuge = 2u << 20;
  const size_t align = bytes >= kHuge ? kHuge : 64;
  p = nullptr, cap = 0;  // (a failed allocation leaves an empty buffer, not a stale capacity)
  const size_t want = (bytes + align - 1) / align * align;
  p = std::aligned_alloc(align, want);
  if (!p) throw std::bad_alloc();
  cap = want;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (align == kHuge) madvise(p, cap, huge_pages ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
#endif
}

AlignedBuf::~AlignedBuf() { std::free(p); }

LutMatrix::LutMatrix(const uint8_t* w, size_t w_bytes, const uint16_t* sz, size_t sz_elems, int out, int in,
                     int bits, int g, bool avx2_order) {
  if (bits < 1 || bits > 4) throw std::invalid_argument("bits must be 1..4");
  if (g != 32 && g != 64 && g != 128) throw std::invalid_argument("kernel group size must be 32, 64 or 128");
  if (out < 1 || in < 1) throw std::invalid_argument("out and in must be >= 1");
  LutWeight v;
  v.out = out;
  v.in = in;
  v.bits = bits;
  v.g = g;
  v.ng = (in + g - 1) / g;
  const size_t wn = (size_t)v.nrb() * v.w_bytes_per_rb(), szn = (size_t)v.nrb() * v.sz_elems_per_rb();
  if (w_bytes != wn)
    throw std::invalid_argument("packed weight buffer has " + std::to_string(w_bytes) + " bytes, expected " +
                                std::to_string(wn));
  if (sz_elems != szn)
    throw std::invalid_argument("packed scale buffer has " + std::to_string(sz_elems) + " elements, expected " +
                                std::to_string(szn));
  wbuf.resize(wn);
  szbuf.resize(szn * 2);
  if (avx2_order) {
    uint8_t* dst = (uint8_t*)wbuf.p;
    for (size_t c = 0; c < wn; c += kChunkBytes)
      for (int m = 0; m < kRowBlock; ++m)
        for (int j = 0; j < 4; ++j) dst[c + chunk_byte(true, m, j)] = w[c + chunk_byte(false, m, j)];
  } else {
    std::memcpy(wbuf.p, w, wn);
  }
  std::memcpy(szbuf.p, sz, szn * 2);
  v.avx2_order = avx2_order;
  v.w = (const uint8_t*)wbuf.p;
  v.sz = (const uint16_t*)szbuf.p;
  view = v;
}

// ---------------------------------------------------------------------------------- driver

void lut_row(const LutWeight& W, int r, float* x) {
  const int rb = r / kRowBlock, m = r % kRowBlock, nl = W.g / 32;
  for (int G = 0; G < W.ng; ++G) {
    const uint8_t* wg = W.w + (size_t)rb * W.w_bytes_per_rb() + (size_t)G * W.bits * nl * kChunkBytes;
    const uint16_t* sg = W.sz + (size_t)rb * W.sz_elems_per_rb() + (size_t)G * (W.bits + 1) * kRowBlock;
    float level[16];  // z + Σ_i s_i·bit_i(code), summed as hlq.levels sums it: the scales, then z
    for (int code = 0; code < (1 << W.bits); ++code) {
      float acc = 0.0f;
      for (int i = 0; i < W.bits; ++i)
        if (code >> i & 1) acc += fp16_to_float(sg[i * kRowBlock + m]);
      level[code] = fp16_to_float(sg[W.bits * kRowBlock + m]) + acc;
    }
    for (int c = G * W.g; c < std::min(W.in, (G + 1) * W.g); ++c) {
      const int local = c - G * W.g, L = local / 32, run = local % 32 / 4, t = local % 4;
      const int byte = chunk_byte(W.avx2_order, m, run % 4), shift = run < 4 ? t : 4 + t;
      int code = 0;
      for (int i = 0; i < W.bits; ++i) code |= (wg[((size_t)i * nl + L) * kChunkBytes + byte] >> shift & 1) << i;
      x[c] = level[code];
    }
  }
}


void build_tables(Path p, const float* x, int in, int g, int ng, int8_t* tq, uint8_t* tm, size_t gstride, float* ls,
                  float* xs) {
  switch (p) {
#if defined(__x86_64__) || defined(_M_X64)
    case Path::Avx512: build_tables_avx512(x, in, g, ng, tq, tm, gstride, ls, xs); return;
    case Path::Avx2: build_tables_avx2(x, in, g, ng, tq, tm, gstride, ls, xs); return;
#endif
    default: build_tables_scalar(x, in, g, ng, tq, tm, gstride, ls, xs); return;
  }
}

static void gemv_rows(Path p, const LutWeight& W, const LutTables& T, int rb0, int rb1, float* y) {
  switch (p) {
#if defined(__x86_64__) || defined(_M_X64)
    case Path::Avx512: gemv_rows_avx512(W, T, rb0, rb1, y); return;
    case Path::Avx2: gemv_rows_avx2(W, T, rb0, rb1, y); return;
#endif
#if defined(__aarch64__)
    case Path::Neon: gemv_rows_neon(W, T, rb0, rb1, y); return;
#endif
    default: gemv_rows_scalar(W, T, rb0, rb1, y); return;
  }
}

// ---------------------------------------------------------------------------------- lut_matmul
//
// lut_matmul(Ws, X, n, ys) in three steps: check the matrices, build every column's activation tables
// (CallTables, build_all_tables), then walk the row blocks of all matrices (one sequence, split over
// the threads) with one of three row walks:
//   - the AVX-512 GEMV (n == 1): gemv_halves_avx512, two continuous weight streams per core;
//   - otherwise rows_job per slice: pass_rows (GEMV per column, the AVX-512/AVX2 GEMM for n > 1, or
//     the float-table reference), then residual_pass where residual tables are not fused.
// Three switches choose among them: float_tables (float vs int8 tables), residual (fused into the
// first pass on AVX-512/AVX2, a second pass elsewhere) and n == 1 (GEMV vs GEMM).

namespace {

// One call's activation tables, one set per column.  int8 tables are stored group-major: column c's
// group G at tq + (G·n + c)·g·4 (its multipliers at tm + (G·n + c)·g/4), so the tables a GEMM tile needs
// (one group, many columns) are contiguous.  The buffers are the calling thread's (thread_local),
// reused by its next call.
struct CallTables {
  Path p;
  int n, in, g, ng;
  size_t g4;       // table bytes (entries) per column and group
  size_t tlen;     // per column
  size_t gstride;  // between groups: g4·n
  bool float_tables, residual;
  // The AVX-512 and AVX2 kernels look the residual tables up in the same pass as the first ones
  // (fused: one stream of the weights, one index computation); scalar and NEON run a second pass,
  // which alone needs the residual lut_scale and a zero Σx.
  bool fused;
  float* ls = nullptr;     // lut_scale [n][ng]
  float* xs = nullptr;     // Σx [n][ng]
  int8_t* tq = nullptr;    // int8 tables (group-major, above)
  uint8_t* tm = nullptr;   // their run multipliers
  float* tf = nullptr;     // float tables: [tlen] per column, one group after another
  int8_t* tq2 = nullptr;   // residual tables, tq's layout
  float* ls2 = nullptr;    // the unfused residual pass's lut_scale (lut_scale / 254) ...
  float* xs0 = nullptr;    // ... and its Σx: zeros (the residual pass adds no Σx term)

  CallTables(Path p_, int n_, const LutWeight& W0, bool float_tables_, bool residual_)
      : p(p_), n(n_), in(W0.in), g(W0.g), ng(W0.ng), g4((size_t)W0.g * 4), tlen(g4 * W0.ng), gstride(g4 * n_),
        float_tables(float_tables_), residual(residual_),
        fused(residual_ && (p_ == Path::Avx512 || p_ == Path::Avx2)) {
    thread_local AlignedBuf tq_buf, tm_buf, tf_buf, ls_buf, xs_buf, tq2_buf, ls2_buf, xs0_buf;
    ls = grow<float>(ls_buf, (size_t)n * ng);
    xs = grow<float>(xs_buf, (size_t)n * ng);
    if (float_tables) {
      tf = grow<float>(tf_buf, tlen * n);
    } else {
      tq = grow<int8_t>(tq_buf, tlen * n);
      tm = grow<uint8_t>(tm_buf, tlen * n / 16);
    }
    if (residual) tq2 = grow<int8_t>(tq2_buf, tlen * n);
    if (residual && !fused) {
      ls2 = grow<float>(ls2_buf, (size_t)n * ng);
      xs0 = grow<float>(xs0_buf, (size_t)n * ng);
      for (int i = 0; i < n * ng; ++i) xs0[i] = 0.0f;
    }
  }

  template <typename T>
  static T* grow(AlignedBuf& b, size_t count) {
    b.resize(sizeof(T) * count);
    return (T*)b.p;
  }

  // Column c's int8 tables (second: the residual pass's, where it is not fused).
  LutTables col_tables(int c, bool second) const {
    LutTables T;
    T.tq = (second ? tq2 : tq) + c * g4;
    T.tm = tm + c * g4 / 16;
    T.gstride = gstride;
    T.lut_scale = (second ? ls2 : ls) + (size_t)c * ng;
    T.xsum = (second ? xs0 : xs) + (size_t)c * ng;
    if (fused) T.tr = tq2 + c * g4;
    return T;
  }

  // Column c's float tables (float_tables).
  LutTables col_float_tables(int c) const {
    LutTables T;
    T.tf = tf + c * tlen;
    T.xsum = xs + (size_t)c * ng;
    return T;
  }

  // Tables of column c's groups [G0, G1) from X [n][in].
  void build_part(const float* X, int c, int G0, int G1) {
    const float* x = X + (size_t)c * in + (size_t)G0 * g;
    const int rest = in - G0 * g, cng = G1 - G0;
    const size_t cl = (size_t)c * ng + G0;
    if (float_tables) {
      build_float_tables_scalar(x, rest, g, cng, tf + c * tlen + (size_t)G0 * g4, xs + cl);
      return;
    }
    int8_t* q = tq + c * g4 + G0 * gstride;
    uint8_t* m = tm + c * g4 / 16 + G0 * gstride / 16;
    build_tables(p, x, rest, g, cng, q, m, gstride, ls + cl, xs + cl);
    if (residual) {
      build_residual_tables_scalar(x, rest, g, cng, q, m, gstride, ls + cl, tq2 + c * g4 + G0 * gstride);
      if (!fused)
        for (int G = 0; G < cng; ++G) ls2[cl + G] = ls[cl + G] / 254.0f;
    }
  }
};

// Every column's tables.  Units of work: (column c, groups [G0, G1)), a table build of groups split over
// the threads even for one column — a decode step's one-thread build would otherwise leave the others idle.
void build_all_tables(CallTables& T, const float* X, int nt) {
  auto tables_job = [&](int u0, int u1) {
    for (int u = u0; u < u1;) {  // split [u0, u1) at column boundaries
      const int c = u / T.ng, G0 = u % T.ng, G1 = std::min(T.ng, G0 + (u1 - u));
      T.build_part(X, c, G0, G1);
      u += G1 - G0;
    }
  };
  // ~4 KiB of activations per chunk (not tuned: small enough for a decode step to split in two).
  const int units = T.n * T.ng, unit_chunk = std::max(1, 1024 / T.g);
  parallel_for(units >= 2 * unit_chunk ? nt : 1, units, unit_chunk, tables_job);
}

// Row blocks [lo, hi) of W for every column with the first (or, second, the residual) tables, column c's
// row r written to y[c·ldy + r].
void pass_rows(const CallTables& T, const LutWeight& W, int lo, int hi, bool second, float* y, size_t ldy) {
  const int n = T.n;
  if (T.float_tables) {
    for (int rb = lo; rb < hi; ++rb)
      for (int c = 0; c < n; ++c) gemv_rows_float_scalar(W, T.col_float_tables(c), rb, rb + 1, y + (size_t)c * ldy);
    return;
  }
  if (n == 1) {
    gemv_rows(T.p, W, T.col_tables(0, second), lo, hi, y);
    return;
  }
#if defined(__x86_64__) || defined(_M_X64)
  if (T.p == Path::Avx512 || T.p == Path::Avx2) {
    // Blocks of row blocks whose weights stay in L2 while column chunks whose tables stay in
    // L2 pass over them.  Fused residual tables double a chunk's tables rather than halve its
    // columns: fewer columns per weight tile cost more than the extra L2 (measured, 7B prefill).
    const auto gemm = T.p == Path::Avx512 ? gemm_rows_avx512 : gemm_rows_avx2;
    const int cc = std::max(1, std::min(n, (int)((256 * 1024) / T.tlen)));
    const int rbb = std::max(1, (int)((256 * 1024) / W.w_bytes_per_rb()));
    for (int r0 = lo; r0 < hi; r0 += rbb)
      for (int c0 = 0; c0 < n; c0 += cc) {
        const int nc = std::min(cc, n - c0), r1 = std::min(r0 + rbb, hi);
        const LutTables C = T.col_tables(c0, second);  // columns c0.. (contiguous from here)
        gemm(W, C.tq, C.tm, T.gstride, C.lut_scale, C.xsum, nc, r0, r1, y + (size_t)c0 * ldy, ldy, C.tr);
      }
    return;
  }
#endif
  for (int rb = lo; rb < hi; ++rb)
    for (int c = 0; c < n; ++c) gemv_rows(T.p, W, T.col_tables(c, second), rb, rb + 1, y + (size_t)c * ldy);
}

// The unfused residual pass over row blocks [lo, hi) of W, added to y [n][W.out]: into a scratch holding
// only these rows (a few MB even for an lm_head over a long prompt), then added.  The rows are this
// thread's, so no other thread touches them.
void residual_pass(const CallTables& T, const LutWeight& W, int lo, int hi, float* y) {
  thread_local std::vector<float> scratch;
  const int n = T.n;
  const int sub = std::max(1, (int)((256 * 1024) / W.w_bytes_per_rb()));
  for (int s0 = lo; s0 < hi; s0 += sub) {
    const int s1 = std::min(hi, s0 + sub);
    const int r0 = s0 * kRowBlock, r1 = std::min(s1 * kRowBlock, W.out), nr = r1 - r0;
    scratch.resize((size_t)nr * n);
    // A view of just these row blocks, so their rows land at 0..nr-1 of the scratch.
    LutWeight V = W;
    V.w += (size_t)s0 * W.w_bytes_per_rb();
    V.sz += (size_t)s0 * W.sz_elems_per_rb();
    V.out = nr;
    pass_rows(T, V, 0, s1 - s0, true, scratch.data(), nr);
    for (int c = 0; c < n; ++c) {
      float* yc = y + (size_t)c * W.out + r0;
      const float* sc = scratch.data() + (size_t)c * nr;
      for (int r = 0; r < nr; ++r) yc[r] += sc[r];
    }
  }
}

// Rows of all matrices form one sequence of total_rb row blocks; each thread takes a contiguous slice
// (parallel_for, chunks of `chunk` row blocks) and runs pass_rows, then residual_pass, on it.
void walk_rows(const CallTables& T, const std::vector<LutWeight>& Ws, const std::vector<float*>& ys, int nt,
               int total_rb, int chunk) {
  auto rows_job = [&](int b0, int b1) {
    int base = 0;
    for (size_t w = 0; w < Ws.size(); ++w) {
      const LutWeight& W = Ws[w];
      const int lo = std::max(b0 - base, 0), hi = std::min(b1 - base, W.nrb());
      base += W.nrb();
      if (lo >= hi) continue;
      pass_rows(T, W, lo, hi, false, ys[w], W.out);
      if (T.residual && !T.fused) residual_pass(T, W, lo, hi, ys[w]);
    }
  };
  parallel_for(nt, total_rb, chunk, rows_job);
}

#if defined(__x86_64__) || defined(_M_X64)
// AVX-512 GEMV: each thread walks the two halves of its share side by side (parallel_halves), two
// continuous weight streams per core — where two neighbouring row blocks at a time (16 KiB runs
// that jump every pair) streamed 3-13 % slower (docs/KERNELS.md).  Row blocks of all matrices are one
// sequence; a half crossing into another matrix pairs with whatever the other half is on.
void gemv_halves_avx512(const std::vector<LutWeight>& Ws, const std::vector<float*>& ys, const LutTables& T, int nt,
                        int total_rb, size_t rb_bytes) {
  std::vector<int> base(Ws.size() + 1, 0);
  for (size_t w = 0; w < Ws.size(); ++w) base[w + 1] = base[w] + Ws[w].nrb();
  auto matrix_of = [&](int v) {
    int w = 0;
    while (v >= base[w + 1]) ++w;
    return w;
  };
  auto halves_job = [&](int a, int a1, int b, int b1) {
    while (a < a1 || b < b1) {
      const int wa = a < a1 ? matrix_of(a) : -1, wb = b < b1 ? matrix_of(b) : -1;
      const int na = wa < 0 ? 0 : std::min(a1, base[wa + 1]) - a, nb = wb < 0 ? 0 : std::min(b1, base[wb + 1]) - b;
      if (na && nb && Ws[wa].bits == Ws[wb].bits) {
        const int c = std::min(na, nb);
        gemv_pair_avx512(Ws[wa], a - base[wa], ys[wa], Ws[wb], b - base[wb], ys[wb], c, T);
        a += c;
        b += c;
      } else if (na) {
        gemv_rows_avx512(Ws[wa], T, a - base[wa], a - base[wa] + na, ys[wa]);
        a += na;
      } else {
        gemv_rows_avx512(Ws[wb], T, b - base[wb], b - base[wb] + nb, ys[wb]);
        b += nb;
      }
    }
  };
  parallel_halves(nt, total_rb, std::max(1, (int)((32 * 1024) / rb_bytes)), halves_job);
}
#endif

void check_matrices(const std::vector<LutWeight>& Ws, Path p, bool float_tables) {
  for (const auto& W : Ws) {
    if (W.in != Ws[0].in || W.g != Ws[0].g)
      throw std::invalid_argument("matrices sharing tables need equal in_features and group size");
    if (W.avx2_order && !float_tables && p != Path::Avx2 && p != Path::Scalar)
      throw std::invalid_argument(std::string("a matrix loaded for the avx2 path cannot run on the ") + path_name(p) +
                                  " path; load it for that path");
  }
}

}  // namespace

void lut_matmul(const std::vector<LutWeight>& Ws, const float* X, int n, const std::vector<float*>& ys, Path p,
                bool float_tables, int max_threads, bool residual) {
  if (Ws.empty() || n <= 0) return;
  check_matrices(Ws, p, float_tables);
  size_t total_bytes = 0;
  int total_rb = 0;
  for (const auto& W : Ws) {
    total_bytes += (size_t)W.nrb() * W.w_bytes_per_rb();
    total_rb += W.nrb();
  }
  const int pool_size = pool().size();
  const int nt_max = std::max(1, std::min(max_threads > 0 ? max_threads : pool_size, pool_size));
  // Tiny problems are not worth waking a thread for.
  const int nt = std::max(1, std::min<int>(nt_max, (int)std::min<size_t>(total_rb, total_bytes * n / (16 * 1024) + 1)));

  CallTables T(p, n, Ws[0], float_tables, residual && !float_tables);
  build_all_tables(T, X, nt);

  // GEMV: chunks of ~64 KiB of weights (small enough to balance, large enough to stream).
  // GEMM: up to 256 KiB of weights, so the AVX-512 kernel's L2 blocking over rows still works.
  const size_t rb_bytes = std::max<size_t>(1, total_bytes / std::max(total_rb, 1));
#if defined(__x86_64__) || defined(_M_X64)
  if (n == 1 && p == Path::Avx512 && !float_tables) {
    gemv_halves_avx512(Ws, ys, T.col_tables(0, false), nt, total_rb, rb_bytes);
    return;
  }
#endif
  const int chunk = n == 1 ? std::max(1, (int)((64 * 1024) / rb_bytes))
                           : std::max(1, std::min((int)((256 * 1024) / rb_bytes), total_rb / (4 * nt)));
  walk_rows(T, Ws, ys, nt, total_rb, chunk);
}

// Read bandwidth in GB/s (the roofline): sums 64-bit words of a buffer, split over exactly nthreads
// threads.  Two read loops, reps windows each, alternating: a plain one, and one that prefetches into
// L2 as far ahead as the GEMV kernels do (ELUTQ_PF) — a roofline the kernels can beat is no roofline
// (on this kind of host the plain loop alone reads less than the prefetched kernels stream).  A window
// repeats passes until min_seconds have passed and counts them all (min_seconds > 0: the rate a decode
// of seconds sees, not one pass's); the best window wins.
double read_bandwidth(size_t bytes, int reps, int nthreads, double min_seconds) {
  if (nthreads < 1 || reps < 1 || !(min_seconds >= 0.0 && min_seconds <= 60.0))
    throw std::invalid_argument("read_bandwidth: needs nthreads >= 1, reps >= 1 and 0 <= min_seconds <= 60");
  // parallel_for caps at the pool's size, which a 1-thread benchmark leaves at 1: resize, then restore.
  const int prev_threads = get_num_threads();
  if (prev_threads != nthreads) set_num_threads(nthreads);
  struct Restore {
    int n;
    ~Restore() { set_num_threads(n); }
  } restore{prev_threads};
  constexpr size_t kBlock = 1 << 20;  // words per parallel_for index: 8 MiB
  const size_t nblk = std::max<size_t>(1, bytes / 8 / kBlock);
  AlignedBuf buf;
  buf.resize(nblk * kBlock * 8);
  uint64_t* a = (uint64_t*)buf.p;
  const size_t nwords = nblk * kBlock;
  parallel_for(nthreads, (int)nblk, 1, [&](int b0, int b1) {
    for (size_t i = (size_t)b0 * kBlock; i < (size_t)b1 * kBlock; ++i) a[i] = i;
  });
  std::atomic<uint64_t> sink{0};
  const size_t pf = (size_t)std::max(g_prefetch_bytes, 0) / 8;  // in words
  auto pass = [&](bool prefetch) {
    parallel_for(nthreads, (int)nblk, 1, [&](int b0, int b1) {
      uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
      for (size_t i = (size_t)b0 * kBlock; i < (size_t)b1 * kBlock; i += 8) {
        if (prefetch) __builtin_prefetch(a + std::min(i + pf, nwords - 8), 0, 2);
        s0 += a[i]; s1 += a[i + 1]; s2 += a[i + 2]; s3 += a[i + 3];
        s4 += a[i + 4]; s5 += a[i + 5]; s6 += a[i + 6]; s7 += a[i + 7];
      }
      sink.fetch_add(s0 ^ s1 ^ s2 ^ s3 ^ s4 ^ s5 ^ s6 ^ s7, std::memory_order_relaxed);
    });
  };
  double best = 0.0;
  for (int r = 0; r < 2 * reps; ++r) {
    const bool prefetch = (r & 1) && pf;
    const auto t0 = std::chrono::steady_clock::now();
    double dt = 0.0;
    size_t passes = 0;
    do {
      pass(prefetch);
      ++passes;
      dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    } while (dt < min_seconds);
    best = std::max(best, (double)(passes * nblk * kBlock * 8) / dt / 1e9);
  }
  return best;
}

}  // namespace elutq
