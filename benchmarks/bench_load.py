"""How long ``elutq.load`` takes with and without the runtime's kernel cache (``CKPT/kernel-cache/``).

A first load repacks every quantized matrix into the kernels' layout and saves the result beside the
checkpoint; later loads memory-map that instead.  Each round runs two fresh processes per checkpoint: a
*cold* load (the cache folder removed first, so the load repacks and writes it again) and a *warm* one (the
cache just written).  Printed: the best round's seconds for each (``elutq.load`` alone, imports excluded),
cold / warm, and each process's peak RSS.  Both read from the page cache after the first round (the cold load
reads the shards, the warm one the cache files), so this is the CPU cost of loading, not the disk's.

    .venv/bin/python benchmarks/bench_load.py CKPT [CKPT ...] [--rounds 3] [--threads 2]

Removing ``kernel-cache/`` loses nothing: it is derived from the shards and every cold load rebuilds it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys, time
import elutq
from elutq.roofline import peak_rss_mb
t0 = time.perf_counter()
m = elutq.load(sys.argv[1], threads=int(sys.argv[2]))
print(json.dumps(dict(load_s=time.perf_counter() - t0, rss_mb=peak_rss_mb())))
"""


def load_once(ckpt: Path, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(threads)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"loading {ckpt} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print("| checkpoint | cold load s | warm load s | cold / warm | peak RSS cold / warm MiB |\n|---|---|---|---|---|")
    for ckpt in args.checkpoints:
        if not (ckpt / "config.json").is_file():
            raise SystemExit(f"{ckpt} is not an elutq checkpoint (no config.json)")
        cold, warm = [], []
        for _ in range(args.rounds):
            shutil.rmtree(ckpt / "kernel-cache", ignore_errors=True)
            cold.append(load_once(ckpt, args.threads))
            warm.append(load_once(ckpt, args.threads))
        c = min(cold, key=lambda r: r["load_s"])
        w = min(warm, key=lambda r: r["load_s"])
        print(f"| {ckpt.name} | {c['load_s']:.2f} | {w['load_s']:.2f} | {c['load_s'] / w['load_s']:.1f}× | "
              f"{max(r['rss_mb'] for r in cold):,.0f} / {max(r['rss_mb'] for r in warm):,.0f} |", flush=True)


if __name__ == "__main__":
    main()
