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

#include "lut_driver.h"

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
#elif defined(__aarch64__)
  f["neon"] = true;
#endif
  return f;
}

template <typename T, typename... Extra>
using CArray = nb::ndarray<T, nb::c_contig, nb::device::cpu, Extra...>;

// A repacked matrix (see lut.h for the layout), owning 64-byte-aligned copies of its buffers.
struct PackedWeight : LutMatrix {
  PackedWeight(CArray<const uint8_t> w, CArray<const uint16_t> sz, int out, int in, int bits, int g)
      : LutMatrix(w.data(), w.size(), sz.data(), sz.size(), out, in, bits, g) {}
};

static Path resolve(const std::string& path) { return path.empty() ? default_path() : parse_path(path); }

static void matmul(const std::vector<const PackedWeight*>& ws, CArray<const float, nb::ndim<2>> x,
                   std::vector<CArray<float, nb::ndim<2>>> ys, const std::string& path, bool float_tables,
                   int max_threads) {
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
  lut_matmul(views, x.data(), n, outs, p, float_tables, max_threads);
}

static void tables(CArray<const float, nb::ndim<1>> x, int g, CArray<int8_t> tq, CArray<float> ls, CArray<float> xs,
                   const std::string& path) {
  const int in = (int)x.shape(0), ng = (in + g - 1) / g;
  if (g != 32 && g != 64 && g != 128) throw std::invalid_argument("group size must be 32, 64 or 128");
  if (tq.size() != (size_t)ng * g * 4 || ls.size() != (size_t)ng || xs.size() != (size_t)ng)
    throw std::invalid_argument("table output arrays have the wrong size");
  build_tables(resolve(path), x.data(), in, g, ng, tq.data(), (size_t)g * 4, ls.data(), xs.data());
}

NB_MODULE(_native, m) {
  m.doc() = "elutq native code";
  m.def("cpu_features", &cpu_features, "SIMD features of this CPU, as detected at run time.");

  nb::class_<PackedWeight>(m, "PackedWeight", "A repacked HLQ matrix in the LUT kernel layout (see lut.h).")
      .def(nb::init<CArray<const uint8_t>, CArray<const uint16_t>, int, int, int, int>(), nb::arg("w"),
           nb::arg("sz"), nb::arg("out_features"), nb::arg("in_features"), nb::arg("bits"), nb::arg("group_size"))
      .def_prop_ro("out_features", [](const PackedWeight& p) { return p.view.out; })
      .def_prop_ro("in_features", [](const PackedWeight& p) { return p.view.in; })
      .def_prop_ro("bits", [](const PackedWeight& p) { return p.view.bits; })
      .def_prop_ro("group_size", [](const PackedWeight& p) { return p.view.g; })
      .def_prop_ro("nbytes", [](const PackedWeight& p) { return p.nbytes(); }, "bytes of packed weights + scales streamed per call");

  m.def("matmul", &matmul, nb::arg("weights"), nb::arg("x"), nb::arg("outs"), nb::arg("path") = "",
        nb::arg("float_tables") = false, nb::arg("max_threads") = 0,
        "outs[w][c, :] = weights[w] · x[c, :] for every matrix w, sharing x's tables across matrices.");
  m.def("build_tables", &tables, nb::arg("x"), nb::arg("group_size"), nb::arg("tq"), nb::arg("lut_scale"),
        nb::arg("xsum"), nb::arg("path") = "", "int8 activation tables of one vector (for tests).");
  m.def("available_paths", [] {
    std::vector<std::string> v;
    for (Path p : available_paths()) v.push_back(path_name(p));
    return v;
  });
  m.def("default_path", [] { return std::string(path_name(default_path())); },
        "ELUTQ_KERNEL if set, else the best path this CPU supports.");
  m.def("set_num_threads", &set_num_threads, nb::arg("n"));
  m.def("get_num_threads", &get_num_threads);
  m.def("read_bandwidth", [](size_t bytes, int reps, int threads) {
    nb::gil_scoped_release r;
    return read_bandwidth(bytes, reps, threads);
  }, nb::arg("nbytes"), nb::arg("reps"), nb::arg("threads"), "Best-of-reps STREAM-like read bandwidth in GB/s.");
}
