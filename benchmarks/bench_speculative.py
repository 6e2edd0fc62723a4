"""Speculative decoding (prompt lookup, issue 32) against plain decoding, in one process, same run.

    .venv/bin/python benchmarks/bench_speculative.py --checkpoint DIR [--threads 1 2] [--rounds 3]

Three prompt kinds — code editing (rewrite a given function), summarising a given passage, open-ended chat —
each answered greedily (the reply is the same token for token either way; checked) with ``speculative``
off and on, alternating, ``--rounds`` times per thread count; the best round of each is kept.  Prints
decode tokens/s (after the first token), its ratio, forwards per token and drafted tokens taken, and the
process's peak RSS.  The model's step costs (``Model.step_costs``: the machine's, learnt while drafting)
start empty in each thread count and are learnt by the first rounds, as a fresh server's would be.
Default checkpoint: the one ``benchmarks/bench_server.py`` serves (default model, RTN HLQ w4g128).

``--step-costs`` also prints, per thread count, what a forward over n = 2 … 9 tokens (all their logits, as a
draft check computes) costs in plain decode steps: the price of checking a draft on this machine.

``--peer GGUF`` adds llama.cpp (the peer build of ``scripts/setup_peer.sh``) on the same prompt token ids (the
checkpoint's chat template) in the same process: plain greedy decoding against llama-cpp-python's prompt-lookup
draft (``LlamaPromptLookupDecoding``, ``--peer-draft`` tokens per draft), alternating rounds likewise.
"""

from __future__ import annotations

import argparse
import resource
import time
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
    ap.add_argument("--step-costs", action="store_true", help="print a forward over n tokens in plain steps")
    ap.add_argument("--peer", type=Path, help="a llama.cpp GGUF to time the same way, with and without prompt lookup")
    ap.add_argument("--peer-draft", type=int, default=10, help="llama.cpp prompt lookup: tokens per draft")
    args = ap.parse_args()
    ckpt = args.checkpoint or default_checkpoint()
    print(f"checkpoint: {ckpt}")
    print(f"{'threads':>7} {'prompt':<13} {'plain tok/s':>11} {'spec tok/s':>10} {'ratio':>6} "
          f"{'tokens/step':>11} {'taken':>9} {'same':>5}")
    for threads in args.threads:
        model = elutq.load(ckpt, threads=threads)
        if args.step_costs:
            print(step_costs(model, threads))
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
    if args.peer:
        ids = {kind: model.encode(messages=[{"role": "user", "content": text}]) for kind, text in PROMPTS.items()}
        peer_rows(args, ids, set(model.eos_ids))
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def forward_costs(model, lengths=(1, 2, 3, 4, 5, 7, 9), reps: int = 7) -> dict[int, float]:
    """Seconds of a forward over n tokens after a 40-token prompt (all n rows of logits, as a draft check
    computes): medians of ``reps`` alternating rounds, the n tokens dropped from the session after each."""
    s = model.session
    s.reset()
    model.forward(s, model.encode(PROMPTS["open chat"])[:40])
    base, times = len(s.tokens), {}
    for _ in range(reps):
        for n in lengths:
            t = time.perf_counter()
            model.forward(s, list(range(1000, 1000 + n)), all_logits=n > 1)
            times.setdefault(n, []).append(time.perf_counter() - t)
            del s.tokens[base:]
    return {n: sorted(v)[len(v) // 2] for n, v in times.items()}


def step_costs(model, threads: int) -> str:
    """:func:`forward_costs` in plain decode steps, as one line."""
    med = forward_costs(model)
    return (f"{threads} threads: a plain step {med[1] * 1000:.1f} ms; a forward over n tokens, in steps: "
            + ", ".join(f"{n}: {med[n] / med[1]:.2f}" for n in med if n > 1))


def peer_rows(args, prompt_ids: dict[str, list[int]], stops: set[int]) -> None:
    """llama.cpp greedy decode tokens/s without and with its prompt-lookup draft, on elutq's prompt token ids,
    stopping at elutq's end-of-sequence ids (the same tokenizer)."""
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    print(f"llama.cpp: {args.peer} (prompt lookup: {args.peer_draft} tokens per draft)")
    for threads in args.threads:
        common = dict(model_path=str(args.peer), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
        engines = {False: Llama(**common), True: Llama(**common, draft_model=LlamaPromptLookupDecoding(
            num_pred_tokens=args.peer_draft))}  # fmt: skip
        for kind, ids in prompt_ids.items():
            best: dict[bool, tuple[float, list[int]]] = {}
            for _ in range(args.rounds):
                for spec, llm in engines.items():
                    out: list[int] = []
                    t_first = 0.0
                    for t in llm.generate(list(ids), temp=0.0, top_k=1, reset=True):
                        if not out:
                            t_first = time.perf_counter()
                        out.append(t)
                        if t in stops or len(out) >= args.max_new_tokens:
                            break
                    rate = (len(out) - 1) / max(time.perf_counter() - t_first, 1e-9)
                    if spec not in best or rate > best[spec][0]:
                        best[spec] = (rate, out)
            (p, plain), (s, fast) = best[False], best[True]
            print(f"{threads:>7} {kind:<13} {p:>11.1f} {s:>10.1f} {s / p:>5.2f}x {'':>11} {'':>9} "
                  f"{str(plain == fast):>5}   llama.cpp ({len(plain)} tokens)")
        del engines


if __name__ == "__main__":
    main()
