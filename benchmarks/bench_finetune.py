"""HLQ-FT on the default model: quantized baseline vs + block reconstruction, WikiText-2 test perplexity.

    .venv/bin/python benchmarks/bench_finetune.py [--settings w2g128,w3g128] [--method gptq|rtn]
        [--max-tokens 16384] [--work DIR] [--reuse] [finetune options passed on after --]

Every stage runs as its own `elutq` process, so its wall time and peak RSS are its own:
`elutq quantize` (the baseline), `elutq finetune` (block reconstruction, calibrated on WikiText-2
`valid`), and `elutq eval` on the first --max-tokens tokens of WikiText-2 `test` for the fp model,
the baseline and the finetuned checkpoint.  Prints a markdown table (the README's).
With --reuse an existing baseline checkpoint in --work is used as is (its time is then not measured).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path


def run(args: list[str]) -> tuple[str, float]:
    """Run `elutq ARGS`; returns stdout and wall seconds (fails loudly)."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "elutq", *args], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"elutq {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return p.stdout, time.perf_counter() - t0


def peak_rss(stdout: str) -> float:
    return float(re.findall(r"peak RSS: (\d+) MiB", stdout)[-1])


def ppl(spec: Path | str, max_tokens: int) -> tuple[float, str]:
    out, _ = run(
        ["eval", str(spec), "--dataset", "wikitext2", "--split", "test", "--max-tokens", str(max_tokens), "--json"]
    )
    res = json.loads(out.strip().splitlines()[-2])  # the JSON line, before "peak RSS"
    return res["ppl"], f"{res['tokens_scored']} tokens scored in {res['windows']} windows of {res['seqlen']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="w2g128,w3g128")
    ap.add_argument("--method", choices=["gptq", "rtn"], default="gptq", help="the baseline quantizer")
    ap.add_argument("--max-tokens", type=int, default=16384, help="score the first N WikiText-2 test tokens")
    ap.add_argument("--work", type=Path, default=Path("bench-finetune"), help="where checkpoints go")
    ap.add_argument("--reuse", action="store_true", help="reuse baseline checkpoints already in --work")
    ap.add_argument("finetune_args", nargs="*", help="extra `elutq finetune` options (after --)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    fp_ppl, scored = ppl("default", args.max_tokens)
    print(f"# WikiText-2 test, first {args.max_tokens} tokens ({scored}); fp32 ppl {fp_ppl:.3f}", flush=True)
    rows = []
    for setting in args.settings.split(","):
        bits, group = setting.removeprefix("w").split("g")
        base = args.work / f"{args.method}-{setting}"
        if args.reuse and (base / "config.json").is_file():
            q_time, q_rss = None, None
        else:
            out, q_time = run(
                ["quantize", "default", "-o", str(base), "--method", args.method, "--bits", bits,
                 "--group-size", group, "--overwrite"]
            )  # fmt: skip
            q_rss = peak_rss(out)
        base_ppl, _ = ppl(base, args.max_tokens)
        print(f"{setting} {args.method}: ppl {base_ppl:.3f}", flush=True)
        ft = args.work / f"{args.method}-{setting}-block"
        out, f_time = run(
            ["finetune", str(base), "--source", "default", "-o", str(ft), "--overwrite", *args.finetune_args]
        )
        print(out, flush=True)
        ft_ppl, _ = ppl(ft, args.max_tokens)
        print(f"{setting} {args.method} + block: ppl {ft_ppl:.3f}", flush=True)
        rows.append((setting, base_ppl, q_time, q_rss, ft_ppl, f_time, peak_rss(out)))

    def t(x: float | None) -> str:
        return "reused" if x is None else f"{x:.0f}"

    print(f"\nfp32: {fp_ppl:.2f}")
    print(
        f"| setting | {args.method} ppl | + block ppl | change | {args.method} time (s) | {args.method} peak RSS (MiB) "
        "| block time (s) | block peak RSS (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for s, bp, qt, qr, fp, ftime, frss in rows:
        print(
            f"| {s} | {bp:.2f} | {fp:.2f} | {100 * (fp / bp - 1):+.1f}% | {t(qt)} | {t(qr)} "
            f"| {ftime:.0f} | {frss:.0f} |"
        )


if __name__ == "__main__":
    main()
