"""HLQ-FT on the default model: the quantized baseline vs each finetuning stage, WikiText-2 test perplexity.

    .venv/bin/python benchmarks/bench_finetune.py [--settings w2g128,w2g64,w3g128] [--stages block,e2e]
        [--method gptq|rtn] [--rotate none|full|...] [--max-tokens 65536] [--work DIR] [--json FILE] [--variant NAME]
        [finetune options after --]

Every stage runs as its own `elutq` process, measured alone (wall seconds, CPU seconds and peak RSS
from the OS via ``os.wait4``): `elutq quantize` (the baseline, GPTQ on WikiText-2 `valid` by default),
then `elutq finetune --stage S` from that baseline for each S in --stages (`block`, `e2e`, or the
chain `block,e2e` written `block+e2e`), all calibrated and trained on WikiText-2 `valid`; and
`elutq eval` on the first --max-tokens tokens of WikiText-2 `test` and of python-code `test` (text of
another domain, never trained on) for each checkpoint.  Prints a markdown table.
With --json, every finished row is saved there and a rerun skips
the rows it holds (checkpoints already in --work are reused, their times not measured again).
``--variant NAME`` labels the finetuned rows and checkpoints (``... + block [NAME]``), so runs with
other finetune options share the baseline and the json, e.g. ``--variant reassign -- --reassign-codes``.
``--rotate`` quantizes the baseline with that rotation (default none; other values label its rows
``w2g128 gptq+full`` and share the json with the unrotated ones).  Finetuning runs at the CLI's default
``--precision auto`` (bf16 e2e steps on a CPU with AVX512-BF16) unless ``-- --precision fp32`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import elutq_cmd, eval_ppl, fmt_int, parse_setting, run_measured


def stage_args(stage: str) -> list[str]:
    return ["--stage", stage.replace("+", ",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="w2g128,w2g64,w3g128")
    ap.add_argument("--stages", default="block,e2e", help="comma-separated: block, e2e, block+e2e")
    ap.add_argument("--method", choices=["gptq", "rtn"], default="gptq", help="the baseline quantizer")
    ap.add_argument("--rotate", default="none", help="the baseline's --rotate (default none)")
    ap.add_argument("--max-tokens", type=int, default=65536, help="score the first N WikiText-2 test tokens")
    ap.add_argument("--work", type=Path, default=Path("out/bench-finetune"), help="where checkpoints and logs go")
    ap.add_argument("--json", type=Path, help="save rows here; a rerun skips rows already saved")
    ap.add_argument("--variant", default="", help="label for the finetuned rows (runs with other finetune options)")
    ap.add_argument("finetune_args", nargs="*", help="extra `elutq finetune` options (after --)")
    args = ap.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    tag, dir_tag = (f" [{args.variant}]", f"-{args.variant}") if args.variant else ("", "")
    for s in stages:
        if s not in ("block", "e2e", "block+e2e"):
            ap.error(f"unknown stage {s!r} (expected block, e2e or block+e2e)")
    args.work.mkdir(parents=True, exist_ok=True)

    def rot_tag(sep: str) -> str:
        return "" if args.rotate == "none" else sep + args.rotate

    method = args.method + rot_tag("+")  # the rows' label: "gptq", "gptq+full"
    rows: dict[str, dict] = json.loads(args.json.read_text()) if args.json and args.json.is_file() else {}

    def save(key: str, row: dict) -> None:
        rows[key] = row
        print(json.dumps({key: row}), flush=True)
        if args.json:
            tmp = args.json.with_suffix(".tmp")
            tmp.write_text(json.dumps(rows, indent=1))
            tmp.replace(args.json)

    def measured(kind: str, cmd: list[str], out: Path) -> dict:
        if (out / "config.json").is_file():
            return {"wall_s": None, "cpu_s": None, "rss_mb": None}  # reused
        m = run_measured(elutq_cmd(*cmd, "--overwrite"), log=args.work / f"{out.name}.log")
        if m.returncode != 0:
            raise SystemExit(f"{kind} failed (log: {args.work / f'{out.name}.log'}):\n{m.output[-3000:]}")
        return {"wall_s": m.seconds, "cpu_s": m.cpu_seconds, "rss_mb": m.peak_rss_mb}

    def scores(model: str) -> dict:
        return {"ppl": eval_ppl(model, args.max_tokens)["ppl"],
                "ppl_code": eval_ppl(model, args.max_tokens, dataset="python-code")["ppl"]}

    if "fp" not in rows:
        save("fp", scores("default"))
    for setting in args.settings.split(","):
        bits, group = parse_setting(setting)
        base = args.work / f"{args.method}-{setting}{rot_tag('-')}"
        key = f"{setting} {method}"
        if key not in rows:
            cost = measured(args.method, ["quantize", "default", "-o", str(base), "--method", args.method,
                                          "--bits", str(bits), "--group-size", str(group), "--rotate", args.rotate],
                            base)  # fmt: skip
            save(key, {**cost, **scores(str(base))})
        for stage in stages:
            key = f"{setting} {method} + {stage}{tag}"
            if key in rows:
                continue
            ft = args.work / f"{args.method}-{setting}{rot_tag('-')}-{stage}{dir_tag}"
            cost = measured(stage, ["finetune", str(base), "--source", "default", "-o", str(ft),
                                    *stage_args(stage), *args.finetune_args], ft)
            save(key, {**cost, **scores(str(ft))})

    def t(x: float | None) -> str:
        return "reused" if x is None else f"{x:,.0f}"

    fp = rows["fp"]
    print(f"\nfirst {args.max_tokens} tokens of each test text; unquantized: WikiText-2 {fp['ppl']:.2f}, "
          f"python-code {fp['ppl_code']:.2f}\n")
    print("| setting | checkpoint | WikiText-2 | vs baseline | python-code | vs baseline | wall (s) | CPU (s) "
          "| peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for setting in args.settings.split(","):
        base = rows.get(f"{setting} {method}")
        if not base:
            continue
        for stage in ["", *stages]:
            r = rows.get(f"{setting} {method}" + (f" + {stage}{tag}" if stage else ""))
            if not r:
                continue
            change = [f"{100 * (r[k] / base[k] - 1):+.1f}%" if stage else "" for k in ("ppl", "ppl_code")]
            print(f"| {setting} | {method.upper()}{' + ' + stage + tag if stage else ''} | {fmt_int(r['ppl'])} | "
                  f"{change[0]} | {fmt_int(r['ppl_code'])} | {change[1]} | {t(r['wall_s'])} | {t(r['cpu_s'])} "
                  f"| {t(r['rss_mb'])} |")


if __name__ == "__main__":
    main()
