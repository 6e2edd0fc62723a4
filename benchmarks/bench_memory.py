"""Bounded memory: quantize synthetic llama-shaped checkpoints and measure the quantizer's peak RSS.

    .venv/bin/python benchmarks/bench_memory.py size     # >= 3B parameters, peak RSS must stay < 2 GB
    .venv/bin/python benchmarks/bench_memory.py layers   # same shape, 4 vs 16 layers: peak RSS within 10%

Each model is written under --dir (default: the system temp dir, never the repo) as random fp16
weights in sharded safetensors with an index json, a llama config.json and the default model's
tokenizer, then quantized by one `elutq quantize` child process whose peak RSS is the kernel's
accounting for that child alone (os.wait4).  Model and checkpoint are deleted afterwards
(--keep keeps them).  Defaults: GPTQ HLQ w2g128, lm_head at the CLI default (4-bit g128), calibration
8 x 256 tokens of WikiText-2 valid.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from _common import elutq_cmd, run_measured
from elutq.models import default_model_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def layer_shapes(hidden: int, inter: int, heads: int, kv_heads: int) -> dict[str, tuple[int, ...]]:
    kv = hidden // heads * kv_heads
    return {
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }


def write_synthetic_llama(path: Path, a: argparse.Namespace, n_layers: int) -> int:
    """Random fp16 llama checkpoint in shards of about ``a.shard_gb`` GB; returns its parameter count."""
    from transformers import LlamaConfig

    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (a.vocab, a.hidden)}
    for i in range(n_layers):
        for k, shape in layer_shapes(a.hidden, a.intermediate, a.heads, a.kv_heads).items():
            tensors[f"model.layers.{i}.{k}"] = shape
    tensors["model.norm.weight"] = (a.hidden,)
    if not a.tie:
        tensors["lm_head.weight"] = (a.vocab, a.hidden)

    shard: dict[str, torch.Tensor] = {}
    shards: list[dict[str, torch.Tensor]] = []
    weight_map: dict[str, int] = {}
    n_params = size = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            shards.append({k: v.shape for k, v in shard.items()})
            save_file(shard, str(path / f"part-{len(shards)}.safetensors"), metadata={"format": "pt"})
            shard, size = {}, 0

    for name, shape in tensors.items():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.float16)  # norm weights
        else:  # 0.02: the usual initializer range, so activations stay finite through many layers
            t = (torch.randn(shape, generator=gen) * 0.02).half()
        n_params += t.numel()
        shard[name] = t
        weight_map[name] = len(shards) + 1
        size += t.numel() * 2
        if size >= a.shard_gb * 1e9:
            flush()
    flush()
    total = len(shards)
    names = {i: f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)}
    for i, name in names.items():
        (path / f"part-{i}.safetensors").rename(path / name)
    index = {"metadata": {"total_size": n_params * 2}, "weight_map": {k: names[v] for k, v in weight_map.items()}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=n_layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=a.tie,
        architectures=["LlamaForCausalLM"],
        dtype="float16",
    ).save_pretrained(path)
    src = default_model_dir()
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy(src / f, path / f)
    return n_params


def run_one(a: argparse.Namespace, n_layers: int, root: Path) -> dict:
    model, out = root / f"synthetic-{n_layers}L", root / f"synthetic-{n_layers}L-q"
    t0 = time.perf_counter()
    # Written by a separate process: a child's ru_maxrss starts from its parent's high-water mark
    # (exec keeps it), so this process must never hold the model itself.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        n_params = pool.apply(write_synthetic_llama, (model, a, n_layers))
    src_gb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9
    print(
        f"{n_layers} layers, hidden {a.hidden}, intermediate {a.intermediate}, vocab {a.vocab} "
        f"({'tied' if a.tie else 'untied'}): {n_params:,} parameters = {n_params / 1e9:.3f}B, "
        f"{src_gb:.2f} GB fp16 in {len(list(model.glob('*.safetensors')))} shards "
        f"(written in {time.perf_counter() - t0:.0f}s)",
        flush=True,
    )
    cmd = elutq_cmd(
        "quantize", str(model), "-o", str(out), "--method", a.method, "--bits", str(a.bits), "--rotate", "none",
        "--group-size", str(a.group_size), "--lm-head-bits", str(a.lm_head_bits),
        "--calib-samples", str(a.calib_samples), "--calib-seqlen", str(a.calib_seqlen), *a.extra,
    )  # fmt: skip
    print("  $ " + shlex.join(cmd), flush=True)
    m = run_measured(cmd, log=root / f"quantize-{n_layers}L.log")
    if m.returncode != 0:
        raise RuntimeError(f"quantize failed:\n{m.output[-3000:]}")
    bpw = re.search(r"bits per weight \(quantized linears\): ([\d.]+)", m.output)
    print(
        f"  quantize: {m.seconds:.0f}s wall ({m.seconds / n_layers:.1f}s per layer incl. start-up), "
        f"{m.cpu_seconds:.0f} CPU-s, "
        f"peak RSS {m.peak_rss_mb:.0f} MiB ({m.peak_rss_mb * 2**20 / 1e9:.2f} GB), "
        f"BPW {bpw.group(1) if bpw else '?'}",
        flush=True,
    )
    if not a.keep:
        shutil.rmtree(model)
        shutil.rmtree(out, ignore_errors=True)
    return {"layers": n_layers, "params": n_params, "seconds": m.seconds, "cpu": m.cpu_seconds, "rss": m.peak_rss_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["size", "layers"])
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the synthetic models go")
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=49152, help="the default model's tokenizer has 49152 tokens")
    ap.add_argument("--tie", action="store_true", help="tie lm_head to the embeddings (default: untied)")
    ap.add_argument("--layers", type=int, default=28, help="decoder layers for `size`")
    ap.add_argument("--layer-counts", default="4,16", help="decoder layers compared by `layers`")
    ap.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--lm-head-bits", type=int, default=4)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--limit-mb", type=float, default=2000.0, help="`size` passes when peak RSS < this (MB, 1e6 B)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--quantize-args", default="", help="more `elutq quantize` options, e.g. '--offload always'")
    a = ap.parse_args()
    a.extra = shlex.split(a.quantize_args)
    print("# " + shlex.join([sys.executable, *sys.argv]), flush=True)
    root = Path(tempfile.mkdtemp(prefix="elutq-bench-memory-", dir=a.dir))
    try:
        if a.part == "size":
            r = run_one(a, a.layers, root)
            ok = r["rss"] * 2**20 / 1e6 < a.limit_mb
            print(f"\n{r['params'] / 1e9:.2f}B parameters: peak RSS {r['rss']:.0f} MiB -> "
                  f"{'PASS' if ok else 'FAIL'} (limit {a.limit_mb:.0f} MB)")  # fmt: skip
        else:
            rows = [run_one(a, int(n), root) for n in a.layer_counts.split(",")]
            lo, hi = min(r["rss"] for r in rows), max(r["rss"] for r in rows)
            print("\n| layers | parameters | quantize wall (s) | CPU (s) | peak RSS (MiB) |\n|---|---|---|---|---|")
            for r in rows:
                print(
                    f"| {r['layers']} | {r['params'] / 1e6:.0f}M | {r['seconds']:.0f} | {r['cpu']:.0f} "
                    f"| {r['rss']:.0f} |"
                )
            growth = hi / lo - 1
            print(f"\npeak RSS spread {100 * growth:.1f}% -> {'PASS' if growth <= 0.10 else 'FAIL'} (limit 10%)")
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
