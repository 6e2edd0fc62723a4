"""Benchmarks for the LUT kernels (issue 4), each figure printed beside a baseline from the same run.

(a) roofline: read bandwidth with 1 and 2 threads, best of a plain and a prefetching read loop (buffer far
    larger than the caches);
(b) GEMV at LLaMA shapes, 2/3/4 bits g128: GB/s of packed weights+scales streamed, as a fraction of
    the read bandwidth measured just before (and of the best roofline of the run); the weights
    rotate over copies totalling --cold-mb so every call streams from memory;
(c) GEMV / GEMM (N = 1, 8, 32, 128; ``--ns``) against torch fp32 matmul with pre-dequantized weights and
    against dequantize-then-matmul (elutq.hlq.dequantize each call).

    .venv/bin/python benchmarks/bench_kernels.py            # everything (~5 min on 2 cores)
    .venv/bin/python benchmarks/bench_kernels.py --quick    # one shape, 2 bits (~1 min)

The machine may be shared: compare ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import math
import resource
import time
from collections.abc import Callable

import numpy as np
import torch

from elutq import _native
from elutq import kernels as K
from elutq.hlq import dequantize

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]  # (out, in)


def best_time(fn: Callable[[], object], reps: int, min_time: float = 0.0) -> float:
    """Best wall time of one call over ``reps`` repetitions (after one warm-up call)."""
    fn()
    best = math.inf
    t_end = time.perf_counter() + min_time
    r = 0
    while r < reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        r += 1
    return best


def random_packed(out: int, inf: int, bits: int, g: int, rng: np.random.Generator):
    qweight = rng.integers(0, 256, size=(bits, out, math.ceil(inf / 8)), dtype=np.uint8)
    s = (rng.uniform(0.5, 1.5, size=(out, math.ceil(inf / g), bits)) * 2.0 ** np.arange(bits) * 0.01).astype(np.float16)
    z = (-s.astype(np.float32).sum(-1) / 2).astype(np.float16)
    return qweight, s, z


def codes_of(qweight: np.ndarray, inf: int) -> np.ndarray:
    planes = np.unpackbits(qweight, axis=-1, bitorder="little")[..., :inf]  # [bits, out, in]
    codes = np.zeros(planes.shape[1:], dtype=np.uint8)
    for i in range(planes.shape[0]):
        codes |= planes[i] << i
    return codes


def read_bw(threads: int, mb: int, reps: int = 3) -> float:
    return float(_native.read_bandwidth(mb << 20, reps, threads))


def section_roofline(threads: list[int], mb: int) -> dict[int, float]:
    print(f"\n(a) read bandwidth (sum over {mb} MiB, best of 3 plain and 3 prefetching passes)")
    bw = {}
    for t in threads:
        bw[t] = read_bw(t, mb)
        print(f"    {t} thread{'s' if t > 1 else ' '}: {bw[t]:6.1f} GB/s")
    return bw


def make_copies(out: int, inf: int, bits: int, cold_mb: int, rng: np.random.Generator) -> list[K.LUTLinear]:
    """Independent random matrices totalling >= cold_mb, so a pass over them streams from memory."""
    first = K.LUTLinear.from_packed(*random_packed(out, inf, bits, 128, rng), inf, 128)
    ncopy = max(2, math.ceil((cold_mb << 20) / first.nbytes))
    rest = [K.LUTLinear.from_packed(*random_packed(out, inf, bits, 128, rng), inf, 128) for _ in range(ncopy - 1)]
    return [first, *rest]


def gemv_time(copies: list[K.LUTLinear], x: np.ndarray | torch.Tensor, reps: int) -> float:
    """Seconds per GEMV, rotating over the copies."""

    def run_all() -> None:
        for c in copies:
            c(x)

    return best_time(run_all, reps) / len(copies)


def gemv_rows(out, inf, bits, threads, cold_mb, bw_mb, reps, roof: dict[int, float], rng) -> None:
    copies = make_copies(out, inf, bits, cold_mb, rng)
    x = rng.normal(size=inf).astype(np.float32)
    for t in threads:
        K.set_num_threads(t)
        now = read_bw(t, bw_mb, reps=2)
        dt = gemv_time(copies, x, reps)
        gbs = copies[0].nbytes / dt / 1e9
        roof[t] = max(roof[t], now)
        print(
            f"    {out:>6}x{inf:<6} {bits:>4} {t:>3} {dt * 1e3:7.3f}ms {gbs:6.1f} {now:6.1f}"
            f" {gbs / now:6.0%} {gbs / roof[t]:13.0%}"
        )


def section_gemv(shapes, bits_list, threads, cold_mb, bw_mb, reps, roof: dict[int, float]) -> None:
    print(f"\n(b) GEMV, g128, weights rotating over >= {cold_mb} MiB of copies (bytes = packed weights + scales)")
    print("    'bw now': read bandwidth measured just before the row; frac = GB/s / bw now")
    print(
        f"    {'out x in':>13} {'bits':>4} {'thr':>3} {'time':>9} {'GB/s':>6} {'bw now':>6} {'frac':>6}"
        f" {'frac(best bw)':>13}"
    )
    rng = np.random.default_rng(0)
    for out, inf in shapes:
        for bits in bits_list:
            gemv_rows(out, inf, bits, threads, cold_mb, bw_mb, reps, roof, rng)


def torch_rows(out, inf, bits, ns, cold_mb, reps, rng) -> None:
    qweight, s, z = random_packed(out, inf, bits, 128, rng)
    lin = K.LUTLinear.from_packed(qweight, s, z, inf, 128)
    codes = torch.from_numpy(codes_of(qweight, inf))
    st, zt = torch.from_numpy(s), torch.from_numpy(z)
    w = dequantize(codes, st, zt, 128).contiguous()
    # GEMV (N = 1): both sides rotate over weight copies totalling >= cold_mb, so both stream from
    # memory as a real model's weights do (this machine's last-level cache is large).
    copies = [lin, *make_copies(out, inf, bits, cold_mb, rng)]
    wcopies = [w] + [w + 0.0 for _ in range(max(1, math.ceil((cold_mb << 20) / (w.numel() * 4))) - 1)]
    for n in ns:
        x = torch.randn(n, inf)
        if n == 1:
            t_lut = gemv_time(copies, x[0], reps)
            t_fp = best_time(lambda x=x: [torch.nn.functional.linear(x[0], wc) for wc in wcopies], reps) / len(wcopies)
        else:
            t_lut = best_time(lambda x=x: lin(x), reps)
            t_fp = best_time(lambda x=x: torch.nn.functional.linear(x, w), reps)
        t_dq = best_time(lambda x=x: torch.nn.functional.linear(x, dequantize(codes, st, zt, 128)), max(1, reps // 3))
        print(
            f"    {out:>6}x{inf:<6} {bits:>4} {n:>4} {t_lut * 1e3:7.3f}ms {t_fp * 1e3:8.3f}ms"
            f" {t_fp / t_lut:6.1f}x {t_dq * 1e3:8.1f}ms {t_dq / t_lut:6.0f}x"
        )


def section_torch(shapes, bits_list, ns, threads: int, cold_mb: int, reps: int) -> None:
    print(f"\n(c) vs torch fp32 ({threads} threads; ratio > 1: LUT faster; N = 1 streams weights from memory)")
    print(
        f"    {'out x in':>13} {'bits':>4} {'N':>4} {'LUT':>9} {'torch fp32':>10} {'ratio':>6}"
        f" {'deq+matmul':>10} {'ratio':>7}"
    )
    torch.set_num_threads(threads)
    K.set_num_threads(threads)
    rng = np.random.default_rng(1)
    for out, inf in shapes:
        for bits in bits_list:
            torch_rows(out, inf, bits, ns, cold_mb, reps, rng)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4096x4096 only, 2 bits, fewer repetitions")
    ap.add_argument("--threads", default="1,2", help="thread counts for (a) and (b)")
    ap.add_argument("--bits", default=None, help="bit widths for (b), default 2,3,4 (quick: 2)")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,11008x4096 (out x in)")
    ap.add_argument("--cold-mb", type=int, default=None, help="MiB of rotating weight copies (default 1024)")
    ap.add_argument("--skip", default="", help="sections to skip, e.g. 'c' or 'b,c'")
    ap.add_argument("--ns", default="1,8,32,128", help="(c): tokens per call, e.g. 2048 for a prefill window")
    args = ap.parse_args()

    threads = [int(t) for t in args.threads.split(",")]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    else:
        shapes = SHAPES[:1] if args.quick else SHAPES
    bits_list = [int(b) for b in args.bits.split(",")] if args.bits else ([2] if args.quick else [2, 3, 4])
    cold_mb = args.cold_mb or (512 if args.quick else 1024)
    bw_mb = 1024
    reps = 3 if args.quick else 5
    skip = set(args.skip.split(","))

    print(f"elutq LUT kernels: path={K.active_path()} (available {K.available_paths()}), torch {torch.__version__}")
    roof = section_roofline(threads, bw_mb) if "a" not in skip else {t: read_bw(t, bw_mb) for t in threads}
    if "b" not in skip:
        section_gemv(shapes, bits_list, threads, cold_mb, bw_mb, reps, roof)
    if "c" not in skip:
        ns = [int(n) for n in args.ns.split(",")]
        tshapes = shapes if args.shapes else shapes[:1] if args.quick else shapes[:2]
        tbits = bits_list if args.bits else [2] if args.quick else [2, 4]
        section_torch(tshapes, tbits, ns, max(threads), cold_mb, reps)
    print(f"\nbest read bandwidth seen: {', '.join(f'{t} thr {b:.1f} GB/s' for t, b in roof.items())}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
