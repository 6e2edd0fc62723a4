"""lm-evaluation-harness through elutq's runtime against lm-eval's own ``hf`` backend (issue 33).

    .venv/bin/python benchmarks/bench_lmeval.py [--checkpoint CKPT] [--items 100] [--docs 8]

Without ``--checkpoint`` it quantizes the default model (RTN HLQ w4g128, as bench_eval.py) into
``out/bench-eval-w4``.  Two local tasks are built from the shipped WikiText-2 ``test`` split (seeded):
``wt_next_word`` — multiple choice, a line's first words and its true next word against three words drawn
from the text — and ``wt_rolling``, the rolling log-likelihood of the first ``--docs`` paragraphs (word
perplexity).  Each backend runs ``lm_eval.simple_evaluate`` in its own process on the same items: elutq
(the LUT runtime, its default int8 tables) and ``hf`` (transformers with elutq's dequantizing modules,
fp32, the same checkpoint).  Printed: accuracy, word perplexity, items per second of each task (model
loading excluded), each process's wall time and peak RSS, and how many items the two backends pick the
same answer for.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

from _common import ROOT, default_w4_checkpoint, run_measured


def build_tasks(d: Path, items: int, docs: int, seed: int = 0) -> None:
    from elutq.eval import load_text

    text, _ = load_text(dataset="wikitext2", split="test")
    lines = [ln.strip() for ln in text.splitlines() if len(ln.split()) >= 40 and not ln.strip().startswith("=")]
    words = sorted({w for ln in lines for w in ln.split() if re.fullmatch(r"[A-Za-z]{3,}", w)})
    rng = random.Random(seed)
    with open(d / "mc.jsonl", "w") as f:
        for ln in lines[:items]:
            ws = ln.split()
            k = rng.randrange(12, 30)
            while not re.fullmatch(r"[A-Za-z]{3,}", ws[k]):
                k += 1
            choices = [ws[k], *rng.sample([w for w in words if w != ws[k]][:5000], 3)]
            rng.shuffle(choices)
            item = {"context": " ".join(ws[:k]), "choices": choices, "answer": choices.index(ws[k])}
            f.write(json.dumps(item) + "\n")
    with open(d / "docs.jsonl", "w") as f:
        for ln in lines[items : items + docs]:
            f.write(json.dumps({"text": ln}) + "\n")
    common = "test_split: test\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\n"
    (d / "mc.yaml").write_text(
        "task: wt_next_word\n" + common.format(d / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    higher_is_better: true\n    aggregation: mean\n"
    )
    (d / "docs.yaml").write_text(
        "task: wt_rolling\n" + common.format(d / "docs.jsonl") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n    higher_is_better: false\n    aggregation: weighted_perplexity\n"
    )


def worker(backend: str, ckpt: str, d: Path, out: Path) -> None:
    """One backend, both tasks, timed one task at a time; per-item answers to ``out``."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["ELUTQ_HF_KERNELS"] = "off"  # hf: transformers on the dequantized weights (fp32)
    import lm_eval
    from lm_eval.tasks import TaskManager

    import elutq.lmeval  # noqa: F401  (registers "elutq"; also lets transformers load the checkpoint)

    t = time.perf_counter()
    if backend == "elutq":
        lm = elutq.lmeval.ElutqLM(ckpt)
    else:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=ckpt, dtype="float32", device="cpu", batch_size=1)
    res: dict = {"load_s": time.perf_counter() - t}
    tm = TaskManager(include_path=str(d))
    for task in ("wt_next_word", "wt_rolling"):
        t = time.perf_counter()
        r = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tm, log_samples=True, random_seed=0,
                                    numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
        res[task] = {
            "seconds": time.perf_counter() - t,
            "metrics": {k: v for k, v in r["results"][task].items() if "," in k},
            "items": [s["filtered_resps"] for s in sorted(r["samples"][task], key=lambda s: s["doc_id"])],
        }
    out.write_text(json.dumps(res, default=float))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a quantized checkpoint (default: RTN w4g128 of the default model)")
    ap.add_argument("--items", type=int, default=100, help="multiple-choice items")
    ap.add_argument("--docs", type=int, default=8, help="paragraphs for the rolling log-likelihood")
    ap.add_argument("--work", default=str(ROOT / "out" / "bench-lmeval"))
    ap.add_argument("--worker", choices=["elutq", "hf"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    if args.worker:
        return worker(args.worker, args.checkpoint, work, work / f"{args.worker}.json")
    ckpt = args.checkpoint or default_w4_checkpoint()
    work.mkdir(parents=True, exist_ok=True)
    build_tasks(work, args.items, args.docs)
    runs = {}
    for backend in ("elutq", "hf"):
        cmd = [sys.executable, __file__, "--worker", backend, "--checkpoint", ckpt, "--work", str(work)]
        m = run_measured(cmd, log=work / f"{backend}.log")
        if m.returncode != 0:
            raise SystemExit(f"{backend} failed; see {work / f'{backend}.log'}")
        runs[backend] = {**json.loads((work / f"{backend}.json").read_text()), "wall": m.seconds, "rss": m.peak_rss_mb}
    print(f"\n{ckpt}: {args.items} next-word items (4 choices), {args.docs} WikiText-2 test paragraphs (rolling)")
    print("| backend | acc | word ppl | choice items/s | rolling docs/s | model load s | process wall s | "
          "peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for b, r in runs.items():
        mc, roll = r["wt_next_word"], r["wt_rolling"]
        print(f"| {b} | {mc['metrics']['acc,none']:.3f} | {roll['metrics']['word_perplexity,none']:.3f} | "
              f"{args.items / mc['seconds']:.2f} | {args.docs / roll['seconds']:.3f} | {r['load_s']:.1f} | "
              f"{r['wall']:.1f} | {r['rss']:,.0f} |")
    e, h = runs["elutq"], runs["hf"]
    pick = [max(range(len(x)), key=lambda i: x[i][0]) for x in e["wt_next_word"]["items"]]
    ref = [max(range(len(x)), key=lambda i: x[i][0]) for x in h["wt_next_word"]["items"]]
    same = sum(a == b for a, b in zip(pick, ref, strict=True))
    dll = max(abs(a[0] - b[0]) for x, y in zip(e["wt_next_word"]["items"], h["wt_next_word"]["items"], strict=True)
              for a, b in zip(x, y, strict=True))
    speed = (args.items / e["wt_next_word"]["seconds"]) / (args.items / h["wt_next_word"]["seconds"])
    print(f"same answer on {same}/{len(pick)} items; largest |Δ log-likelihood| {dll:.4f}; "
          f"elutq {speed:.2f}x hf's choice items/s, "
          f"{h['wt_rolling']['seconds'] / e['wt_rolling']['seconds']:.2f}x its rolling docs/s")


if __name__ == "__main__":
    main()
