"""The decode loop's attention kernels (``attend_*``), each path against the scalar one in the same run.

    .venv/bin/python benchmarks/bench_attention.py [--lengths 100,1000,4000] [--repeats 200]

One call = one column's causal attention for one KV head and the query heads sharing it, over
``length`` cached positions strided as in the KV cache.  Shapes: SmolLM2-135M (head_dim 64, 3 query
heads per KV head), LLaMA-2-7B (128, 1), Qwen2.5-7B (128, 7).  Each path is timed in alternating
rounds (best of 7 rounds of ``--repeats`` calls; the ~1 µs of Python call overhead is included), and
the table gives µs per call and the speed-up over the scalar path (and over AVX2 for AVX-512).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from elutq import _native
from elutq.kernels import available_paths

SHAPES = (("SmolLM2-135M", 64, 3), ("LLaMA-2-7B", 128, 1), ("Qwen2.5-7B", 128, 7))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="100,1000,4000")
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    paths = [p for p in ("scalar", "avx2", "avx512", "neon") if p in available_paths()]
    rng = np.random.default_rng(0)
    print(f"paths: {', '.join(paths)}; µs per call (best of 7 rounds × {args.repeats})\n")
    print("| shape | head_dim × heads/KV head | positions | " + " | ".join(paths) + " | vs scalar |"
          + (" avx512 vs avx2 |" if {"avx2", "avx512"} <= set(paths) else ""))
    print("|---" * (4 + len(paths) + ({"avx2", "avx512"} <= set(paths))) + "|")
    for name, d, grp in SHAPES:
        for length in (int(x) for x in args.lengths.split(",")):
            q = rng.normal(size=(grp, d)).astype(np.float32)
            # 4 KV heads per cache row, fp16 bits as the KV cache holds them
            k = rng.normal(size=(length, 4 * d)).astype(np.float16).view(np.uint16)
            v = rng.normal(size=(length, 4 * d)).astype(np.float16).view(np.uint16)
            out = np.empty_like(q)
            best = {p: float("inf") for p in paths}
            for _ in range(7):
                for p in paths:
                    t0 = time.perf_counter()
                    for _ in range(args.repeats):
                        _native.attention(q, k, v, d, d**-0.5, out, path=p)
                    best[p] = min(best[p], (time.perf_counter() - t0) / args.repeats * 1e6)
            fastest = min(best.values())
            row = f"| {name} | {d} × {grp} | {length} | " + " | ".join(f"{best[p]:.1f}" for p in paths)
            row += f" | {best['scalar'] / fastest:.2f}× |"
            if {"avx2", "avx512"} <= set(paths):
                row += f" {best['avx2'] / best['avx512']:.2f}× |"
            print(row, flush=True)
    print(f"\npeak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
