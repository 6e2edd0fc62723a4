#!/usr/bin/env bash
# Optional: install llama.cpp (through the PyPI package llama-cpp-python, which builds it from
# source) into .venv, as the peer that benchmarks/bench_runtime.py measures elutq against.
# Not part of the tests or CI: the build takes ~15-25 min on 2 cores.
#
# Also unpacks the same sdist under $PEER_DIR so the benchmark can run llama.cpp's own
# HF->GGUF converter (vendor/llama.cpp/convert_hf_to_gguf.py; it imports the gguf-py next to it,
# so it matches the built llama.cpp whatever gguf version elutq itself has installed).
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_CPP_PYTHON_VERSION=0.3.36          # the version the README's figures were measured with
PEER_DIR=${PEER_DIR:-${ELUTQ_CACHE:-$HOME/.cache/elutq}/peer}
[ -x .venv/bin/python ] || bash scripts/setup.sh
pip() { .venv/bin/python -m pip "$@" --disable-pip-version-check; }

SDIST_DIR="$PEER_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
BUILD_DIR="$PEER_DIR/build-$LLAMA_CPP_PYTHON_VERSION"  # kept: the tools below reuse its objects
if [ ! -f "$SDIST_DIR/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
    mkdir -p "$PEER_DIR"
    pip download -q --no-deps --no-binary llama-cpp-python -d "$PEER_DIR" \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
    tar -xzf "$PEER_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" -C "$PEER_DIR"
fi

# GGML_NATIVE builds for the CPU this runs on (AVX2 or AVX-512, whatever it has) except AMX: on a
# VM whose CPU reports AMX, ggml's AMX matmul segfaults (seen 2 Dec 2026 in ggml_backend_amx_mul_mat),
# so it is compiled out (explicit -mno-* flags win over -march=native in GCC and Clang).
NO_AMX=""
if echo 'int main(void){return 0;}' | cc -mno-amx-int8 -x c -o /dev/null - 2>/dev/null; then
    NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
# llama-cpp-python's runtime deps and the converter's (it imports sentencepiece before it falls
# back to tokenizer.json through transformers, already in .venv).
pip install -q diskcache jinja2 typing-extensions pyyaml sentencepiece matplotlib  # matplotlib: bench_frontier.py plots
have=$(.venv/bin/python -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null || true)
amx=$(.venv/bin/python -c 'import llama_cpp; print(int(b"AMX" in llama_cpp.llama_print_system_info()))' \
      2>/dev/null || echo 0)
if [ "$have" != "$LLAMA_CPP_PYTHON_VERSION" ] || { [ -n "$NO_AMX" ] && [ "$amx" = 1 ]; }; then
    # Install from the unpacked sdist so the build matches the converter above.
    echo "building llama.cpp (llama-cpp-python $LLAMA_CPP_PYTHON_VERSION); this takes a while..."
    start=$(date +%s)
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DCMAKE_C_FLAGS='$NO_AMX' -DCMAKE_CXX_FLAGS='$NO_AMX'" \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
        nice -n 10 .venv/bin/python -m pip install --disable-pip-version-check -q --no-deps --force-reinstall --no-cache-dir \
        --config-settings=build-dir="$BUILD_DIR" "$SDIST_DIR"
    echo "llama-cpp-python built in $(( $(date +%s) - start )) s"
fi
# llama-imatrix and llama-quantize (benchmarks/bench_frontier.py: importance matrices and the IQ types), from
# the same sources with the same flags, configured on llama.cpp's own CMakeLists (the wrapper's build dir
# cannot also build the tools: CMake refuses its tools/mtmd binary dir twice); a few minutes more.
TOOLS_DIR="$PEER_DIR/tools-$LLAMA_CPP_PYTHON_VERSION"
if [ ! -x "$TOOLS_DIR/bin/llama-imatrix" ] || [ ! -x "$TOOLS_DIR/bin/llama-quantize" ]; then
    echo "building llama-imatrix and llama-quantize..."
    start=$(date +%s)
    cmake -S "$SDIST_DIR/vendor/llama.cpp" -B "$TOOLS_DIR" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF \
        -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" > "$PEER_DIR/tools-cmake.log" 2>&1 \
        || { tail -30 "$PEER_DIR/tools-cmake.log"; exit 1; }
    nice -n 10 cmake --build "$TOOLS_DIR" --target llama-imatrix llama-quantize -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
        > "$PEER_DIR/tools-build.log" 2>&1 || { tail -30 "$PEER_DIR/tools-build.log"; exit 1; }
    echo "llama-imatrix, llama-quantize built in $(( $(date +%s) - start )) s"
fi
.venv/bin/python -c 'import llama_cpp; print("llama_cpp", llama_cpp.__version__)'
echo "peer sources: $SDIST_DIR; tools: $TOOLS_DIR/bin"
