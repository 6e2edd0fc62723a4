"""Where the int8 activation tables' error comes from, by layer type (issue 5's top-1 goal).

The reference is transformers running the checkpoint's dequantized weights in fp32.  For each set of
layers, those layers (and only those) are computed by the LUT kernels with int8 tables
(``LUTLinear``), everything else stays torch; the logits over WikiText-2 test tokens, teacher-forced,
are compared with the reference: relative RMS error and top-1 agreement.  The last rows put every
quantized linear on the kernels (torch attention/norms), then the native runtime end to end
(``elutq.load(...).logits``, what ``tests/test_runtime_default_model.py`` checks).

    .venv/bin/python benchmarks/bench_table_error.py [--checkpoint DIR] [--tokens 512]

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
from elutq.checkpoint import HLQLinear, load_quantized
from elutq.eval import load_text
from elutq.kernels import LUTLinear, active_path

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
    args = ap.parse_args()
    ckpt = args.checkpoint or default_checkpoint()
    model, tokenizer, _ = load_quantized(ckpt)
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
        y = luts[name](h.reshape(-1, h.shape[-1]).float()).reshape(*h.shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    print(f"checkpoint: {ckpt}; {len(ids)} WikiText-2 test tokens; {active_path()} kernels, int8 tables\n")
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
    rel, agree = compare(elutq.load(ckpt).logits(ids), ref)
    print(f"| native runtime (everything) | {rel:.2e} | {agree:.2%} |")
    top2 = ref.topk(2, -1).values
    margin = top2[:, 0] - top2[:, 1]
    print(
        f"\nreference top-1 margins: {(margin < 0.05).sum().item()} positions < 0.05, "
        f"{(margin < 0.1).sum().item()} < 0.1, {(margin < 0.2).sum().item()} < 0.2 "
        f"(logit RMS {ref.pow(2).mean().sqrt().item():.2f}); 99% agreement allows {len(ids) // 100} misses"
    )
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
