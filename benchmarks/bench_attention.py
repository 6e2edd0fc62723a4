"""The decode loop's attention kernels (``attend_*``), each path against the scalar one in the same run.

    .venv/bin/python benchmarks/bench_attention.py [--lengths 100,1000,4000] [--repeats 200]

One call = one column's causal attention for one KV head and the query heads sharing it, over
``length`` cached positions strided as in the KV cache.  Shapes: SmolLM2-135M (head_dim 64, 3 query
heads per KV head), LLaMA-2-7B (128, 1), Qwen2.5-7B (128, 7).  Each path is timed in alternating
rounds (best of 7 rounds of ``--repeats`` calls; the ~1 µs of Python call overhead is included), and
the table gives µs per call and the speed-up over the scalar path (and over AVX2 for AVX-512).

A second table: a prompt's columns ``ncol`` at a time (``attention(..., ncol=)``, the runtime's prefill
blocks; each column attends to its own prefix), µs per column on each SIMD path, cache-resident.

A third table (``--cold-mb``, 0 to skip) is what a decode step sees: K and V stream from memory (the
weights between two layers evict them).  Each call gets the next of many head-major [length][head_dim]
K/V copies totalling ``--cold-mb`` MiB (4 KiB pages, as the runtime's KV cache), and the table
gives µs per call, GB/s of K+V read, and that as a fraction of the one-thread read bandwidth measured
just before; then the widest path again on copies in transparent huge pages (what the runtime's KV cache
used until a one-token chat made 2 MiB resident per layer and head), and the ratio.
"""

from __future__ import annotations

import argparse
import mmap
import time

import numpy as np

from elutq import _native
from elutq.kernels import available_paths
from elutq.roofline import peak_rss_mb, sustained_read_bandwidth

SHAPES = (("SmolLM2-135M", 64, 3), ("LLaMA-2-7B", 128, 1), ("Qwen2.5-7B", 128, 7))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="100,1000,4000")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--cold-mb", type=int, default=1024, help="MiB of rotating K/V copies (0: skip)")
    args = ap.parse_args()
    paths = [p for p in ("scalar", "avx2", "avx512", "neon") if p in available_paths()]
    rng = np.random.default_rng(0)
    print(f"paths: {', '.join(paths)}; µs per call (best of 7 rounds × {args.repeats})\n")
    print("| shape | head_dim × heads/KV head | positions | " + " | ".join(paths) + " | vs scalar |"
          + (" avx512 vs avx2 |" if {"avx2", "avx512"} <= set(paths) else ""))
    print("|---" * (4 + len(paths) + ({"avx2", "avx512"} <= set(paths))) + "|")
    for name, d, grp in SHAPES:
        for length in (int(x) for x in args.lengths.split(",")):
            q = rng.normal(size=(grp, d)).astype(np.float32)
            # 4 KV heads per cache row, fp16 bits as the KV cache holds them
            k = rng.normal(size=(length, 4 * d)).astype(np.float16).view(np.uint16)
            v = rng.normal(size=(length, 4 * d)).astype(np.float16).view(np.uint16)
            out = np.empty_like(q)
            best = {p: float("inf") for p in paths}
            for _ in range(7):
                for p in paths:
                    t0 = time.perf_counter()
                    for _ in range(args.repeats):
                        _native.attention(q, k, v, d, d**-0.5, out, path=p)
                    best[p] = min(best[p], (time.perf_counter() - t0) / args.repeats * 1e6)
            fastest = min(best.values())
            row = f"| {name} | {d} × {grp} | {length} | " + " | ".join(f"{best[p]:.1f}" for p in paths)
            row += f" | {best['scalar'] / fastest:.2f}× |"
            if {"avx2", "avx512"} <= set(paths):
                row += f" {best['avx2'] / best['avx512']:.2f}× |"
            print(row, flush=True)
    for p in paths[1:] or paths:  # the SIMD paths (scalar loops over the columns)
        columns(p, [int(x) for x in args.lengths.split(",")], args.repeats, rng)
    if args.cold_mb:
        cold(paths, [int(x) for x in args.lengths.split(",")], args.cold_mb, rng)
    print(f"\npeak RSS: {peak_rss_mb():.0f} MiB (without the bandwidth probes' buffer)")


def columns(path: str, lengths: list[int], repeats: int, rng: np.random.Generator) -> None:
    ncols = (1, 2, 4, 8, 16)
    print(f"\nprompt columns ncol at a time ({path}): µs per column (best of 7 rounds × {repeats} calls)\n")
    print("| shape | positions | " + " | ".join(f"ncol {n}" for n in ncols) + " | 8 vs 1 |")
    print("|---" * (3 + len(ncols)) + "|")
    for name, d, grp in SHAPES:
        for length in lengths:
            k = rng.normal(size=(length, d)).astype(np.float16).view(np.uint16)
            v = rng.normal(size=(length, d)).astype(np.float16).view(np.uint16)
            per = {}
            for n in ncols:
                q = rng.normal(size=(n * grp, d)).astype(np.float32)
                out = np.empty_like(q)
                best = float("inf")
                for _ in range(7):
                    t0 = time.perf_counter()
                    for _ in range(repeats):
                        _native.attention(q, k, v, 0, d**-0.5, out, path=path, ncol=n)
                    best = min(best, (time.perf_counter() - t0) / repeats)
                per[n] = best / n * 1e6
            print(f"| {name} ({d} × {grp}) | {length} | " + " | ".join(f"{per[n]:.1f}" for n in ncols)
                  + f" | {per[1] / per[8]:.2f}× |", flush=True)


def _kv_fp16(n: int, huge: bool) -> np.ndarray:
    """n fp16 bit patterns in an anonymous mapping advised for (or against) transparent huge pages."""
    buf = mmap.mmap(-1, 2 * n)
    advice = getattr(mmap, "MADV_HUGEPAGE" if huge else "MADV_NOHUGEPAGE", None)
    if hasattr(buf, "madvise") and advice is not None:
        buf.madvise(advice)
    return np.frombuffer(buf, dtype=np.uint16, count=n)


def _cold_call_s(p: str, q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray, d: int) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(k.shape[0]):
            _native.attention(q, k[i], v[i], 0, d**-0.5, out, path=p)
        best = min(best, (time.perf_counter() - t0) / k.shape[0])
    return best


def cold(paths: list[str], lengths: list[int], cold_mb: int, rng: np.random.Generator) -> None:
    print(f"\nK/V from memory: µs per call over K/V copies totalling {cold_mb} MiB (best of 3 passes), GB/s of "
          "K+V read, fraction of the 1-thread read bandwidth measured just before; in 4 KiB pages, as the "
          f"runtime's KV cache, and the {paths[-1]} path again in 2 MiB (transparent huge) pages\n")
    print("| shape | positions | read BW | " + " | ".join(f"{p} µs (GB/s, frac)" for p in paths)
          + f" | {paths[-1]} huge pages µs | 4 KiB / huge |")
    print("|---" * (5 + len(paths)) + "|")
    for name, d, grp in SHAPES:
        for length in lengths:
            per = length * d  # fp16 values per K (or V) copy
            copies = max(1, (cold_mb << 20) // (4 * per))
            q = rng.normal(size=(grp, d)).astype(np.float32)
            out = np.empty_like(q)
            kv = {}
            for huge in (False, True):
                k = _kv_fp16(copies * per, huge).reshape(copies, length, d)
                v = _kv_fp16(copies * per, huge).reshape(copies, length, d)
                k[:] = rng.normal(size=(length, d)).astype(np.float16).view(np.uint16)  # every copy the same rows
                v[:] = k[:, ::-1]
                kv[huge] = (k, v)
            bw = sustained_read_bandwidth(1)
            cells = []
            for p in paths:
                t = _cold_call_s(p, q, *kv[False], out, d)
                gbs = 4 * per / t / 1e9
                cells.append(f"{t * 1e6:.1f} ({gbs:.1f}, {gbs / bw:.0%})")
            small, huge_t = t, _cold_call_s(paths[-1], q, *kv[True], out, d)
            print(f"| {name} ({d} × {grp}) | {length} | {bw:.1f} GB/s | " + " | ".join(cells)
                  + f" | {huge_t * 1e6:.1f} | {small / huge_t:.2f}× |", flush=True)
            del kv


if __name__ == "__main__":
    main()
