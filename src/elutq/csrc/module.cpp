// Python bindings for elutq's native code.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/map.h>

#include <map>
#include <string>

namespace nb = nanobind;

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

NB_MODULE(_native, m) {
  m.doc() = "elutq native code";
  m.def("cpu_features", &cpu_features, "SIMD features of this CPU, as detected at run time.");
}
