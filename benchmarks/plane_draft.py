"""Would a bit-plane draft pay?  Agreement of a checkpoint's truncated bit-planes with the checkpoint itself.

    .venv/bin/python benchmarks/plane_draft.py --checkpoint DIR [--keep 1 2 3] [--max-new-tokens 128]
    .venv/bin/python benchmarks/plane_draft.py --checkpoint DIR --draft SMALLER_DIR   # a separate draft

Dropping plane ``i`` of every group of a matrix (``s_i = 0``, ``z += s_i/2``: the dropped bit replaced by
its mean, exactly what the int8-table kernel computes when it skips that plane) leaves a coarser model of
the same network that a bit-serial kernel would read at about ``keep/bits`` of the weight bytes.  The planes
are not fitted to be nested (HLQ does not even order a group's scales), so the planes dropped are those of
smallest mean |scale| over the matrix: what a kernel skipping whole planes can do, not the best per group.
As a speculative draft it pays only if it agrees with the full model often enough.  For each prompt of
``bench_speculative.py`` the full model (torch, dequantized) answers greedily; the truncated model (every
decoder linear keeps its ``keep`` planes; embeddings and head untouched, or the head truncated too with
``--truncate-head``; ``keep = bits`` is printed as a control: it must agree on every token) then reads the
same tokens, and the script prints how often its greedy choice equals the full model's (``α``,
teacher-forced: the per-token acceptance of a greedy draft) and the speed-up that acceptance allows at
best — draft length ``k`` chosen, a draft step costing ``keep/bits`` of a plain step (less than it would:
the head is read whole), verification costing one plain step whatever ``k`` (memory-bound decode, the most
favourable case):  ``max_k (1 − α^(k+1)) / (1 − α) / (1 + k·keep/bits)``.  With ``--draft`` the same for a
separate checkpoint sharing the tokenizer (e.g. a 2-bit file of the same model), its cost the ratio of the
two files' quantized linear bytes (the tied head counted once, embedding lookups not at all).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench_server import default_checkpoint
from bench_speculative import PROMPTS
from elutq.checkpoint import load_quantized
from elutq.modules import HLQEmbedding, HLQLinear


def truncate(model: torch.nn.Module, keep: int, head: bool) -> dict[str, torch.Tensor]:
    """Drop all but ``keep`` planes of every decoder linear (and the head with ``head``), in place; returns the
    original scales and zeros to restore."""
    saved = {}
    for name, m in model.named_modules():
        if not isinstance(m, HLQLinear) or isinstance(m, HLQEmbedding) or m.bits <= keep:
            continue
        if not head and "layers." not in name:
            continue
        saved[name] = (m.scales.clone(), m.zeros.clone())
        s = m.scales.float()
        drop = s.abs().mean(dim=(0, 1)).argsort()[: m.bits - keep]  # the planes of smallest mean |scale|
        z = m.zeros.float() + s[..., drop].sum(-1) / 2
        s[..., drop] = 0
        m.scales.copy_(s.half())
        m.zeros.copy_(z.half())
    return saved


def restore(model: torch.nn.Module, saved: dict) -> None:
    for name, m in model.named_modules():
        if name in saved:
            m.scales.copy_(saved[name][0])
            m.zeros.copy_(saved[name][1])


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every quantized linear once (a tied head's tensors are the embedding's too;
    an embedding lookup reads one row, so embeddings are left out)."""
    seen = {b.data_ptr(): b.numel() * b.element_size() for m in model.modules()
            if isinstance(m, HLQLinear) and not isinstance(m, HLQEmbedding) for b in (m.qweight, m.scales, m.zeros)}
    return sum(seen.values())


def best_speedup(alpha: float, cost: float, k_max: int = 8) -> tuple[float, int]:
    a = min(alpha, 0.999)
    return max(((1 - a ** (k + 1)) / (1 - a) / (1 + k * cost), k) for k in range(k_max + 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--keep", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--truncate-head", action="store_true")
    ap.add_argument("--draft", type=Path, help="a separate draft checkpoint instead of truncated planes")
    args = ap.parse_args()
    ckpt = args.checkpoint or default_checkpoint()
    model, tok, qc = load_quantized(ckpt)
    model.eval()
    bits = max(m.bits for m in model.modules() if isinstance(m, HLQLinear) and not isinstance(m, HLQEmbedding))
    print(f"checkpoint: {ckpt} ({bits} bits), greedy replies of {args.max_new_tokens} tokens, torch reference")
    if any(not 1 <= k <= bits for k in args.keep):
        ap.error(f"--keep takes plane counts from 1 to {bits}")
    drafts: list[tuple[str, float, object]] = [(f"keep {k}", k / bits, k) for k in sorted({*args.keep, bits})]
    if args.draft:
        draft, _, _ = load_quantized(args.draft)
        drafts = [(args.draft.name, weight_bytes(draft) / weight_bytes(model), draft.eval())]
    print(f"{'prompt':<13} {'draft':>24} {'bytes':>6} {'alpha':>6} {'best k':>6} {'speed-up bound':>14}")
    torch.manual_seed(0)
    with torch.inference_mode():
        for kind, text in PROMPTS.items():
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          return_tensors="pt")
            ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
            full = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                  attention_mask=torch.ones_like(ids))
            n = ids.shape[1]
            reply = full[0, n:]
            for name, cost, how in drafts:
                if isinstance(how, int):  # truncated planes of the model itself
                    saved = truncate(model, how, args.truncate_head)
                    pred = model(full).logits[0, n - 1 : -1].argmax(-1)
                    restore(model, saved)
                else:
                    pred = how(full).logits[0, n - 1 : -1].argmax(-1)
                alpha = (pred == reply).float().mean().item()
                s, k = best_speedup(alpha, cost)
                print(f"{kind:<13} {name:>24} {cost:>6.2f} {alpha:>6.3f} {k:>6} {s:>13.2f}x")

if __name__ == "__main__":
    main()
