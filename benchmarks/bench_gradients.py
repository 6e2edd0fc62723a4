"""Mixed precision's gradient pass: streamed layer by layer against the whole model in memory, same run.

    .venv/bin/python benchmarks/bench_gradients.py --model qwen-coder-1.5b --samples 8

``mixed.loss_gradients`` (what ``elutq quantize --target-bpw`` runs before measuring) keeps one layer's
weights and every ⌈√layers⌉-th layer's input, recomputes the others on the way back and reruns each layer
there ("streamed"; "keep-all": every layer's input kept, ``keep_every=1``); the simple way loads the whole
unquantized model in fp32 (transformers) and runs one backward pass per sample.  Each runs in its own child
process (wall time, peak RSS of that child alone); the parent checks that all give the same per-token and
per-channel weights (the largest relative difference over every module, against the whole model's).
Calibration: the project's default mix, ``--samples`` × ``--seqlen`` tokens.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from _common import run_measured


def streamed(model: str, samples: int, seqlen: int, keep_every: int | None = None) -> dict[str, torch.Tensor]:
    from transformers import AutoConfig, AutoTokenizer

    from elutq.calibration import CalibConfig, calibration_ids
    from elutq.mixed import loss_gradients
    from elutq.models import meta_model, position_embeddings, resolve_source_dir
    from elutq.pipeline import open_source

    src = resolve_source_dir(model)
    config = AutoConfig.from_pretrained(src)
    ids, _ = calibration_ids(AutoTokenizer.from_pretrained(src), CalibConfig(samples, seqlen), model=src)
    pos = position_embeddings(config, seqlen, "cpu", meta_model(config))
    return loss_gradients(config, open_source(src, config, None), None, ids, pos, keep_every=keep_every)


def whole(model: str, samples: int, seqlen: int) -> dict[str, torch.Tensor]:
    from elutq.calibration import CalibConfig, calibration_ids
    from elutq.models import load_model, resolve_source_dir

    net, tok = load_model(model)
    net.requires_grad_(False)
    ids, _ = calibration_ids(tok, CalibConfig(samples, seqlen), model=resolve_source_dir(model))
    tokens: dict[str, torch.Tensor] = {}
    channels: dict[str, torch.Tensor] = {}
    sample = 0

    def hook(name: str):
        def keep(_m: torch.nn.Module, _a: tuple, out: torch.Tensor) -> None:  # None: the output stays as it is
            out.register_hook(lambda g: add(name, g[0].float().pow(2)))

        return keep

    def add(name: str, g2: torch.Tensor) -> None:
        tokens.setdefault(name, torch.zeros(ids.shape))[sample] = g2.sum(-1)
        channels[name] = channels.get(name, 0) + g2.sum(0).double()

    for n, m in net.named_modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(hook(n))
    with torch.enable_grad():
        for sample in range(samples):
            x = net.model.embed_tokens(ids[sample : sample + 1]).requires_grad_(True)
            logits = net(inputs_embeds=x).logits
            torch.nn.functional.cross_entropy(logits[0, :-1], ids[sample, 1:]).backward()
            print(f"sample {sample + 1}/{samples}", flush=True)
    out = {}
    for name, w in tokens.items():
        out[f"{name}.tokens"] = w
        out[f"{name}.channels"] = (channels[name] / channels[name].sum()).float()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--child", choices=["streamed", "keep-all", "whole"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.child == "whole":
            got = whole(args.model, args.samples, args.seqlen)
        else:
            got = streamed(args.model, args.samples, args.seqlen, keep_every=1 if args.child == "keep-all" else None)
        save_file({k: v.contiguous() for k, v in got.items()}, str(args.out))
        return
    print(f"{args.model}: gradient pass over {args.samples} x {args.seqlen} tokens, each way in its own process")
    with tempfile.TemporaryDirectory() as tmp:
        got = {}
        for way in ("streamed", "keep-all", "whole"):
            out = Path(tmp) / f"{way}.safetensors"
            cmd = [sys.executable, __file__, "--model", args.model, "--samples", str(args.samples),
                   "--seqlen", str(args.seqlen), "--child", way, "--out", str(out)]  # fmt: skip
            m = run_measured(cmd, Path(tmp) / f"{way}.log")
            if m.returncode:
                sys.exit(f"{way} failed:\n{m.output[-3000:]}")
            print(f"  {way:8s}  {m.seconds:8.1f} s  peak RSS {m.peak_rss_mb:8.0f} MB", flush=True)
            got[way] = (load_file(str(out)), m)
    b, mb = got["whole"]
    for way in ("streamed", "keep-all"):
        a, ma = got[way]
        if set(a) != set(b):
            sys.exit(f"{way} and whole give other modules: {sorted(set(a) ^ set(b))[:6]}")
        worst = max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in a)
        print(f"  {way} / whole: time {ma.seconds / mb.seconds:.2f}x, peak RSS {ma.peak_rss_mb / mb.peak_rss_mb:.2f}x; "
              f"largest relative difference of the weights over {len(a) // 2} modules: {worst:.1e}")

if __name__ == "__main__":
    main()
