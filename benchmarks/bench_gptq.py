"""RTN vs GPTQ, uniform vs HLQ, on the default model: WikiText-2 perplexity, BPW, time, peak RSS.

    .venv/bin/python benchmarks/bench_gptq.py [--max-tokens 65536] [--calib-samples 128 --calib-seqlen 512]
        [--settings w2g64,w2g128,w3g128,w4g128] [--codes-settings w2g128,w3g128] [--json rows.json]

Every quantization is one `elutq quantize` child process (decoder linears only: `--lm-head-bits 0`,
so the table compares like bench_rtn.py), measured alone: wall time of the whole process (start-up
and model reading included) and its own peak RSS from the kernel (os.wait4).  Each checkpoint is
then scored by `elutq eval --json` in another child and deleted.  The unquantized baseline is
measured in the same run.  GPTQ calibrates on WikiText-2 `valid`; perplexity is on `test`.

`--codes-settings` adds HLQ-GPTQ runs with `--codes fixed` (codes frozen when a group is fitted)
next to the default `--codes per-column`.  With `--json` the rows are saved after every run and a
rerun with the same options skips the rows already there (a killed benchmark continues).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import tempfile
from pathlib import Path

from _common import ROOT, elutq_cmd, eval_ppl, fmt_int, parse_setting, run_measured

FORMATS = ("uniform", "hlq")
METHODS = ("rtn", "gptq")


def quantize_and_eval(
    out_root: Path, setting: str, fmt: str, method: str, codes: str, args: argparse.Namespace
) -> dict:
    bits, group = parse_setting(setting)
    out = out_root / f"{setting}-{fmt}-{method}-{codes}"
    cmd = elutq_cmd(
        "quantize", "default", "-o", str(out), "--overwrite", "--method", method, "--format", fmt, "--rotate", "none",
        "--bits", str(bits), "--group-size", str(group), "--lm-head-bits", "0",
        "--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen),
        "--codes", codes, *(["--device", args.device] if args.device else []),
    )  # fmt: skip
    q = run_measured(cmd, log=out_root / f"{out.name}.log")
    if q.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{q.output[-3000:]}")
    bpw = float(re.search(r"bits per weight \(quantized linears\): ([\d.]+)", q.output).group(1))
    r = eval_ppl(str(out), args.max_tokens)
    for f in sorted(out.rglob("*"), reverse=True):
        f.rmdir() if f.is_dir() else f.unlink()
    out.rmdir()
    return {
        "setting": setting,
        "format": fmt,
        "method": method,
        "codes": codes if method == "gptq" else "-",
        "bpw": bpw,
        "ppl": r["ppl"],
        "quant_seconds": q.seconds,
        "quant_cpu_seconds": q.cpu_seconds,
        "quant_peak_rss_mb": q.peak_rss_mb,
        "eval_seconds": r["eval_seconds"],
        "tokens_scored": r["tokens_scored"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=65536, help="evaluate the first N test tokens")
    ap.add_argument("--settings", default="w2g64,w2g128,w3g128,w4g128")
    ap.add_argument("--codes-settings", default="w2g128,w3g128", help="also run HLQ-GPTQ with --codes fixed here")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--device", help="passed to `elutq quantize --device` (default: its own default)")
    ap.add_argument("--json", type=Path, help="save rows here after every run; rerunning skips rows already saved")
    ap.add_argument("--work", type=Path, help="where checkpoints and logs go (default: a temporary directory)")
    args = ap.parse_args()
    print("# " + shlex.join([sys.executable, *sys.argv]), flush=True)

    options = {k: getattr(args, k) for k in ("max_tokens", "calib_samples", "calib_seqlen", "device")}
    rows: list[dict] = []
    if args.json and args.json.is_file():
        saved = json.loads(args.json.read_text())
        if saved.get("options") == options:
            rows = saved["rows"]
            print(f"# continuing: {len(rows)} rows from {args.json}")

    def done(key: tuple) -> dict | None:
        return next((r for r in rows if (r["setting"], r["format"], r["method"], r["codes"]) == key), None)

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps({"options": options, "rows": rows}, indent=1) + "\n")

    if not done(("fp32", "-", "-", "-")):
        base = eval_ppl("default", args.max_tokens)
        rows.append({"setting": "fp32", "format": "-", "method": "-", "codes": "-", "bpw": 32.0, "ppl": base["ppl"],
                     "tokens_scored": base["tokens_scored"], "eval_seconds": base["eval_seconds"]})  # fmt: skip
        save()
    print(f"baseline ppl {done(('fp32', '-', '-', '-'))['ppl']:.3f}", flush=True)

    # Setting by setting (in the order given), so an interrupted run leaves whole rows.
    codes_settings = [s for s in args.codes_settings.split(",") if s]
    jobs = []
    for s in args.settings.split(","):
        jobs += [(s, f, m, "per-column") for f in FORMATS for m in METHODS]
        jobs += [(s, "hlq", "gptq", "fixed")] if s in codes_settings else []
    with tempfile.TemporaryDirectory(prefix="elutq-bench-gptq-", dir=args.work) as tmp:
        for setting, fmt, method, codes in jobs:
            key = (setting, fmt, method, codes if method == "gptq" else "-")
            if done(key):
                continue
            row = quantize_and_eval(Path(tmp), setting, fmt, method, codes, args)
            rows.append(row)
            save()
            print(
                f"{setting} {fmt:7s} {method:4s} {row['codes']:10s} ppl {row['ppl']:.3f}  bpw {row['bpw']:.3f}  "
                f"quantize {row['quant_seconds']:.0f}s ({row['quant_cpu_seconds']:.0f} CPU-s), "
                f"peak RSS {row['quant_peak_rss_mb']:.0f} MiB",
                flush=True,
            )
    report(rows, args)


def report(rows: list[dict], args: argparse.Namespace) -> None:
    def get(setting: str, fmt: str, method: str, codes: str = "per-column") -> dict | None:
        c = codes if method == "gptq" else "-"
        return next(
            (r for r in rows if (r["setting"], r["format"], r["method"], r["codes"]) == (setting, fmt, method, c)), None
        )

    base = get("fp32", "-", "-")
    tokens = base["tokens_scored"]
    print(
        f"\nWikiText-2 test perplexity ({tokens} tokens scored; unquantized: {base['ppl']:.2f}); "
        f"GPTQ calibration {args.calib_samples} x {args.calib_seqlen} tokens of WikiText-2 valid\n"
    )
    print("| setting | BPW | uniform RTN | uniform GPTQ | HLQ RTN | HLQ GPTQ | best |")
    print("|---|---|---|---|---|---|---|")
    settings = [s for s in args.settings.split(",") if all(get(s, f, m) for f in FORMATS for m in METHODS)]
    for s in settings:
        cells = {(f, m): get(s, f, m) for f in FORMATS for m in METHODS}
        best = min(cells, key=lambda k: cells[k]["ppl"])
        names = {("uniform", "rtn"): "uniform RTN", ("uniform", "gptq"): "uniform GPTQ",
                 ("hlq", "rtn"): "HLQ RTN", ("hlq", "gptq"): "HLQ GPTQ"}  # fmt: skip
        print(
            f"| {s} | {cells['hlq', 'gptq']['bpw']:.3f} | "
            + " | ".join(fmt_int(cells[f, m]["ppl"]) for f in FORMATS for m in METHODS)
            + f" | {names[best]} |"
        )
    print("\n| setting | format | method | codes | BPW | ppl | quantize wall (s) | CPU (s) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["setting"] == "fp32":
            continue
        print(
            f"| {r['setting']} | {r['format']} | {r['method']} | {r['codes']} | {r['bpw']:.3f} | {fmt_int(r['ppl'])} "
            f"| {r['quant_seconds']:.0f} | {r['quant_cpu_seconds']:.0f} | {r['quant_peak_rss_mb']:.0f} |"
        )
    codes_rows = [
        (s, get(s, "hlq", "gptq"), get(s, "hlq", "gptq", "fixed")) for s in args.codes_settings.split(",") if s
    ]
    codes_rows = [c for c in codes_rows if c[1] and c[2]]
    if codes_rows:
        print("\n| setting | HLQ-GPTQ codes per-column | HLQ-GPTQ codes fixed |")
        print("|---|---|---|")
        for s, pc, fx in codes_rows:
            print(f"| {s} | {fmt_int(pc['ppl'])} | {fmt_int(fx['ppl'])} |")
    print(f"\n(run from {ROOT})")


if __name__ == "__main__":
    main()
