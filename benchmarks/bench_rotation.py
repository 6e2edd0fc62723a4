"""What the online Hadamard transform of ``--rotate full`` costs: decode and prefill of a ``full`` checkpoint
against a ``residual`` one of the same model and setting (same shapes and bits; the only difference is the
transform of down_proj's input), in one process, alternating rounds, best of each.

    .venv/bin/python benchmarks/bench_rotation.py --full CKPT --residual CKPT [--threads 1 2] [--rounds 5]

e.g. the frontier's ``/tmp/elutq-frontier/default/elutq-gptq-hlq-w2g128+full`` and ``...+rot``
(``bench_frontier.py --settings w2g128+rot w2g128+full``).  Prints tokens/s of each, their ratio (cost of
the transform = 1 − ratio) and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import elutq
from elutq.runtime import Session


def timed(model, prompt: list[int], gen: int) -> tuple[float, float]:
    """(prefill tokens/s over ``prompt``, decode tokens/s over ``gen`` steps of one token each)."""
    s = Session(model, max_ctx=len(prompt) + gen + 1)
    t0 = time.perf_counter()
    model.forward(s, prompt)
    t1 = time.perf_counter()
    tok = prompt[-1]
    for _ in range(gen):
        model.forward(s, [tok])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), gen / (t2 - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", type=Path, required=True)
    ap.add_argument("--residual", type=Path, required=True)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--gen", type=int, default=64)
    args = ap.parse_args()
    prompt = [100 + (7 * i) % 5000 for i in range(args.prompt)]
    print(f"{'threads':>7} {'':<9} {'prefill tok/s':>13} {'decode tok/s':>12}")
    for threads in args.threads:
        models = {k: elutq.load(p, threads=threads) for k, p in (("residual", args.residual), ("full", args.full))}
        best = {k: [0.0, 0.0] for k in models}
        for _ in range(args.rounds):
            for k, m in models.items():
                pf, dc = timed(m, prompt, args.gen)
                best[k] = [max(best[k][0], pf), max(best[k][1], dc)]
        for k in models:
            print(f"{threads:>7} {k:<9} {best[k][0]:>13.1f} {best[k][1]:>12.1f}")
        r = [best["full"][i] / best["residual"][i] for i in (0, 1)]
        print(f"{threads:>7} {'full/res.':<9} {r[0]:>12.3f}x {r[1]:>11.3f}x")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
