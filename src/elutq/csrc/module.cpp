// Python bindings for elutq's native code.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention.h"
#include "decode.h"
#include "fit.h"
#include "lut_driver.h"
#include "runtime.h"

namespace nb = nanobind;
using namespace elutq;

// CPU features the kernels dispatch on, detected at run time.
static std::map<std::string, bool> cpu_features() {
  std::map<std::string, bool> f;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  f["avx2"] = __builtin_cpu_supports("avx2");
  f["fma"] = __builtin_cpu_supports("fma");
  f["avx512f"] = __builtin_cpu_supports("avx512f");
  f["avx512bw"] = __builtin_cpu_supports("avx512bw");
  f["avx512vbmi"] = __builtin_cpu_supports("avx512vbmi");
  f["avx512vnni"] = __builtin_cpu_supports("avx512vnni");
  f["avx512bf16"] = __builtin_cpu_supports("avx512bf16");  // finetune's bf16 autocast pays only with it
#elif defined(__aarch64__)
  f["neon"] = true;
#endif
  return f;
}

template <typename T, typename... Extra>
using CArray = nb::ndarray<T, nb::c_contig, nb::device::cpu, Extra...>;

// A repacked matrix (see lut.h for the layout), owning 64-byte-aligned copies of its buffers.
struct PackedWeight : LutMatrix {
  PackedWeight(CArray<const uint8_t> w, CArray<const uint16_t> sz, int out, int in, int bits, int g, bool avx2_order)
      : LutMatrix(w.data(), w.size(), sz.data(), sz.size(), out, in, bits, g, avx2_order) {}
};

static Path resolve(const std::string& path) { return path.empty() ? default_path() : parse_path(path); }

static void matmul(const std::vector<const PackedWeight*>& ws, CArray<const float, nb::ndim<2>> x,
                   std::vector<CArray<float, nb::ndim<2>>> ys, const std::string& path, bool float_tables,
                   int max_threads, bool residual_tables) {
  if (ws.empty()) throw std::invalid_argument("no matrices given");
  if (ys.size() != ws.size()) throw std::invalid_argument("need one output array per matrix");
  const int n = (int)x.shape(0);
  std::vector<LutWeight> views;
  std::vector<float*> outs;
  for (size_t i = 0; i < ws.size(); ++i) {
    if (!ws[i]) throw std::invalid_argument("None is not a packed weight");
    const LutWeight& W = ws[i]->view;
    if ((int)x.shape(1) != W.in)
      throw std::invalid_argument("input has " + std::to_string(x.shape(1)) + " features, matrix expects " +
                                  std::to_string(W.in));
    if ((int)ys[i].shape(0) != n || (int)ys[i].shape(1) != W.out)
      throw std::invalid_argument("output array has the wrong shape");
    views.push_back(W);
    outs.push_back(ys[i].data());
  }
  const Path p = resolve(path);
  nb::gil_scoped_release release;
  lut_matmul(views, x.data(), n, outs, p, float_tables, max_threads, residual_tables);
}

// out[r] = softmax(scale·q[r]·K[:, off:off+D]ᵀ)·V[:, off:off+D] for every query row r (attention.h: attend_*);
// k and v hold fp16 bits (a float16 array viewed as uint16), as the KV cache does.  ncol > 1: q's rows
// are ncol columns of grp rows, column i attending to the first len − ncol + 1 + i positions
// (attend_columns, attention.h).
static void attention(CArray<const float, nb::ndim<2>> q, CArray<const uint16_t, nb::ndim<2>> k,
                      CArray<const uint16_t, nb::ndim<2>> v, int off, float scale, CArray<float, nb::ndim<2>> out,
                      const std::string& path, int ncol) {
  const int rows = (int)q.shape(0), D = (int)q.shape(1), len = (int)k.shape(0);
  if (rows < 1 || D < 1 || len < 1) throw std::invalid_argument("q and k need at least one row and column");
  if (ncol < 1 || ncol > len || rows % ncol != 0)
    throw std::invalid_argument("ncol must divide q's rows and be at most k's rows");
  const int grp = rows / ncol;
  if (v.shape(0) != k.shape(0) || v.shape(1) != k.shape(1)) throw std::invalid_argument("k and v must have one shape");
  if (off < 0 || (size_t)off + (size_t)D > k.shape(1)) throw std::invalid_argument("off + head_dim exceeds k's columns");
  if (out.shape(0) != q.shape(0) || out.shape(1) != q.shape(1)) throw std::invalid_argument("out must have q's shape");
  std::vector<float> sc((size_t)rows * len);
  attend_columns(resolve(path), q.data(), k.data() + off, v.data() + off, k.shape(1), len, D, grp, ncol, scale,
                 sc.data(), out.data());
}

static void tables(CArray<const float, nb::ndim<1>> x, int g, CArray<int8_t> tq, CArray<uint8_t> tm, CArray<float> ls,
                   CArray<float> xs, const std::string& path) {
  const int in = (int)x.shape(0), ng = (in + g - 1) / g;
  if (g != 32 && g != 64 && g != 128) throw std::invalid_argument("group size must be 32, 64 or 128");
  if (tq.size() != (size_t)ng * g * 4 || tm.size() != (size_t)ng * g / 4 || ls.size() != (size_t)ng ||
      xs.size() != (size_t)ng)
    throw std::invalid_argument("table output arrays have the wrong size");
  build_tables(resolve(path), x.data(), in, g, ng, tq.data(), tm.data(), (size_t)g * 4, ls.data(), xs.data());
}

// ------------------------------------------------------------------------------ runtime bindings

static RtLinear& linear_slot(Runtime& rt, int layer, int which) {
  if (layer == -1) {
    if (which != 0 && which != 1) throw std::out_of_range("layer -1 has lm_head (0) and the final rotation (1)");
    if (which == 0) rt.embed_from_head = false;  // a new head: embeddings looked up in it must be asked for again
    return which == 0 ? rt.lm_head : rt.final_rot;
  }
  if (layer < 0 || layer >= rt.cfg.n_layers) throw std::out_of_range("layer index out of range");
  if (which < 0 || which >= kNumLinears) throw std::out_of_range("linear index out of range");
  return rt.layers[layer].lin[which];
}

static std::vector<float> to_vec(CArray<const float, nb::ndim<1>> a) { return {a.data(), a.data() + a.size()}; }

static void set_bias(RtLinear& L, CArray<const float, nb::ndim<1>> bias) {
  if (bias.size() != 0 && (int)bias.size() != L.out) throw std::invalid_argument("bias has the wrong length");
  L.bias = to_vec(bias);
}

// Takes pw's buffers (a second copy of every matrix at load would cost its size in peak memory and time):
// pw is empty afterwards, and a matmul with it is refused for its shape.  Not while another thread multiplies
// with pw (matmul releases the GIL): the loaders hand each PackedWeight over as soon as it is made.
static void set_lut(Runtime& rt, int layer, int which, PackedWeight& pw, CArray<const float, nb::ndim<1>> bias) {
  RtLinear& L = linear_slot(rt, layer, which);
  if (!pw.view.w) throw std::invalid_argument("this packed weight was already handed to a runtime");
  L.lut = std::make_unique<LutMatrix>(std::move(static_cast<LutMatrix&>(pw)));
  pw.view = LutWeight{};
  L.out = L.lut->view.out;
  L.in = L.lut->view.in;
  L.w16 = nullptr;
  set_bias(L, bias);
}

static void set_dense(Runtime& rt, int layer, int which, CArray<const uint16_t, nb::ndim<2>> w,
                      CArray<const float, nb::ndim<1>> bias) {
  RtLinear& L = linear_slot(rt, layer, which);
  L.lut.reset();
  L.out = (int)w.shape(0);
  L.in = (int)w.shape(1);
  L.own.resize(w.size() * 2);
  std::memcpy(L.own.p, w.data(), w.size() * 2);
  L.w16 = (const uint16_t*)L.own.p;
  set_bias(L, bias);
}

static HadamardSpec make_hadamard(const std::vector<float>& s, const std::vector<float>& a, int m, int m2) {
  const int n = (int)s.size();
  if (m < 1 || m != m2 || n % m) throw std::invalid_argument("the Hadamard factor must be square, its order dividing n");
  const int b = n / m;
  if (b & (b - 1)) throw std::invalid_argument("n / the Hadamard factor's order must be a power of two");
  bool identity = true;
  for (int i = 0; i < m && identity; ++i)
    for (int j = 0; j < m; ++j) identity &= a[(size_t)i * m + j] == (i == j ? 1.0f : 0.0f);
  return HadamardSpec{n, m, b, s.data(), a.data(), identity};
}

// x [N][n] in place (tests check it against the dense matrix).
static void hadamard_rows(CArray<float, nb::ndim<2>> x, CArray<const float, nb::ndim<1>> s,
                          CArray<const float, nb::ndim<2>> a, const std::string& path) {
  const Path p = path == "auto" ? default_path() : parse_path(path);
  std::vector<float> sv = to_vec(s), av(a.data(), a.data() + a.size());
  const HadamardSpec h = make_hadamard(sv, av, (int)a.shape(0), (int)a.shape(1));
  if ((int)x.shape(1) != h.n) throw std::invalid_argument("x must be [N, n]");
  std::vector<float> tmp(h.n);
  for (size_t r = 0; r < x.shape(0); ++r) hadamard_transform(h, x.data() + r * h.n, tmp.data(), p);
}

// Shapes: decode.h.  Both release the GIL and use the kernel thread pool.
static void check_planes(const CArray<const uint8_t, nb::ndim<3>>& q, int in, int g) {
  if (q.shape(0) < 1 || q.shape(0) > 8 || in < 1 || g < 1 || (int)q.shape(2) != (in + 7) / 8)
    throw std::invalid_argument("qweight must be [bits 1..8, out, ceil(in/8)] and group_size >= 1");
}

static void hlq_decode_py(CArray<const uint8_t, nb::ndim<3>> q, CArray<const float, nb::ndim<3>> s,
                          CArray<const float, nb::ndim<2>> z, int in, int g, CArray<float, nb::ndim<2>> w) {
  check_planes(q, in, g);
  const int bits = (int)q.shape(0), out = (int)q.shape(1), ng = (in + g - 1) / g;
  if ((int)s.shape(0) != out || (int)s.shape(1) != ng || (int)s.shape(2) != bits || (int)z.shape(0) != out ||
      (int)z.shape(1) != ng)
    throw std::invalid_argument("scales must be [out, ceil(in/group_size), bits] and zeros [out, ceil(in/group_size)]");
  if ((int)w.shape(0) != out || (int)w.shape(1) != in) throw std::invalid_argument("w must be [out, in]");
  nb::gil_scoped_release release;
  hlq_decode(q.data(), s.data(), z.data(), bits, out, in, g, w.data(), pool().size());
}

// Shapes: fit.h.  Releases the GIL and uses the kernel thread pool.
static void hlq_fit_als_py(CArray<const float, nb::ndim<2>> w, CArray<const float, nb::ndim<2>> h, int bits, int iters,
                           CArray<float, nb::ndim<2>> s, CArray<float, nb::ndim<1>> z) {
  const long n = (long)w.shape(0);
  const int g = (int)w.shape(1), p = (int)h.shape(0);
  if (bits < 1 || bits > 4 || iters < 0) throw std::invalid_argument("bits must be 1..4 and iters >= 0");
  if (g < 1 || p < 1 || (int)h.shape(1) != g || n % p != 0)
    throw std::invalid_argument("w must be [N, g] and h [P, g] with P dividing N");
  if ((long)s.shape(0) != n || (int)s.shape(1) != bits || (long)z.shape(0) != n)
    throw std::invalid_argument("scales must be [N, bits] and zeros [N]");
  nb::gil_scoped_release release;
  hlq_fit_als(w.data(), h.data(), n, p, g, bits, iters, s.data(), z.data(), pool().size());
}

static void hlq_assign_py(CArray<const float, nb::ndim<2>> w, CArray<const float, nb::ndim<2>> s,
                          CArray<const float, nb::ndim<1>> z, CArray<uint8_t, nb::ndim<2>> codes) {
  const long n = (long)w.shape(0);
  const int g = (int)w.shape(1), bits = (int)s.shape(1);
  if (bits < 1 || bits > 4 || (long)s.shape(0) != n || (long)z.shape(0) != n)
    throw std::invalid_argument("scales must be [N, bits 1..4] and zeros [N] for w [N, g]");
  if ((long)codes.shape(0) != n || (int)codes.shape(1) != g) throw std::invalid_argument("codes must be [N, g]");
  nb::gil_scoped_release release;
  hlq_assign(w.data(), s.data(), z.data(), n, g, bits, codes.data(), pool().size());
}

static void hlq_dequantize_py(CArray<const uint8_t, nb::ndim<2>> codes, CArray<const float, nb::ndim<3>> s,
                              CArray<const float, nb::ndim<2>> z, int g, CArray<float, nb::ndim<2>> w) {
  const int out = (int)codes.shape(0), in = (int)codes.shape(1), bits = (int)s.shape(2);
  if (g < 1 || bits < 1 || bits > 4 || (int)s.shape(0) != out || (int)s.shape(1) != (in + g - 1) / g ||
      (int)z.shape(0) != out || (int)z.shape(1) != (int)s.shape(1))
    throw std::invalid_argument("scales must be [out, ceil(in/group_size), bits 1..4] and zeros [out, ceil(in/group_size)]");
  if ((int)w.shape(0) != out || (int)w.shape(1) != in) throw std::invalid_argument("w must be [out, in]");
  nb::gil_scoped_release release;
  hlq_dequantize(codes.data(), s.data(), z.data(), out, in, g, bits, w.data(), pool().size());
}

static void hlq_decode_grad_py(CArray<const uint8_t, nb::ndim<3>> q, CArray<const float, nb::ndim<2>> gw, int g,
                               CArray<float, nb::ndim<3>> gs, CArray<float, nb::ndim<2>> gz) {
  const int in = (int)gw.shape(1), bits = (int)q.shape(0), out = (int)q.shape(1), ng = (in + g - 1) / g;
  check_planes(q, in, g);
  if ((int)gw.shape(0) != out) throw std::invalid_argument("grad must be [out, in]");
  if ((int)gs.shape(0) != out || (int)gs.shape(1) != ng || (int)gs.shape(2) != bits || (int)gz.shape(0) != out ||
      (int)gz.shape(1) != ng)
    throw std::invalid_argument("grad_scales must be [out, ng, bits] and grad_zeros [out, ng]");
  nb::gil_scoped_release release;
  hlq_decode_grad(q.data(), gw.data(), bits, out, in, g, gs.data(), gz.data(), pool().size());
}

static void rt_forward(Runtime& rt, std::vector<KVCache*> caches, std::vector<int> pos, std::vector<int> lens,
                       std::vector<bool> all_logits, CArray<const int32_t, nb::ndim<1>> tokens,
                       CArray<float, nb::ndim<2>> logits) {
  const size_t S = caches.size();
  if (pos.size() != S || lens.size() != S || all_logits.size() != S)
    throw std::invalid_argument("caches, positions, lengths and all_logits need one entry per sequence");
  std::vector<SeqSpan> seqs(S);
  size_t n = 0, r = 0;
  for (size_t s = 0; s < S; ++s) {
    seqs[s] = SeqSpan{caches[s], pos[s], lens[s], (bool)all_logits[s]};
    n += std::max(lens[s], 0);
    r += all_logits[s] ? std::max(lens[s], 0) : 1;
  }
  if (tokens.size() != n) throw std::invalid_argument("tokens must hold the sum of the lengths");
  if (logits.shape(0) != r || (int)logits.shape(1) != rt.cfg.vocab)
    throw std::invalid_argument("logits must be [rows, vocab] with one row per requested position");
  rt.check_complete();
  nb::gil_scoped_release release;
  rt.forward(seqs, tokens.data(), logits.data());
}

static void rt_sample(CArray<const float, nb::ndim<2>> logits, CArray<const float, nb::ndim<1>> inv_t,
                      CArray<const int32_t, nb::ndim<1>> top_k, CArray<const float, nb::ndim<1>> top_p,
                      CArray<const double, nb::ndim<1>> u, CArray<int32_t, nb::ndim<1>> out) {
  const size_t R = logits.shape(0);
  if (inv_t.size() != R || top_k.size() != R || top_p.size() != R || u.size() != R || out.size() != R)
    throw std::invalid_argument("inv_t, top_k, top_p, u and out need one entry per row of logits");
  if (logits.shape(1) < 1) throw std::invalid_argument("logits need at least one column");
  for (size_t r = 0; r < R; ++r)
    if (!(inv_t.data()[r] >= 0.0f) || !(top_p.data()[r] > 0.0f && top_p.data()[r] <= 1.0f) || top_k.data()[r] < 0 ||
        !(u.data()[r] >= 0.0 && u.data()[r] < 1.0))
      throw std::invalid_argument("row " + std::to_string(r) + ": need inv_t >= 0, 0 < top_p <= 1, top_k >= 0, 0 <= u < 1");
  nb::gil_scoped_release release;
  sample_rows(logits.data(), (int)R, (int)logits.shape(1), inv_t.data(), top_k.data(), top_p.data(), u.data(),
              out.data());
}

NB_MODULE(_native, m) {
  m.doc() = "elutq native code";
  // Objects still referenced by daemon threads (a server's engine) at interpreter exit are fine.
  nb::set_leak_warnings(false);
  m.def("cpu_features", &cpu_features, "SIMD features of this CPU, as detected at run time.");

  nb::class_<PackedWeight>(m, "PackedWeight", "A repacked HLQ matrix in the LUT kernel layout (see lut.h).")
      .def(nb::init<CArray<const uint8_t>, CArray<const uint16_t>, int, int, int, int, bool>(), nb::arg("w"),
           nb::arg("sz"), nb::arg("out_features"), nb::arg("in_features"), nb::arg("bits"), nb::arg("group_size"),
           nb::arg("avx2_order") = false,
           "avx2_order: keep the chunks in the AVX2 order (lut.h); such a matrix runs on the avx2 and scalar paths only")
      .def_prop_ro("avx2_order", [](const PackedWeight& p) { return p.view.avx2_order; })
      .def_prop_ro("out_features", [](const PackedWeight& p) { return p.view.out; })
      .def_prop_ro("in_features", [](const PackedWeight& p) { return p.view.in; })
      .def_prop_ro("bits", [](const PackedWeight& p) { return p.view.bits; })
      .def_prop_ro("group_size", [](const PackedWeight& p) { return p.view.g; })
      .def_prop_ro("nbytes", [](const PackedWeight& p) { return p.nbytes(); }, "bytes of packed weights + scales streamed per call")
      .def("row", [](const PackedWeight& p, int r) {
             if (r < 0 || r >= p.view.out) throw std::invalid_argument("row out of range");
             auto* x = new float[p.view.in];
             lut_row(p.view, r, x);
             nb::capsule owner(x, [](void* q) noexcept { delete[] (float*)q; });
             return nb::ndarray<nb::numpy, float, nb::ndim<1>>(x, {(size_t)p.view.in}, owner);
           }, nb::arg("r"), "Row r decoded from the kernel layout (what an embedding lookup in this matrix returns).");

  m.def("matmul", &matmul, nb::arg("weights"), nb::arg("x"), nb::arg("outs"), nb::arg("path") = "",
        nb::arg("float_tables") = false, nb::arg("max_threads") = 0, nb::arg("residual_tables") = false,
        "outs[w][c, :] = weights[w] · x[c, :] for every matrix w, sharing x's tables across matrices.");
  m.def("build_tables", &tables, nb::arg("x"), nb::arg("group_size"), nb::arg("tq"), nb::arg("tm"), nb::arg("lut_scale"),
        nb::arg("xsum"), nb::arg("path") = "", "int8 activation tables of one vector (for tests).");
  m.def("attention", &attention, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("off"), nb::arg("scale"),
        nb::arg("out"), nb::arg("path") = "", nb::arg("ncol") = 1,
        "Causal attention of one column (or ncol consecutive ones) for one KV head (for tests).");
  m.def("available_paths", [] {
    std::vector<std::string> v;
    for (Path p : available_paths()) v.push_back(path_name(p));
    return v;
  });
  m.def("default_path", [] { return std::string(path_name(default_path())); },
        "ELUTQ_KERNEL if set, else the best path this CPU supports.");
  m.def("hadamard", &hadamard_rows, nb::arg("x"), nb::arg("signs"), nb::arg("a"), nb::arg("path") = "auto",
        "Rows of x [N, n] in place: x -> x·T, T = diag(signs)·(a ⊗ Sylvester_b)/sqrt(b) (hadamard.h).");
  m.def("hlq_decode", &hlq_decode_py, nb::arg("qweight"), nb::arg("scales"), nb::arg("zeros"), nb::arg("in_features"),
        nb::arg("group_size"), nb::arg("out"), "Weight [out, in] from packed bit-planes, scales, zeros (decode.h).");
  m.def("hlq_decode_grad", &hlq_decode_grad_py, nb::arg("qweight"), nb::arg("grad"), nb::arg("group_size"),
        nb::arg("grad_scales"), nb::arg("grad_zeros"), "Gradients of scales and offsets from the weight's (decode.h).");
  m.def("hlq_fit_als", &hlq_fit_als_py, nb::arg("w"), nb::arg("h"), nb::arg("bits"), nb::arg("iters"), nb::arg("scales"),
        nb::arg("zeros"), "HLQ scales and offsets of each group (row of w) by alternating least squares (fit.h).");
  m.def("hlq_assign", &hlq_assign_py, nb::arg("w"), nb::arg("scales"), nb::arg("zeros"), nb::arg("codes"),
        "Each weight's nearest HLQ level's code, group by group (fit.h).");
  m.def("hlq_dequantize", &hlq_dequantize_py, nb::arg("codes"), nb::arg("scales"), nb::arg("zeros"), nb::arg("group_size"),
        nb::arg("out"), "Weight [out, in] from unpacked codes, scales, zeros (fit.h).");
  m.def("set_num_threads", &set_num_threads, nb::arg("n"));
  m.def("sample_rows", &rt_sample, nb::arg("logits"), nb::arg("inv_t"), nb::arg("top_k"), nb::arg("top_p"), nb::arg("u"),
        nb::arg("out"), "Sample one token per row of logits (see runtime.h: sample_rows).  Releases the GIL.");
  m.def("get_num_threads", &get_num_threads);
  m.def("read_bandwidth", [](size_t bytes, int reps, int threads, double min_seconds) {
    nb::gil_scoped_release r;
    return read_bandwidth(bytes, reps, threads, min_seconds);
  }, nb::arg("nbytes"), nb::arg("reps"), nb::arg("threads"), nb::arg("min_seconds") = 0.0,
  "Read bandwidth in GB/s: the best of reps windows each of a plain and a prefetching (ELUTQ_PF) read loop; "
        "a window reads the buffer until min_seconds have passed (0: one pass).");

  nb::class_<KVCache>(m, "KVCache", "Per-sequence key/value cache: fp16 [layers][kv_heads][max_ctx][head_dim] for k and v.")
      .def(nb::init<int, int, int, int>(), nb::arg("n_layers"), nb::arg("max_ctx"), nb::arg("n_kv_heads"),
           nb::arg("head_dim"))
      .def_ro("max_ctx", &KVCache::max_ctx)
      .def_prop_ro("nbytes", &KVCache::nbytes)
      .def("copy_prefix", [](KVCache& self, const KVCache& src, int n) {
        if (src.n_layers != self.n_layers || src.n_kv_heads != self.n_kv_heads || src.head_dim != self.head_dim)
          throw std::invalid_argument("KV caches of different models");
        if (n < 0 || n > src.max_ctx || n > self.max_ctx)
          throw std::out_of_range("prefix of " + std::to_string(n) + " positions does not fit both caches");
        if (&src == &self) return;
        for (int l = 0; l < self.n_layers; ++l)
          for (int h = 0; h < self.n_kv_heads; ++h) {
            std::memcpy(self.kp(l, h, 0), const_cast<KVCache&>(src).kp(l, h, 0), sizeof(uint16_t) * n * self.head_dim);
            std::memcpy(self.vp(l, h, 0), const_cast<KVCache&>(src).vp(l, h, 0), sizeof(uint16_t) * n * self.head_dim);
          }
      }, nb::arg("src"), nb::arg("n"), "Copy positions 0..n-1 of every layer from src (a shared prompt prefix).");

  nb::class_<Runtime>(m, "Runtime", "The native decode loop of a llama-family model (see runtime.h).")
      .def("__init__",
           [](Runtime* self, int n_layers, int hidden, int inter, int n_heads, int n_kv_heads, int head_dim, int vocab,
              float rms_eps, CArray<const float, nb::ndim<1>> inv_freq, float rope_scale) {
             RtConfig c;
             c.n_layers = n_layers; c.hidden = hidden; c.inter = inter; c.n_heads = n_heads;
             c.n_kv_heads = n_kv_heads; c.head_dim = head_dim; c.vocab = vocab; c.rms_eps = rms_eps;
             c.inv_freq = to_vec(inv_freq); c.rope_scale = rope_scale;
             new (self) Runtime(std::move(c));
           },
           nb::arg("n_layers"), nb::arg("hidden"), nb::arg("intermediate"), nb::arg("n_heads"), nb::arg("n_kv_heads"),
           nb::arg("head_dim"), nb::arg("vocab"), nb::arg("rms_eps"), nb::arg("inv_freq"), nb::arg("rope_scale"))
      .def("set_lut", &set_lut, nb::arg("layer"), nb::arg("which"), nb::arg("weight"), nb::arg("bias"),
           "Linear `which` (0..6: q k v o gate up down) of `layer` (-1: lm_head 0, final norm's rotation 1) from a "
           "PackedWeight, whose memory it takes (the PackedWeight is empty afterwards).")
      .def("set_dense", &set_dense, nb::arg("layer"), nb::arg("which"), nb::arg("w"), nb::arg("bias"),
           "The same, from dense fp16 bits [out, in] (copied).")
      .def("tie_lm_head", [](Runtime& rt) {
             if (!rt.embed.p) throw std::invalid_argument("set the embedding first");
             rt.embed_from_head = false;
             rt.lm_head.lut.reset();
             rt.lm_head.out = rt.cfg.vocab;
             rt.lm_head.in = rt.cfg.hidden;
             rt.lm_head.w16 = (const uint16_t*)rt.embed.p;
             rt.lm_head.bias.clear();
           }, "lm_head reads the embedding matrix (tied embeddings).")
      .def("embed_from_lm_head", [](Runtime& rt) {
             const RtLinear& h = rt.lm_head;
             if (!h.lut || h.out != rt.cfg.vocab || h.in != rt.cfg.hidden)
               throw std::invalid_argument("set a quantized lm_head [vocab, hidden] first");
             rt.embed_from_head = true;
           }, "Embeddings are lm_head's rows, decoded from its LUT matrix at lookup (one stored tensor for a tied "
              "model's head and embeddings).")
      .def("set_embedding", [](Runtime& rt, CArray<const uint16_t, nb::ndim<2>> e) {
             if ((int)e.shape(0) != rt.cfg.vocab || (int)e.shape(1) != rt.cfg.hidden)
               throw std::invalid_argument("embedding must be fp16 bits [vocab, hidden]");
             rt.embed.resize(e.size() * 2);
             std::memcpy(rt.embed.p, e.data(), e.size() * 2);
           }, nb::arg("w"))
      .def("set_embedding_hlq",
           [](Runtime& rt, CArray<const uint8_t, nb::ndim<3>> qw, CArray<const uint16_t, nb::ndim<3>> sc,
              CArray<const uint16_t, nb::ndim<2>> zr, int group_size) {
             const int V = rt.cfg.vocab, H = rt.cfg.hidden, bits = (int)qw.shape(0);
             if (bits < 1 || bits > 4) throw std::invalid_argument("embedding bits must be 1..4");
             if (group_size < 1) throw std::invalid_argument("embedding group size must be positive");
             const int ng = (H + group_size - 1) / group_size, rb = (H + 7) / 8;
             if ((int)qw.shape(1) != V || (int)qw.shape(2) != rb)
               throw std::invalid_argument("embedding qweight must be uint8 [bits, vocab, ceil(hidden/8)]");
             if ((int)sc.shape(0) != V || (int)sc.shape(1) != ng || (int)sc.shape(2) != bits)
               throw std::invalid_argument("embedding scales must be fp16 bits [vocab, groups, bits]");
             if ((int)zr.shape(0) != V || (int)zr.shape(1) != ng)
               throw std::invalid_argument("embedding zeros must be fp16 bits [vocab, groups]");
             HlqEmbedding& e = rt.embed_q;
             e.qw.resize(qw.size());
             std::memcpy(e.qw.p, qw.data(), qw.size());
             e.sc.resize(sc.size() * 2);
             std::memcpy(e.sc.p, sc.data(), sc.size() * 2);
             e.zr.resize(zr.size() * 2);
             std::memcpy(e.zr.p, zr.data(), zr.size() * 2);
             e.bits = bits, e.g = group_size, e.ng = ng, e.row_bytes = rb, e.vocab = V;
           },
           nb::arg("qweight"), nb::arg("scales"), nb::arg("zeros"), nb::arg("group_size"),
           "HLQ embeddings from the checkpoint's tensors (copied): qweight uint8 [bits, vocab, ceil(hidden/8)], "
           "scales / zeros fp16 bits [vocab, groups, bits] / [vocab, groups].")
      .def("set_down_rotation", [](Runtime& rt, CArray<const float, nb::ndim<1>> s, CArray<const float, nb::ndim<2>> a) {
             rt.down_rot_s = to_vec(s);
             rt.down_rot_a.assign(a.data(), a.data() + a.size());
             rt.down_rot = make_hadamard(rt.down_rot_s, rt.down_rot_a, (int)a.shape(0), (int)a.shape(1));
             if (rt.down_rot.n != rt.cfg.inter) throw std::invalid_argument("the down_proj rotation must have intermediate_size signs");
           }, nb::arg("signs"), nb::arg("a"),
           "--rotate full: down_proj's input u -> u·T, T = diag(signs)·(a ⊗ Sylvester_b)/sqrt(b) (hadamard.h).")
      .def("set_norm", [](Runtime& rt, int layer, const std::string& which, CArray<const float, nb::ndim<1>> w) {
             const int want = (which == "q" || which == "k") ? rt.cfg.head_dim : rt.cfg.hidden;
             if ((int)w.size() != want) throw std::invalid_argument("norm weight '" + which + "' has the wrong length");
             if (layer == -1 && which == "final") { rt.final_norm = to_vec(w); return; }
             if (layer < 0 || layer >= rt.cfg.n_layers) throw std::out_of_range("layer index out of range");
             RtLayer& L = rt.layers[layer];
             if (which == "attn") L.attn_norm = to_vec(w);
             else if (which == "mlp") L.mlp_norm = to_vec(w);
             else if (which == "q") L.q_norm = to_vec(w);
             else if (which == "k") L.k_norm = to_vec(w);
             else throw std::invalid_argument("norm must be attn, mlp, q, k (or final with layer -1)");
           }, nb::arg("layer"), nb::arg("which"), nb::arg("w"))
      .def("set_path", [](Runtime& rt, const std::string& p) { rt.path = resolve(p); }, nb::arg("path"))
      .def_prop_ro("path", [](const Runtime& rt) { return std::string(path_name(rt.path)); })
      .def_rw("float_tables", &Runtime::float_tables)
      .def_rw("residual_tables", &Runtime::residual_tables)
      .def_prop_ro("weight_bytes", &Runtime::weight_bytes, "bytes of weights one decode step streams")
      .def("forward", &rt_forward, nb::arg("caches"), nb::arg("positions"), nb::arg("lengths"), nb::arg("all_logits"),
           nb::arg("tokens"), nb::arg("logits"),
           "One step over a ragged batch of sequences; see runtime.h.  Releases the GIL.");
}
