"""Batched decode in the native runtime alone (no server): one step for B sequences against one for a
single sequence, so the ceiling on what continuous batching can gain on this machine.

    .venv/bin/python benchmarks/bench_batch.py [--checkpoint DIR] [--batches 1,4,8,16]

Default checkpoint: the default model, RTN HLQ w4g128 (the one benchmarks/bench_server.py serves), made
once under out/.  Every B is measured in rounds (contexts reset to the prompt, 20 steps each, best
round kept) interleaved with the others three times; prints step time, tokens/s, the speed-up over
B = 1 and peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import elutq
from bench_server import default_checkpoint
from elutq.runtime import Session


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    ckpt = args.checkpoint or default_checkpoint()
    model = elutq.load(ckpt)
    ids = model.encode("Write a short story about a lighthouse keeper and the sea.")
    batches = [int(b) for b in args.batches.split(",")]
    best = {b: float("inf") for b in batches}
    for _ in range(3):
        for b in batches:
            sessions = [Session(model) for _ in range(b)]
            model.forward_batch(sessions, [ids] * b)
            step = [[ids[-1]]] * b
            for _ in range(4):
                for s in sessions:
                    del s.tokens[len(ids) :]
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    model.forward_batch(sessions, step)
                best[b] = min(best[b], (time.perf_counter() - t0) / args.steps)
    print(f"checkpoint: {ckpt} ({model.runtime.path} kernels), prompt {len(ids)} tokens")
    print(f"{'B':>3} {'step':>9} {'tok/s':>8} {'step vs B=1':>12} {'tok/s vs B=1':>13}")
    for b in batches:
        print(f"{b:>3} {best[b] * 1e3:>7.2f}ms {b / best[b]:>8.1f} {best[b] / best[batches[0]]:>11.2f}x "
              f"{b * best[batches[0]] / best[b]:>12.2f}x")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
