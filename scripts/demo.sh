#!/usr/bin/env bash
# The main job end to end on the built-in default model (SmolLM2-135M-Instruct): set up, quantize to
# 3 bits with GPTQ-HLQ (embeddings and lm_head 4-bit), compare size and perplexity with the unquantized
# model, and generate through the native LUT runtime.  A few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-out/smollm2-135m-hlq-w3g128}
TOKENS=${TOKENS:-16384}  # WikiText-2 test tokens to score; drop --max-tokens below for all 312k
elutq() { .venv/bin/elutq "$@"; }

echo "== 1. quantize: GPTQ-HLQ w3g128, embeddings and lm_head w4g128, calibrated on 32 x 512 tokens of WikiText-2 and python-code valid"
elutq quantize default -o "$OUT" --bits 3 --group-size 128 --embed-bits 4 --calib-samples 32 --overwrite
elutq info "$OUT"
for text in wikitext2 python-code; do
  echo "== 2. perplexity on the first $TOKENS tokens of $text test: unquantized (its cached fp32 copy, run in fp16), then quantized"
  elutq eval default --dataset "$text" --max-tokens "$TOKENS"
  elutq eval "$OUT" --dataset "$text" --max-tokens "$TOKENS"
done
echo "== 3. generate (streamed; speed on stderr)"
elutq generate "$OUT" -p "Write one sentence about the sea." --max-new-tokens 48
