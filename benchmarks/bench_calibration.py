"""Which calibration generalizes: HLQ-GPTQ of one model at one setting, calibrated on each mix, scored on
WikiText-2 ``test`` and ``python-code/test`` beside the unquantized model (issue 29).

    .venv/bin/python benchmarks/bench_calibration.py [--model default] [--setting w2g128]
        [--mixes wikitext2 wikitext2+python-code ...] [--rotate none|full] [--calib-samples 64]
        [--max-tokens 8192] [--work DIR] [--json docs/calibration-default.json]

Every mix is one `elutq quantize --method gptq --calib-dataset MIX` (head and embeddings at the setting's
bits as ``bench_frontier.py`` sets them) and one `elutq eval` per text, each its own process (wall seconds
and peak RSS from the OS).  The figure of merit is the *degradation* on each text (quantized ppl /
unquantized ppl on the same tokens) and the ratio code / WikiText-2 of the two: 1.0 means the model lost
as much on code as on Wikipedia.  Rows go to --json as they finish (a rerun skips them), then a table.
``--rotate`` (default none) quantizes with that rotation; its rows are keyed ``MIX+full`` in the same json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import ROOT, elutq_cmd, eval_ppl, fmt_int, parse_setting, run_measured

TEXTS = ("wikitext2", "python-code")
MIXES = ("wikitext2", "wikitext2+python-code", "wikitext2+python-code+self", "wikitext2+python-code+self+chat",
         "self")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--setting", default="w2g128")
    ap.add_argument("--mixes", nargs="+", default=list(MIXES))
    ap.add_argument("--rotate", default="none", help="the checkpoints' --rotate (default none)")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=8192, help="score the first N tokens of each test text")
    ap.add_argument("--work", type=Path, default=Path("/tmp/elutq-calibration"))
    ap.add_argument("--json", type=Path, help="default docs/calibration-MODEL.json")
    args = ap.parse_args()
    args.json = args.json or ROOT / "docs" / f"calibration-{args.model}.json"
    config = {k: getattr(args, k) for k in ("model", "setting", "calib_samples", "calib_seqlen", "max_tokens")}
    data = json.loads(args.json.read_text()) if args.json.is_file() else {"config": config, "rows": {}}
    if data["config"] != config:
        raise SystemExit(f"{args.json} holds rows measured with {data['config']}; pass another --json")
    work = args.work / args.model
    work.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(args.json)

    def score(key: str, path: str) -> None:
        row = data["rows"].setdefault(key, {})
        for text in TEXTS:
            if text not in row:
                r = eval_ppl(path, args.max_tokens, log=work / f"{key}-{text}.log", dataset=text)
                row[text] = {"ppl": r["ppl"], "tokens": r["tokens_scored"]}
                save()
                print(f"  {key}: {text} ppl {r['ppl']:.3f}", flush=True)

    score("unquantized", args.model)
    bits, group = parse_setting(args.setting)
    hb, hg = (2, 64) if bits <= 2 else (4, 128)
    rot = "" if args.rotate == "none" else "+" + args.rotate  # the rows' key: "wikitext2+python-code+full"
    for mix in args.mixes:
        out = work / f"gptq-hlq-{args.setting}-{args.calib_samples}x{args.calib_seqlen}-{mix}{rot}"
        if not (out / "config.json").is_file():
            cmd = elutq_cmd(
                "quantize", args.model, "-o", str(out), "--overwrite", "--method", "gptq", "--format", "hlq",
                "--rotate", args.rotate, "--bits", str(bits), "--group-size", str(group), "--lm-head-bits", str(hb),
                "--lm-head-group-size", str(hg), "--calib-dataset", mix, "--calib-samples", str(args.calib_samples),
                "--calib-seqlen", str(args.calib_seqlen),
            )  # fmt: skip
            print(f"{mix}{rot}: quantizing", flush=True)
            m = run_measured(cmd, log=work / f"{mix}{rot}.log")
            if m.returncode != 0:
                raise SystemExit(f"quantize failed:\n{m.output[-3000:]}")
            data["rows"].setdefault(mix + rot, {}).update(quant_seconds=m.seconds, quant_rss_mb=m.peak_rss_mb)
            save()
        score(mix + rot, str(out))

    base = data["rows"]["unquantized"]
    print(f"\n{args.model}, HLQ-GPTQ {args.setting}{rot} (head/embeddings w{hb}g{hg}), calibration "
          f"{args.calib_samples} × {args.calib_seqlen} tokens; perplexity over the first {args.max_tokens} tokens "
          "of each test text\n")
    print("| calibration | ppl wikitext2 (×) | ppl python-code (×) | code × / wiki × | quantize s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    print(f"| unquantized | {fmt_int(base['wikitext2']['ppl'])} | {fmt_int(base['python-code']['ppl'])} | – | – | – |")
    for mix in args.mixes:
        mix += rot
        row = data["rows"].get(mix, {})
        if not all(t in row for t in TEXTS):
            continue
        deg = {t: row[t]["ppl"] / base[t]["ppl"] for t in TEXTS}
        secs = f"{row['quant_seconds']:.0f}" if "quant_seconds" in row else "–"
        rss = f"{row['quant_rss_mb']:.0f}" if "quant_rss_mb" in row else "–"
        print(f"| {mix} | {fmt_int(row['wikitext2']['ppl'])} ({deg['wikitext2']:.2f}) | "
              f"{fmt_int(row['python-code']['ppl'])} ({deg['python-code']:.2f}) | "
              f"{deg['python-code'] / deg['wikitext2']:.2f} | {secs} | {rss} |")


if __name__ == "__main__":
    main()
