"""Where the int8 activation tables' error comes from, by layer type (issue 5's top-1 goal).

The reference is transformers running the checkpoint's dequantized weights in fp32.  For each set of
layers, those layers (and only those) are computed by the LUT kernels with int8 tables
(``LUTLinear``), everything else stays torch; the logits over WikiText-2 test tokens, teacher-forced,
are compared with the reference: relative RMS error and top-1 agreement.  The last rows put every
quantized linear on the kernels (torch attention/norms), then the native runtime end to end
(``elutq.load(...).logits``, what ``tests/test_runtime_default_model.py`` checks).

    .venv/bin/python benchmarks/bench_table_error.py [--checkpoint DIR] [--tokens 512] [--residual-tables]

``--residual-tables``: the same with a second int8 lookup pass on the tables' rounding error.
``--speed``: then what that costs: the native runtime's prefill and decode tokens/s with int8 tables
and with residual tables, alternating in one process (best of ``--rounds`` each), at 1 thread and at
all cores.  ``--speed-only`` skips the accuracy part; ``--speed-model synthetic:2`` times the LLaMA-2-7B
shape with random w2g128 weights (``elutq bench``'s) instead of the checkpoint.

Default checkpoint: the default model, RTN HLQ w4g128 (made once under out/, as bench_server.py's).
Also prints how many positions the reference itself decides by a small logit margin, which bounds
what any approximate kernel can reach.
"""

from __future__ import annotations

import argparse
import resource
from pathlib import Path

import torch

import elutq
from bench_server import default_checkpoint
from elutq.checkpoint import load_quantized
from elutq.eval import load_text
from elutq.kernels import LUTLinear, active_path
from elutq.modules import HLQLinear

GROUPS = (
    ("q_proj", "k_proj", "v_proj"),
    ("o_proj",),
    ("gate_proj", "up_proj"),
    ("down_proj",),
    ("lm_head",),
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"),
)


def compare(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    rel = ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    return rel, (got.argmax(-1) == ref.argmax(-1)).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--residual-tables", action="store_true", help="int8 tables + residual tables (2 passes)")
    ap.add_argument("--speed", action="store_true", help="also time int8 vs residual tables in the runtime")
    ap.add_argument("--speed-only", action="store_true", help="only the timing (implies --speed)")
    ap.add_argument("--speed-model", default=None, help="time this instead: a checkpoint, or synthetic:BITS")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.speed_only:
        speed(args.speed_model or str(args.checkpoint or default_checkpoint()), args.rounds)
        return
    ckpt = args.checkpoint or default_checkpoint()
    model, tokenizer, _ = load_quantized(ckpt, fp16_kv=True)  # attention as the runtime computes it
    text, _ = load_text(dataset="wikitext2", split="test")
    ids = tokenizer(text[: 40 * args.tokens], add_special_tokens=False).input_ids[: args.tokens]
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = model(x).logits[0]

    names = {id(m): n for n, m in model.named_modules() if isinstance(m, HLQLinear)}
    luts = {
        n: LUTLinear.from_packed(m.qweight, m.scales, m.zeros, m.in_features, m.group_size)
        for n, m in model.named_modules()
        if isinstance(m, HLQLinear)
    }
    on_kernels: tuple[str, ...] = ()
    torch_forward = HLQLinear.forward

    def forward(self: HLQLinear, h: torch.Tensor) -> torch.Tensor:
        name = names[id(self)]
        if not name.endswith(on_kernels):
            return torch_forward(self, h)
        y = luts[name](h.reshape(-1, h.shape[-1]).float(), residual_tables=args.residual_tables)
        y = y.reshape(*h.shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    kind = "int8 + residual int8 tables" if args.residual_tables else "int8 tables"
    print(f"checkpoint: {ckpt}; {len(ids)} WikiText-2 test tokens; {active_path()} kernels, {kind}\n")
    print("| on the LUT kernels | relative RMS logit error | top-1 agreement |\n|---|---|---|")
    HLQLinear.forward = forward
    try:
        for group in GROUPS:
            on_kernels = group
            with torch.no_grad():
                rel, agree = compare(model(x).logits[0], ref)
            label = "all quantized linears" if len(group) > 4 else ", ".join(group)
            print(f"| {label} | {rel:.2e} | {agree:.2%} |", flush=True)
    finally:
        HLQLinear.forward = torch_forward
    rel, agree = compare(elutq.load(ckpt, residual_tables=args.residual_tables).logits(ids), ref)
    print(f"| native runtime (everything) | {rel:.2e} | {agree:.2%} |")
    top2 = ref.topk(2, -1).values
    margin = top2[:, 0] - top2[:, 1]
    print(
        f"\nreference top-1 margins: {(margin < 0.05).sum().item()} positions < 0.05, "
        f"{(margin < 0.1).sum().item()} < 0.1, {(margin < 0.2).sum().item()} < 0.2 "
        f"(logit RMS {ref.pow(2).mean().sqrt().item():.2f}); 99% agreement allows {len(ids) // 100} misses"
    )
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if args.speed:
        speed(args.speed_model or str(ckpt), args.rounds)


def speed(spec: str, rounds: int) -> None:
    import os

    from elutq.bench import measure, synthetic_model

    if spec.startswith("synthetic:"):
        bits = spec.removeprefix("synthetic:")
        if bits not in ("1", "2", "3", "4"):
            raise SystemExit(f"--speed-model synthetic:BITS needs BITS in 1..4, got {spec!r}")
        model = synthetic_model(bits=int(bits), max_ctx=256)
    else:
        model = elutq.load(spec, max_ctx=256)
    for threads in sorted({1, os.cpu_count() or 1}):
        best: dict[bool, list[float]] = {False: [0.0, 0.0], True: [0.0, 0.0]}
        for _ in range(rounds):
            for residual in (False, True):
                model.runtime.residual_tables = residual
                sp = measure(model, threads, 128, 64, 1)
                b = best[residual]
                b[0], b[1] = max(b[0], sp.prefill_tokens_per_s), max(b[1], sp.decode_tokens_per_s)
        print(f"\n{spec}, {active_path()} kernels, {threads} thread(s), prompt 128 tokens, 64 decode steps, "
              f"best of {rounds} alternating rounds:")
        print("| tables | prefill tok/s | decode tok/s |\n|---|---|---|")
        for residual, label in ((False, "int8"), (True, "int8 + residual int8")):
            print(f"| {label} | {best[residual][0]:.1f} | {best[residual][1]:.1f} |")
        r = [best[True][i] / best[False][i] for i in (0, 1)]
        print(f"residual / int8: prefill {r[0]:.2f}x, decode {r[1]:.2f}x", flush=True)
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
