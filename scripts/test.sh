#!/usr/bin/env bash
# Set up from scratch (if needed), lint, and run the whole test suite, slow end-to-end tests included.
# Pass pytest options through, e.g. `bash scripts/test.sh -m "not slow"` for the quick suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
# The NEON kernels: cross-compiled for AArch64 and run under qemu-user against the scalar reference.
bash scripts/test_neon.sh
# The chat page's tests run in a real headless browser.
bash scripts/setup_browser.sh
.venv/bin/python -m pytest -q "$@"
