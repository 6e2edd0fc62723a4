"""End to end on the built-in default model through the CLI: quantize → info → eval → generate."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def elutq(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "elutq", *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_quantize_eval_generate_default_model(tmp_path):
    out = tmp_path / "smollm2-w4g128"
    summary = elutq("quantize", "default", "-o", str(out), "--method", "rtn", "--bits", "4", "--group-size", "128")
    assert "bits per weight (quantized linears and embeddings): 4.6" in summary  # 4 + 80/128 + short groups of 576
    assert "format: hlq" in elutq("info", str(out))
    base = json.loads(
        elutq("eval", "default", "--dataset", "wikitext2", "--max-tokens", "4096", "--json").splitlines()[-2]
    )
    quant = json.loads(
        elutq("eval", str(out), "--dataset", "wikitext2", "--max-tokens", "4096", "--json").splitlines()[-2]
    )
    assert quant["tokens_scored"] == base["tokens_scored"] == 4094
    assert 5 < base["ppl"] < 40  # SmolLM2-135M on WikiText-2
    assert base["ppl"] < quant["ppl"] < 2 * base["ppl"]  # 4-bit costs a little, not everything
    text = elutq("generate", str(out), "-p", "What is the capital of France?", "--max-new-tokens", "16")
    assert text.strip()
