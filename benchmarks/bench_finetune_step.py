"""One training step of `elutq finetune --stage e2e`, with the trainable views' decode in native code (the
default on the CPU) against the torch decode (what CUDA runs), alternating in one process.

    .venv/bin/python benchmarks/bench_finetune_step.py CHECKPOINT [--rounds 3] [--batch 4] [--seqlen 256]

CHECKPOINT is an HLQ checkpoint (e.g. `elutq quantize default -o OUT --bits 2`).  Each round times, for
both decodes: every trainable weight decoded and its scale/offset gradient taken from a random upstream
gradient (the decode alone), then one whole step as `finetune_e2e` takes it (forward with activation
checkpointing, causal-LM loss projected onto the vocabulary in slices, backward) on random token ids.
Prints the best round of each and the ratio, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import time

import torch

from elutq import finetune
from elutq.checkpoint import load_quantized
from elutq.finetune import e2e_loss, trainable_views
from elutq.utils import peak_rss_mb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    args = ap.parse_args()

    model, _, _ = load_quantized(args.checkpoint)
    for p in model.parameters():
        p.requires_grad_(False)
    views = trainable_views(model)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seqlen), generator=gen)
    upstream = {n: torch.randn(v.out_features, v.in_features, generator=gen) for n, v in views.items()}
    n_weights = sum(v.out_features * v.in_features for v in views.values())

    def decode_all() -> None:
        for n, v in views.items():
            (v.weight() * upstream[n]).sum().backward()

    def step() -> None:
        e2e_loss(model, ids, None).backward()

    best: dict[tuple[str, bool], float] = {}
    for r in range(args.rounds):
        for native in ([True, False] if r % 2 == 0 else [False, True]):
            finetune.NATIVE_DECODE = native
            for name, fn in (("decode", decode_all), ("step", step)):
                for v in views.values():
                    v.s.grad = v.z.grad = None
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                best[name, native] = min(best.get((name, native), dt), dt)
    finetune.NATIVE_DECODE = True

    print(f"{args.checkpoint}: {len(views)} trainable matrices, {n_weights / 1e6:.1f}M weights; step: "
          f"{args.batch} × {args.seqlen} tokens; best of {args.rounds} rounds, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| part | native decode (s) | torch decode (s) | speed-up |")
    print("|---|---|---|---|")
    for name, what in (("decode", "every weight decoded + its s/z gradient"), ("step", "one e2e training step")):
        nat, ref = best[name, True], best[name, False]
        print(f"| {what} | {nat:.2f} | {ref:.2f} | {ref / nat:.2f}× |")
    print(f"\npeak RSS {peak_rss_mb():,.0f} MiB")


if __name__ == "__main__":
    main()
