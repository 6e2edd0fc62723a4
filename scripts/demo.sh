#!/usr/bin/env bash
# The main job end to end on the built-in default model: set up, quantize, evaluate, generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-out/smollm2-135m-hlq-w4g128}
.venv/bin/elutq quantize default -o "$OUT" --method rtn --format hlq --bits 4 --group-size 128 --overwrite
.venv/bin/elutq info "$OUT"
# 32k tokens of WikiText-2 test keep the demo to a few minutes; drop --max-tokens for the full set.
.venv/bin/elutq eval "$OUT" --dataset wikitext2 --max-tokens 32768
.venv/bin/elutq generate "$OUT" -p "Write one sentence about the sea." --max-new-tokens 48
