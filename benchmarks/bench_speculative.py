"""Speculative decoding (prompt lookup, issue 32) against plain decoding, in one process, same run.

    .venv/bin/python benchmarks/bench_speculative.py --checkpoint DIR [--threads 1 2] [--rounds 3]

Three prompt kinds — code editing (rewrite a given function), summarising a given passage, open-ended chat —
each answered greedily (the reply is the same token for token either way; checked) with ``speculative``
off and on, alternating, ``--rounds`` times per thread count; the best round of each is kept.  Prints
decode tokens/s (after the first token), its ratio, forwards per token and drafted tokens taken, and the
process's peak RSS.  The model's step costs (``Model.step_costs``: the machine's, learnt while drafting)
start empty in each thread count and are learnt by the first rounds, as a fresh server's would be.
Default checkpoint: the one ``benchmarks/bench_server.py`` serves (default model, RTN HLQ w4g128).
"""

from __future__ import annotations

import argparse
import resource
from pathlib import Path

import elutq
from bench_server import default_checkpoint

CODE = '''def moving_average(values, window):
    """Return the moving averages of values over a window of the given size."""
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
'''
PASSAGE = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
    "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally "
    "nicknamed 'La dame de fer', it was constructed as the centrepiece of the 1889 World's Fair, and to crown "
    "the centennial anniversary of the French Revolution. Although initially criticised by some of France's "
    "leading artists and intellectuals for its design, it has since become a global cultural icon of France "
    "and one of the most recognisable structures in the world."
)
PROMPTS = {
    "code editing": "Rewrite this Python function with type hints, changing nothing else:\n\n" + CODE,
    "summary": "Summarise this passage in two sentences.\n\n" + PASSAGE,
    "open chat": "What are three good habits for staying healthy? Explain each briefly.",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    args = ap.parse_args()
    ckpt = args.checkpoint or default_checkpoint()
    print(f"checkpoint: {ckpt}")
    print(f"{'threads':>7} {'prompt':<13} {'plain tok/s':>11} {'spec tok/s':>10} {'ratio':>6} "
          f"{'tokens/step':>11} {'taken':>9} {'same':>5}")
    for threads in args.threads:
        model = elutq.load(ckpt, threads=threads)
        for kind, text in PROMPTS.items():
            msgs = [{"role": "user", "content": text}]
            best: dict[bool, tuple[float, object]] = {}
            for _ in range(args.rounds):
                for spec in (False, True):
                    model.session.reset()
                    c = model.generate(messages=msgs, max_new_tokens=args.max_new_tokens, temperature=0,
                                       speculative=spec)  # fmt: skip
                    rate = c.timing.decode_tokens_per_s
                    if spec not in best or rate > best[spec][0]:
                        best[spec] = (rate, c)
            (p, plain), (s, fast) = best[False], best[True]
            t = fast.timing
            steps = (t.generated_tokens - 1) / max(t.decode_steps, 1)
            print(f"{threads:>7} {kind:<13} {p:>11.1f} {s:>10.1f} {s / p:>5.2f}x {steps:>11.2f} "
                  f"{t.accepted_tokens:>4}/{t.drafted_tokens:<4} {str(fast.token_ids == plain.token_ids):>5}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
