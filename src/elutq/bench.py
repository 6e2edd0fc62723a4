"""Runtime speed: prefill and decode tokens/s, bytes streamed per token, fraction of read bandwidth.

Used by ``elutq bench`` and ``benchmarks/bench_runtime.py``.  Tokens are fed straight to the
runtime (no sampling, no tokenizer), so the figures are the decode loop's own speed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import _native, kernels
from .roofline import paired_rounds, peak_rss_mb
from .runtime import Arch, Model, Session
from .utils import ElutqError


@dataclass
class Speed:
    threads: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    read_gb_per_s: float  # this machine's measured read bandwidth at this thread count
    weight_bytes: int  # streamed per decode step
    kv_bytes: int = 0  # KV cache a decode step reads, on average over the measured steps

    @property
    def decode_gb_per_s(self) -> float:
        return self.decode_tokens_per_s * self.weight_bytes / 1e9

    @property
    def roofline_fraction(self) -> float:
        """Weights streamed per second over the read bandwidth (the issue's definition)."""
        return self.decode_gb_per_s / self.read_gb_per_s if self.read_gb_per_s else 0.0

    @property
    def read_fraction(self) -> float:
        """All a decode step must read, weights and KV cache, per second over the read bandwidth."""
        gbs = self.decode_tokens_per_s * (self.weight_bytes + self.kv_bytes) / 1e9
        return gbs / self.read_gb_per_s if self.read_gb_per_s else 0.0


def measure(model: Model, threads: int, prompt_tokens: int, gen_tokens: int, repeats: int, seed: int = 0,
            session: Session | None = None) -> Speed:
    """Best of ``repeats``: prefill of ``prompt_tokens`` random tokens, then ``gen_tokens`` decode steps.
    ``session``: reuse this one (its KV cache already touched) instead of a new one."""
    kernels.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, model.arch.vocab, size=prompt_tokens).tolist()
    s = session or Session(model, max_ctx=min(model.max_ctx, prompt_tokens + gen_tokens + 1))
    best_pf = best_dec = 0.0
    for _ in range(repeats):
        s.reset()
        t0 = time.perf_counter()
        logits = model.forward(s, prompt)
        t1 = time.perf_counter()
        tok = int(np.argmax(logits[-1]))
        for _ in range(gen_tokens):
            tok = int(np.argmax(model.forward(s, [tok])[0]))
        t2 = time.perf_counter()
        best_pf = max(best_pf, prompt_tokens / (t1 - t0))
        best_dec = max(best_dec, gen_tokens / (t2 - t1))
    # decode step at position p reads p + 1 positions of K and V: on average prompt + (gen + 1) / 2
    kv = s.cache.nbytes / s.cache.max_ctx * (prompt_tokens + (gen_tokens + 1) / 2) if gen_tokens else 0
    return Speed(threads, best_pf, best_dec, 0.0, int(model.runtime.weight_bytes), int(kv))


def bench_runtime(
    spec: str,
    prompt_tokens: int = 128,
    gen_tokens: int = 64,
    threads: list[int] | None = None,
    repeats: int = 3,
    residual_tables: bool = False,
) -> list[Speed]:
    """``spec``: a checkpoint or model (see ``elutq.load``), or ``synthetic:BITS`` for :func:`synthetic_model`
    (the LLaMA-2-7B shape, random HLQ weights of BITS bits, groups of 128, 4-bit lm_head)."""
    from .runtime import load

    t0 = time.perf_counter()
    if spec.startswith("synthetic:"):
        bits = spec.removeprefix("synthetic:")
        if bits not in ("1", "2", "3", "4"):
            raise ElutqError(f"synthetic:BITS needs BITS in 1..4, got {spec!r}")
        model = synthetic_model(bits=int(bits), max_ctx=prompt_tokens + gen_tokens + 1)
    else:
        model = load(spec, max_ctx=prompt_tokens + gen_tokens + 1)
    model.runtime.residual_tables = residual_tables
    tables = "int8 + residual int8 tables" if residual_tables else "int8 tables"
    print(f"model: {spec}  (loaded in {time.perf_counter() - t0:.1f}s, {model.runtime.path} kernels, {tables})")
    return report(model, threads, prompt_tokens, gen_tokens, repeats)


def measure_paired(model: Model, threads: int, prompt_tokens: int, gen_tokens: int, repeats: int) -> Speed:
    """:func:`measure`'s figures over :func:`paired_rounds`: best prefill, best decode, and as the read
    bandwidth the mean of the two probes around the best decode round (so the roofline is that round's)."""
    session = Session(model, max_ctx=min(model.max_ctx, prompt_tokens + gen_tokens + 1))
    speeds: list[Speed] = []

    def one_round(t: int) -> tuple[float, float]:
        speeds.append(measure(model, t, prompt_tokens, gen_tokens, 1, session=session))
        return speeds[-1].prefill_tokens_per_s, speeds[-1].decode_tokens_per_s

    r = paired_rounds(one_round, threads, repeats)
    best = max(range(len(r["rounds"])), key=lambda i: r["rounds"][i]["decode"])
    sp = speeds[best]
    sp.prefill_tokens_per_s = r["prefill"]
    sp.read_gb_per_s = r["rounds"][best]["bw"]
    return sp


def report(model: Model, threads: list[int] | None, prompt_tokens: int, gen_tokens: int, repeats: int) -> list[Speed]:
    import os

    threads = threads or sorted({1, os.cpu_count() or 1})
    print(f"weights streamed per decode step: {model.runtime.weight_bytes / 1e6:.1f} MB")
    out = []
    for n in threads:
        out.append(measure_paired(model, n, prompt_tokens, gen_tokens, repeats))
        if n == threads[0]:
            print(f"KV cache read per decode step: {out[0].kv_bytes / 1e6:.1f} MB on average (fp16; GB/s and "
                  "roofline count the weights only, +KV both)")
            print(f"{'threads':>7} {'prefill tok/s':>14} {'decode tok/s':>13} {'GB/s':>6} {'read BW':>8} "
                  f"{'roofline':>9} {'+KV':>5}")
        sp = out[-1]
        print(
            f"{sp.threads:>7} {sp.prefill_tokens_per_s:>14.1f} {sp.decode_tokens_per_s:>13.1f} "
            f"{sp.decode_gb_per_s:>6.1f} {sp.read_gb_per_s:>8.1f} {sp.roofline_fraction:>8.0%} "
            f"{sp.read_fraction:>5.0%}"
        )
    print(f"peak RSS: {peak_rss_mb():.0f} MiB without the probes' buffer  (prompt {prompt_tokens} tokens, "
          f"{gen_tokens} decode steps, best of {repeats}; read BW: the probes around the best decode round)")
    return out


def synthetic_model(
    n_layers: int = 32,
    hidden: int = 4096,
    inter: int = 11008,
    n_heads: int = 32,
    n_kv_heads: int = 32,
    vocab: int = 32000,
    bits: int = 2,
    group_size: int = 128,
    lm_head_bits: int = 4,
    max_ctx: int = 512,
    seed: int = 0,
) -> Model:
    """A llama-shaped model with random HLQ weights (LLaMA-2-7B by default), for speed only."""
    rng = np.random.default_rng(seed)
    head_dim = hidden // n_heads
    arch = Arch(n_layers, hidden, inter, n_heads, n_kv_heads, head_dim, vocab, 1e-5, max_ctx, False)
    inv_freq = (1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
    rt = _native.Runtime(n_layers, hidden, inter, n_heads, n_kv_heads, head_dim, vocab, 1e-5, inv_freq, 1.0)

    def packed(out: int, inp: int, b: int) -> object:
        nrb, ng = -(-out // kernels.ROW_BLOCK), -(-inp // group_size)
        w = rng.integers(0, 256, size=nrb * ng * b * (group_size // 32) * 64, dtype=np.uint8)
        sz = (rng.standard_normal(nrb * ng * (b + 1) * kernels.ROW_BLOCK) * 0.01).astype(np.float16)
        return _native.PackedWeight(w, sz.view(np.uint16), out, inp, b, group_size, rt.path == "avx2")

    no_bias = np.zeros(0, dtype=np.float32)
    kv = n_kv_heads * head_dim
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
              (hidden, inter)]
    ones = np.ones(hidden, dtype=np.float32)
    for i in range(n_layers):
        for slot, (o, k) in enumerate(shapes):
            rt.set_lut(i, slot, packed(o, k, bits), no_bias)
        rt.set_norm(i, "attn", ones)
        rt.set_norm(i, "mlp", ones)
    rt.set_norm(-1, "final", ones)
    emb = (rng.standard_normal((vocab, hidden)) * 0.02).astype(np.float16)
    rt.set_embedding(emb.view(np.uint16))
    rt.set_lut(-1, 0, packed(vocab, hidden, lm_head_bits), no_bias)
    return Model(rt, None, None, arch, None, None, max_ctx)
