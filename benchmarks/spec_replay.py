"""Replay the speculative-decoding policy on recorded replies: what it gains, and what any policy could.

    .venv/bin/python benchmarks/spec_replay.py --checkpoint DIR [--threads 1 2] [--noise 0.1 --seeds 4]

A checked draft's outcome is fixed by the greedy reply (the tokens are the same with or without drafts), so
the policy can be replayed offline: this records the checkpoint's greedy replies to bench_speculative.py's
three prompts and to six held-out ones (two of each kind, written for this script and never used to tune the
policy), measures on this machine what a forward over n = 1 … 9 tokens costs (``forward_costs``), and
replays :class:`elutq.generation.DraftPolicy` on each reply at those costs: the offers and checks
``Model.generate`` would make, each forward charged its measured cost and fed to the policy as its timing.
Two passes over the prompts share the costs (as one model's replies do); the second is reported.

Printed per thread count and prompt: the policy's speed-up (plain time / speculative time, in the measured
costs), drafted tokens taken, and the **oracle**: a policy that knows the reply and checks exactly the
length of each prompt-lookup draft that pays — the most prompt lookup can give at these costs.  ``--noise``
multiplies each timing the policy sees by a log-normal factor (sigma ``--noise``) and 3% of them by 3 (a
hiccup), over ``--seeds`` seeds (the mean ratio; the charged time stays the true cost).
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import numpy as np

import elutq
from bench_server import default_checkpoint
from bench_speculative import PROMPTS, forward_costs
from elutq.generation import MAX_NGRAM, DraftPolicy, prompt_match

SORT = '''def bubble_sort(items):
    n = len(items)
    for i in range(n):
        for j in range(0, n - i - 1):
            if items[j] > items[j + 1]:
                tmp = items[j]
                items[j] = items[j + 1]
                items[j + 1] = tmp
    return items


def is_sorted(items):
    for i in range(len(items) - 1):
        if items[i] > items[i + 1]:
            return False
    return True
'''
CONFIG = '''class Config:
    def __init__(self, path):
        self.path = path
        self.values = {}

    def load(self):
        with open(self.path) as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                key, value = line.split("=", 1)
                self.values[key.strip()] = value.strip()

    def get(self, key, default=None):
        return self.values.get(key, default)
'''
REEF = (
    "Coral reefs are built by colonies of tiny animals called polyps, which secrete calcium carbonate skeletons "
    "that accumulate over thousands of years. Although reefs cover less than one percent of the ocean floor, "
    "they shelter about a quarter of all marine species. Rising sea temperatures cause corals to expel the algae "
    "living in their tissues, a process known as bleaching, and repeated bleaching events can kill large parts "
    "of a reef. Scientists are testing heat-tolerant coral strains and reef restoration methods, but most agree "
    "that limiting warming is the only lasting protection."
)
RAIL = (
    "The first public railway to use steam locomotives opened in 1825 between Stockton and Darlington in the north "
    "of England. Within two decades railways had spread across Britain, cutting journey times from days to hours "
    "and lowering the cost of moving coal, grain and manufactured goods. Towns that gained a station grew quickly, "
    "while those bypassed often declined. Railway companies also introduced standard time across the country, "
    "because timetables needed every station to keep the same clock."
)
HELD_OUT = {
    "code editing 2": "Rename the variable tmp to swap in this code and add a docstring to each function, changing "
    "nothing else:\n\n" + SORT,
    "code editing 3": "Add type hints to this class, changing nothing else:\n\n" + CONFIG,
    "summary 2": "Summarise this passage in two sentences.\n\n" + REEF,
    "summary 3": "Give a one-paragraph summary of this text.\n\n" + RAIL,
    "open chat 2": "How do I make a good cup of tea? Give a few tips.",
    "open chat 3": "Explain the difference between a list and a tuple in Python.",
}


def replay(prompt: list[int], reply: list[int], cost: dict[int, float], policy: DraftPolicy,
           rng: random.Random | None, noise: float) -> tuple[float, int, int]:  # fmt: skip
    """(speculative time in plain steps, drafted, taken) for ``reply`` after its first token, as generate runs."""
    i, spent, drafted, taken = 1, 0.0, 0, 0
    while i < len(reply):
        draft = policy.offer(prompt + reply[:i], len(reply) - i - 1)
        n = 1 + len(draft)
        seen = cost[n]
        if rng is not None:
            seen *= rng.lognormvariate(0.0, noise) * (3.0 if rng.random() < 0.03 else 1.0)
        policy.timed(n, seen)
        spent += cost[n]
        right = next((j for j, d in enumerate(draft) if reply[i + j] != d), len(draft))
        drafted, taken, i = drafted + len(draft), taken + right, i + 1 + right
    return spent, drafted, taken


def oracle(prompt: list[int], reply: list[int], cost: dict[int, float], k_max: int) -> float:
    """Plain steps spent by a policy that checks, of each prompt-lookup draft, the right tokens' best prefix."""
    i, spent = 1, 0.0
    while i < len(reply):
        _, draft = prompt_match(prompt + reply[:i], min(k_max, len(reply) - i - 1), MAX_NGRAM)
        right = next((j for j, d in enumerate(draft) if reply[i + j] != d), len(draft))
        k = max(range(right + 1), key=lambda k: (1 + k) / cost[1 + k])
        spent, i = spent + cost[1 + k], i + 1 + k
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--noise", type=float, default=0.0, help="log-normal sigma of the timings the policy sees")
    ap.add_argument("--seeds", type=int, default=1)
    args = ap.parse_args()
    ckpt = args.checkpoint or default_checkpoint()
    k_max = DraftPolicy().k_max
    prompts = {**PROMPTS, **HELD_OUT}
    replies, costs = {}, {}
    for threads in args.threads:
        model = elutq.load(ckpt, threads=threads)
        secs = forward_costs(model, lengths=range(1, k_max + 2))
        costs[threads] = {n: secs[n] / secs[1] for n in secs}
        if not replies:
            for kind, text in prompts.items():
                msgs = [{"role": "user", "content": text}]
                model.session.reset()
                c = model.generate(messages=msgs, max_new_tokens=args.max_new_tokens, temperature=0,
                                   speculative=False)  # fmt: skip
                replies[kind] = (model.encode(messages=msgs), c.token_ids)
    print(f"checkpoint: {ckpt}; held-out prompts marked *; noise {args.noise} over {args.seeds} seed(s)")
    for threads, cost in costs.items():
        print(f"{threads} threads: a forward over n tokens, in steps: "
              + ", ".join(f"{n}: {c:.2f}" for n, c in cost.items() if n > 1))  # fmt: skip
        print(f"  {'prompt':<16} {'tokens':>6} {'policy':>7} {'taken':>8} {'oracle':>7}")
        ratios: dict[bool, list[float]] = {False: [], True: []}
        for kind, (prompt, reply) in replies.items():
            plain, runs = len(reply) - 1, []
            for seed in range(args.seeds):
                rng = random.Random(seed) if args.noise > 0 else None
                shared: dict = {"cost": {}, "samples": {}}
                for _ in range(2):  # the first pass learns the costs, as earlier replies would have
                    spent, drafted, taken = replay(prompt, reply, cost, DraftPolicy(**shared), rng, args.noise)
                runs.append(plain / spent)
            ratio = float(np.mean(runs))
            held = kind in HELD_OUT
            ratios[held].append(ratio)
            print(f"  {kind + ('*' if held else ''):<16} {plain:>6} {ratio:>6.2f}x {taken:>3}/{drafted:<4} "
                  f"{plain / oracle(prompt, reply, cost, k_max):>6.2f}x")
        for held, rs in ratios.items():
            gmean = math.exp(float(np.mean(np.log(rs))))
            print(f"  {'held-out' if held else 'tuned on'}: geometric mean {gmean:.2f}x, least {min(rs):.2f}x")


if __name__ == "__main__":
    main()
