"""Perplexity through the native LUT runtime against the torch (dequantized fp32) reference.

    .venv/bin/python benchmarks/bench_eval.py [--checkpoint CKPT] [--max-tokens 65536]

Without ``--checkpoint`` it quantizes the default model (RTN HLQ w4g128, lm_head w4g128: a few
seconds) into ``out/bench-eval-w4``.  Each backend runs ``elutq eval --json`` in its own process, on
the same tokens and windows, alternately, ``--rounds`` times; the table gives each backend's best wall
time, its peak RSS, the speed ratio and the two perplexities' relative difference.
"""

from __future__ import annotations

import argparse

from _common import default_w4_checkpoint, eval_ppl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a quantized checkpoint (default: RTN w4g128 of the default model)")
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--dataset", default="wikitext2")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    ckpt = args.checkpoint or default_w4_checkpoint()
    runs: dict[str, list[dict]] = {"native": [], "torch": []}
    for _ in range(args.rounds):
        for backend in runs:
            r = eval_ppl(ckpt, args.max_tokens, backend=backend, dataset=args.dataset)
            runs[backend].append(r)
            print(f"{backend}: ppl {r['ppl']:.4f}  {r['eval_seconds']:.1f}s  peak RSS {r['eval_peak_rss_mb']:.0f} MiB")
    best = {b: min(rs, key=lambda r: r["eval_seconds"]) for b, rs in runs.items()}
    n, t = best["native"], best["torch"]
    print(f"\n{ckpt}: {args.dataset} test, {n['tokens_scored']} tokens scored "
          f"({n['windows']} windows of {n['seqlen']})")
    print("| backend | ppl | wall s (process) | peak RSS MiB |")
    print("|---|---|---|---|")
    for b, r in best.items():
        print(f"| {b} | {r['ppl']:.4f} | {r['eval_seconds']:.1f} | {r['eval_peak_rss_mb']:,.0f} |")
    print(f"native is {t['eval_seconds'] / n['eval_seconds']:.2f}x faster; "
          f"ppl differs by {abs(n['ppl'] / t['ppl'] - 1) * 100:.3f} %")


if __name__ == "__main__":
    main()
