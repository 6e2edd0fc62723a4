"""Does a mixed-precision measurement rank modules as the model's loss does?  Each module alone is quantized
(RTN-HLQ at one setting, as the measurement quantizes it) in the unquantized model, and the rise in
next-token loss on test text is set beside each measurement's cost for that module.

    .venv/bin/python benchmarks/mixed_proxy.py MEASUREMENT.json [MEASUREMENT.json ...] [--model default]
        [--setting 2g128] [--every 3] [--tokens 4096]

Layers 0, every ``--every``-th and the last, all their linears, and ``lm_head``; ``--tokens`` of each test
text (WikiText-2 and python-code, windows of 512; never the calibration text).  Prints per module the loss
rise and each measurement's cost, then per measurement the Spearman rank correlation of cost and loss rise
over the modules (1: the same order), and what share of the summed loss rise its 20% costliest modules hold.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from elutq.eval import load_text, tokenize
from elutq.hlq import QuantConfig, quantize_weight
from elutq.models import load_model


def cost(m: dict, name: str, setting: str) -> float:
    entry = m["modules"][name]
    if "options" in entry:
        return entry["options"][setting][0]
    bits, group = setting.split("g")  # a measurement from before group sizes were candidates
    if int(group) != m["settings"].get("group_size", 128):
        raise SystemExit(f"{setting} is not in this measurement (groups of {m['settings'].get('group_size')})")
    return entry["bits"][bits][0]


def ranks(x: list[float]) -> torch.Tensor:
    order = torch.tensor(x).argsort()
    r = torch.empty(len(x))
    r[order] = torch.arange(len(x), dtype=torch.float32)
    return r


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@torch.no_grad()
def mean_loss(model, windows: torch.Tensor) -> float:
    total = 0.0
    for w in windows:
        logits = model(w.unsqueeze(0)).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("measurements", nargs="+", type=Path)
    ap.add_argument("--model", default="default")
    ap.add_argument("--setting", default="2g128", help="bits g group size, as the measurement keys it")
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=4096, help="of each test text")
    args = ap.parse_args()
    ms = {p.name: json.loads(p.read_text()) for p in args.measurements}
    model, tok = load_model(args.model)
    seq = 512
    windows = torch.cat([tokenize(tok, load_text(dataset=d)[0])[: args.tokens // seq * seq].view(-1, seq)
                         for d in ("wikitext2", "python-code")])  # fmt: skip
    base = mean_loss(model, windows)
    n_layers = len(model.model.layers)
    layers = sorted({0, n_layers - 1, *range(0, n_layers, args.every)})
    names = [f"model.layers.{i}.{n}" for i in layers for n, m in model.model.layers[i].named_modules()
             if isinstance(m, torch.nn.Linear)] + ["lm_head"]  # fmt: skip
    bits, group = (int(v) for v in args.setting.split("g"))
    q = QuantConfig(bits=bits, group_size=group)
    print(f"{args.model}: loss {base:.4f} on {windows.numel()} test tokens; each module alone at w{bits}g{group}")
    print("| module | loss rise | " + " | ".join(ms) + " |")
    print("|---|---|" + "---|" * len(ms))
    rise: list[float] = []
    costs: dict[str, list[float]] = {k: [] for k in ms}
    for name in names:
        lin = model.get_submodule(name)
        w = lin.weight.data.clone()
        lin.weight.data = quantize_weight(w, q).dequantize().to(w.dtype)
        rise.append(mean_loss(model, windows) - base)
        lin.weight.data = w
        for k, m in ms.items():
            costs[k].append(cost(m, name, args.setting))
        print(f"| {name} | {rise[-1]:.5f} | " + " | ".join(f"{costs[k][-1]:.4g}" for k in ms) + " |", flush=True)
    top = max(1, len(names) // 5)
    total = sum(max(r, 0.0) for r in rise)
    print(f"\n{len(names)} modules; loss rise summed {total:.4f}")
    for k in ms:
        worst = sorted(range(len(names)), key=lambda i: -costs[k][i])[:top]
        share = sum(max(rise[i], 0.0) for i in worst) / total
        print(f"{k}: Spearman {spearman(costs[k], rise):.3f}; its {top} costliest modules hold {share:.0%} of the rise")


if __name__ == "__main__":
    main()
