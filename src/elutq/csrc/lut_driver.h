// LUT kernel driver API (baseline ISA): path selection, thread pool, multi-matrix GEMV/GEMM.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "lut.h"

namespace elutq {

const char* path_name(Path p);
bool path_available(Path p);
std::vector<Path> available_paths();
Path parse_path(const std::string& name);  // throws std::invalid_argument if unknown/unsupported
Path best_path();
Path default_path();  // ELUTQ_KERNEL if set (and not "auto"), else the best available

// A persistent pool: run(n, f) calls f(0, n) on the calling thread and f(tid, n) on each worker
// tid < n that wakes up before the caller has finished f(0, n).  So f must let any subset of the
// threads (always including tid 0) complete all the work: use parallel_for.
class ThreadPool {
 public:
  explicit ThreadPool(int n);
  ~ThreadPool();
  int size() const { return n_; }
  void run(int nthreads, const std::function<void(int, int)>& f);

 private:
  void worker(int tid);
  int n_;
  int spin_us_ = 300;
  std::vector<std::thread> threads_;
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> sleepers_{0};  // workers blocked on cv_ (run() only locks and notifies when > 0)
  static constexpr int kClosed = 1 << 30;
  std::atomic<int> state_{kClosed};  // participants of the current run, | kClosed once closed
  std::atomic<int> finished_{0};
  const std::function<void(int, int)>* job_ = nullptr;
  int active_ = 0;
  bool stop_ = false;
};

ThreadPool& pool();

// body(b, e) over [0, total) in chunks of `chunk`: thread t starts on its contiguous share
// [total·t/n, total·(t+1)/n) and, when done, takes the remaining chunks of the other shares, so a
// descheduled thread cannot stall the call.  Every index is processed exactly once.
void parallel_for(int nthreads, int total, int chunk, const std::function<void(int, int)>& body);
// body(a0, a1, b0, b1) over [0, total): thread t's share [s, e) (as parallel_for's) is cut into halves
// [s, m) and [m, e), m = s + ⌈(e − s)/2⌉, handed out side by side in steps of `step` indices per half
// (a: [s + j·step, …) ∩ [s, m), b: [m + j·step, …) ∩ [m, e), possibly empty), so a thread that keeps
// its share walks two continuous runs; idle threads take the others' remaining steps.  One thread: one
// call with both whole halves.  Every index is processed exactly once.
void parallel_halves(int nthreads, int total, int step, const std::function<void(int, int, int, int)>& body);
void set_num_threads(int n);
int get_num_threads();

struct AlignedBuf {
  void* p = nullptr;
  size_t cap = 0;
  // huge_pages: back a buffer of 2 MiB or more with huge pages (fewer TLB misses streaming weights); false
  // for one touched sparsely, such as a KV cache, where each touch would make a whole 2 MiB page resident.
  void resize(size_t bytes, bool huge_pages = true);
  AlignedBuf() = default;
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
  AlignedBuf(AlignedBuf&& o) noexcept : p(o.p), cap(o.cap) { o.p = nullptr, o.cap = 0; }
  ~AlignedBuf();
};

// An owning repacked matrix (64-byte-aligned copies of w and sz, see lut.h), for the Python
// binding and for native callers such as a decode loop.
struct LutMatrix {
  AlignedBuf wbuf, szbuf;
  LutWeight view;
  // w: nrb·ng·bits·(g/32)·64 bytes; sz: nrb·ng·(bits+1)·16 fp16 values.  Throws on bad sizes.
  // avx2_order: store the chunks in the AVX2 order (lut.h) — for a matrix the avx2 path will run.
  LutMatrix(const uint8_t* w, size_t w_bytes, const uint16_t* sz, size_t sz_elems, int out, int in, int bits, int g,
            bool avx2_order = false);
  size_t nbytes() const { return (size_t)view.nrb() * (view.w_bytes_per_rb() + 2 * view.sz_elems_per_rb()); }
};

// Row r of W as floats, x[0 .. in): the weights the kernels multiply by (w = z + Σ_i s_i·b_i, summed as
// hlq.levels sums it), read from the kernel layout in either chunk order.  A tied model looks its
// embeddings up here, in the head's matrix, rather than holding the table twice.
void lut_row(const LutWeight& W, int r, float* x);

void build_tables(Path p, const float* x, int in, int g, int ng, int8_t* tq, uint8_t* tm, size_t gstride,
                  float* lut_scale, float* xsum);

// Y_w[c, :] = W_w · X[c, :] for every matrix w (all with the same in_features and group size) and
// column c < n; the activation tables are built once per column and shared by all matrices.
// X is [n][in] (row-major), ys[w] is [n][out_w].  max_threads <= 0: the pool's size.
// residual: int8 tables plus their residual tables (build_residual_tables_scalar), two lookup passes.
void lut_matmul(const std::vector<LutWeight>& Ws, const float* X, int n, const std::vector<float*>& ys, Path p,
                bool float_tables, int max_threads = 0, bool residual = false);

double read_bandwidth(size_t bytes, int reps, int nthreads, double min_seconds = 0.0);

}  // namespace elutq
