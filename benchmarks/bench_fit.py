"""HLQ fitting (``hlq.quantize_weight``: what RTN, ``--target-bpw``'s measurement and GPTQ's group fits run)
in native code against the torch reference, same run, on a model's real weights.

    .venv/bin/python benchmarks/bench_fit.py [--model default] [--layer 0] [--rounds 3] [--threads 2]

For each setting, every linear of one decoder layer is quantized with the native fit and nearest-level search
(``csrc/fit.cpp``) and with their torch references (``hlq.fit_hlq_als_reference``,
``hlq.assign_nearest_reference``), alternating, best of ``--rounds``; prints both times, the ratio, and the
relative difference of the summed squared weight error (0 where the two choose the same parameters).
"""

from __future__ import annotations

import argparse
import time

import torch

from elutq import hlq
from elutq.hlq import QuantConfig, quantize_weight
from elutq.models import resolve_source_dir
from elutq.pipeline import open_source
from elutq.utils import peak_rss_mb

SETTINGS = ((2, 128), (2, -1), (3, 128), (4, 32))


def quantize_all(weights: list[torch.Tensor], cfg: QuantConfig, native: bool) -> tuple[float, float]:
    """Seconds to quantize every matrix, and the summed squared weight error."""
    saved = hlq.fit_hlq_als, hlq.assign_nearest
    if not native:
        hlq.fit_hlq_als, hlq.assign_nearest = hlq.fit_hlq_als_reference, hlq.assign_nearest_reference
    try:
        t = time.perf_counter()
        qws = [quantize_weight(w, cfg) for w in weights]
        seconds = time.perf_counter() - t
    finally:
        hlq.fit_hlq_als, hlq.assign_nearest = saved
    return seconds, sum(float((qw.dequantize() - w).pow(2).sum()) for qw, w in zip(qws, weights, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from elutq import _native

    _native.set_num_threads(args.threads)
    from transformers import AutoConfig

    src = resolve_source_dir(args.model)
    source = open_source(src, AutoConfig.from_pretrained(src), None)
    prefix = f"model.layers.{args.layer}."
    names = [k for k in source.weight_map if k.startswith(prefix) and k.endswith("proj.weight")]
    weights = [source.get(k).float() for k in names]
    n = sum(w.numel() for w in weights)
    print(f"{args.model}: layer {args.layer}, {len(weights)} linears, {n / 1e6:.1f}M weights; {args.threads} threads, "
          f"best of {args.rounds}")
    print("| setting | torch reference (s) | native (s) | speed-up | squared error, native / reference − 1 |")
    print("|---|---|---|---|---|")
    for bits, group in SETTINGS:
        cfg = QuantConfig(bits=bits, group_size=group)
        best: dict[bool, tuple[float, float]] = {}
        for _ in range(args.rounds):
            for native in (False, True):
                s, e = quantize_all(weights, cfg, native)
                if native not in best or s < best[native][0]:
                    best[native] = (s, e)
        (ref_s, ref_e), (nat_s, nat_e) = best[False], best[True]
        name = f"w{bits}" + (f"g{group}" if group != -1 else " per-row")
        diff = f"{nat_e / ref_e - 1:+.1e}" if ref_e else f"both {nat_e:.1e}"  # 0: the source is on this grid
        print(f"| {name} | {ref_s:.2f} | {nat_s:.2f} | {ref_s / nat_s:.1f}× | {diff} |")
    print(f"peak RSS: {peak_rss_mb():.0f} MiB")


if __name__ == "__main__":
    main()
