#!/usr/bin/env bash
# Cross-compile the LUT and attention kernels' NEON + scalar paths (with the standalone C++ self-test
# driver, src/elutq/csrc/lut_selftest.cpp) for AArch64 and run them under qemu-user.  Exits non-zero if
# the build fails or any NEON result disagrees with the scalar reference.
#
#   scripts/test_neon.sh            # installs gcc-aarch64-linux-gnu, g++-aarch64-linux-gnu and
#                                   # qemu-user with apt-get if they are missing
#   HOST=1 scripts/test_neon.sh     # also build and run the driver natively (x86: AVX2/AVX-512)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/src/elutq/csrc"
OUT="${OUT_DIR:-$(mktemp -d)}"
CXX_AARCH64="${CXX_AARCH64:-aarch64-linux-gnu-g++}"

need_install=()
command -v "$CXX_AARCH64" >/dev/null 2>&1 || need_install+=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null 2>&1 || need_install+=(qemu-user)
if [ ${#need_install[@]} -gt 0 ]; then
  echo "installing ${need_install[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${need_install[@]}"
fi

echo "== aarch64 build ($CXX_AARCH64)"
"$CXX_AARCH64" -O2 -std=c++17 -pthread -Wall -Wextra -Werror=return-type \
  -o "$OUT/lut_selftest_aarch64" \
  "$SRC/lut_selftest.cpp" "$SRC/lut.cpp" "$SRC/lut_scalar.cpp" "$SRC/lut_neon.cpp" \
  "$SRC/attention.cpp" "$SRC/attention_scalar.cpp" "$SRC/attention_neon.cpp"

echo "== run under qemu-aarch64"
QEMU_LD_PREFIX="${QEMU_LD_PREFIX:-/usr/aarch64-linux-gnu}"
out="$(qemu-aarch64 -L "$QEMU_LD_PREFIX" "$OUT/lut_selftest_aarch64")"
echo "$out"
echo "$out" | grep -q "neon" || { echo "NEON path was not exercised"; exit 1; }

CXX="${CXX:-g++}"
AVX2_FLAGS=(-mavx2 -mfma -mf16c)  # as CMakeLists.txt compiles these files
AVX512_FLAGS=(-mavx512f -mavx512bw -mavx512vl -mavx512vbmi -mavx512vnni -mfma -mf16c)
if [ "$(uname -m)" = "x86_64" ]; then
  # Code built with ISA flags may run only after the run-time dispatch has checked the CPU: a file
  # compiled with them must hold no constructor run at load time (.init_array: the import itself would
  # die with SIGILL on a CPU without those instructions) and no weak (inline or template) function the
  # linker could pick for the other files' calls.
  echo "== x86-64 ISA files: nothing runs before dispatch"
  for f in "$SRC"/*_avx2.cpp "$SRC"/*_avx512.cpp; do
    flags=("${AVX2_FLAGS[@]}"); [[ "$f" == *_avx512.cpp ]] && flags=("${AVX512_FLAGS[@]}")
    o="$OUT/isa_$(basename "$f" .cpp).o"
    "$CXX" -O3 -DNDEBUG -std=gnu++17 -fPIC -fvisibility=hidden -ffunction-sections -fdata-sections -c "$f" \
      "${flags[@]}" -o "$o"  # as the extension's build (CMake) compiles it
    sections="$(objdump -h "$o")"  # (whole, not piped into grep -q: no SIGPIPE under pipefail)
    if grep -qE '\.(init_array|ctors)' <<<"$sections"; then
      echo "$(basename "$f"): a static constructor compiled with ${flags[0]} runs when the library loads"; exit 1
    fi
    symbols="$(nm -P "$o")"
    weak="$(awk '$2 ~ /^[WVu]$/' <<<"$symbols")"
    [ -z "$weak" ] || { echo "$(basename "$f"): weak symbols compiled with ${flags[0]}:"; echo "$weak"; exit 1; }
  done
fi

if [ "${HOST:-0}" = "1" ] && [ "$(uname -m)" = "x86_64" ]; then
  echo "== host build (x86-64, runtime-dispatched AVX2/AVX-512)"
  for f in lut_avx2 attention_avx2; do "$CXX" -O2 -std=c++17 -c "$SRC/$f.cpp" "${AVX2_FLAGS[@]}" -o "$OUT/$f.o"; done
  for f in lut_avx512 attention_avx512; do "$CXX" -O2 -std=c++17 -c "$SRC/$f.cpp" "${AVX512_FLAGS[@]}" -o "$OUT/$f.o"; done
  "$CXX" -O2 -std=c++17 -pthread -o "$OUT/lut_selftest_host" "$SRC/lut_selftest.cpp" "$SRC/lut.cpp" \
    "$SRC/lut_scalar.cpp" "$SRC/attention.cpp" "$SRC/attention_scalar.cpp" \
    "$OUT/lut_avx2.o" "$OUT/attention_avx2.o" "$OUT/lut_avx512.o" "$OUT/attention_avx512.o"
  "$OUT/lut_selftest_host"
fi
echo "OK"
