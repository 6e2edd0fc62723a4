"""The bandwidth roofline of the benchmarks: this machine's sustained read bandwidth, probed around each
timed round, and peak RSS with the probes' buffers left out.

Light on purpose (the native extension and the standard library only): ``benchmarks/bench_runtime.py``'s
llama.cpp worker imports it too, and its peak RSS must not carry elutq's torch import.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from . import _native, utils


def last_level_cache_bytes() -> int:
    """The largest CPU cache Linux reports (sysfs), 0 where it reports none."""
    best = 0
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            best = max(best, int(digits) * unit)
    return best


def probe_bytes() -> int:
    """Buffer size of the read-bandwidth probe: twice the last-level cache, at least 256 MiB and at most
    4 GiB, so the probe reads from memory as a decode step's weights do (a 256 MiB buffer on a host with a
    480 MiB L3 read 1-4 % faster than 1-4 GiB ones: docs/KERNELS.md)."""
    return min(max(1 << 28, 2 * last_level_cache_bytes()), 1 << 32)


_peak_before_probes = 0.0


def peak_rss_mb() -> float:
    """Peak RSS of this process without the bandwidth probes' buffers.  Linux's VmHWM, which unlike
    getrusage's ru_maxrss is not carried over from the parent across fork + exec (so a benchmark's
    worker reports its own) and which :func:`sustained_read_bandwidth` resets after each probe."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return max(int(line.split()[1]) / 1024, _peak_before_probes)
    except OSError:
        pass
    return utils.peak_rss_mb()


def sustained_read_bandwidth(threads: int) -> float:
    """This machine's read bandwidth (GB/s) at ``threads`` threads, sustained over a time like a decode's:
    the better of a plain and a prefetching read loop, each reading :func:`probe_bytes` over and over for
    0.5 s.  The probe's buffer is not the engine's memory: the peak RSS so far is kept aside and the
    kernel's high-water mark reset after the probe (``/proc/self/clear_refs``), so :func:`peak_rss_mb`
    reports the engine alone."""
    global _peak_before_probes
    _peak_before_probes = max(_peak_before_probes, peak_rss_mb())
    bw = _native.read_bandwidth(probe_bytes(), 1, threads, 0.5)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS (the probe's buffer is freed by now)
    except OSError:
        pass  # not Linux: peak_rss_mb falls back to ru_maxrss, which then includes the probe
    return bw


def paired_rounds(one_round: Callable[[int], tuple[float, float]], threads: int, repeats: int) -> dict:
    """``repeats`` rounds of ``one_round(threads) -> (prefill, decode) tokens/s``, each between two
    read-bandwidth probes at the same thread count (their mean is the round's roofline): a shared host's
    bandwidth drifts by tens of percent within minutes, so a decode rate is only compared with the probes
    taken around it.  Best prefill and decode rates over the rounds, and every round's figures."""
    rounds = []
    for _ in range(repeats):
        before = sustained_read_bandwidth(threads)
        prefill, decode = one_round(threads)
        bw = (before + sustained_read_bandwidth(threads)) / 2
        rounds.append(dict(bw=bw, prefill=prefill, decode=decode))
    return dict(threads=threads, prefill=max(r["prefill"] for r in rounds), decode=max(r["decode"] for r in rounds),
                rounds=rounds)
