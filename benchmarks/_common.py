"""Helpers shared by the benchmark scripts (imported as ``_common`` when a script runs from benchmarks/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_setting(s: str) -> tuple[int, int]:
    """``"w2g128"`` → ``(2, 128)``."""
    bits, group = s.removeprefix("w").split("g")
    return int(bits), int(group)


@dataclass
class Measured:
    """One child process: exit status, wall seconds, CPU seconds (user + system), peak RSS as the kernel
    accounted it, its output.  On a shared machine CPU seconds are the steadier figure."""

    returncode: int
    seconds: float
    cpu_seconds: float
    peak_rss_mb: float
    output: str


def run_measured(args: list[str], log: Path | None = None, env: dict[str, str] | None = None) -> Measured:
    """Run ``args`` as a child and measure it alone.

    ``os.wait4`` returns the rusage of exactly that child, so ``ru_maxrss`` is its own peak RSS
    (``RUSAGE_CHILDREN`` would be the maximum over every child this process ever waited for) — but
    at least the caller's own peak RSS when it was spawned, which exec carries over: callers keep
    their own memory small (bench_memory.py writes its models in a separate process).
    """
    out_path = log or Path(os.devnull)
    t0 = time.perf_counter()
    with open(out_path, "w") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = out_path.read_text() if log else ""
    return Measured(proc.returncode, seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, output)


def elutq_cmd(*args: str) -> list[str]:
    """``python -m elutq ARGS`` with this interpreter."""
    return [sys.executable, "-m", "elutq", *args]


def eval_ppl(
    model: str, max_tokens: int | None, log: Path | None = None, backend: str = "native", dataset: str = "wikitext2"
) -> dict:
    """Test-split perplexity of a checkpoint or model via ``elutq eval --json`` (a fresh process); the
    result also carries the child's wall seconds and peak RSS."""
    extra = ["--max-tokens", str(max_tokens)] if max_tokens else []
    with tempfile.TemporaryDirectory(prefix="elutq-bench-") as tmp:
        m = run_measured(
            elutq_cmd("eval", model, "--dataset", dataset, "--backend", backend, "--json", *extra),
            log=log or Path(tmp) / "log",
        )
    if m.returncode != 0:
        raise RuntimeError(f"elutq eval {model} failed:\n{m.output[-3000:]}")
    line = next(ln for ln in reversed(m.output.splitlines()) if ln.startswith("{"))
    return {**json.loads(line), "eval_seconds": m.seconds, "eval_peak_rss_mb": m.peak_rss_mb}


def fmt_int(x: float) -> str:
    """Perplexities span 19 to 10^6: thousands separators above 1000, two decimals below."""
    return f"{x:,.0f}" if x >= 1000 else f"{x:.2f}"


def default_w4_checkpoint() -> str:
    """RTN HLQ w4g128 of the default model in ``out/bench-eval-w4`` (quantized once: a few seconds), the checkpoint
    bench_eval.py and bench_lmeval.py use without ``--checkpoint``."""
    ckpt = str(ROOT / "out" / "bench-eval-w4")
    if not (Path(ckpt) / "config.json").exists():
        m = run_measured(elutq_cmd("quantize", "default", "-o", ckpt, "--method", "rtn", "--bits", "4"))
        if m.returncode != 0:
            raise SystemExit("quantizing the default model failed")
    return ckpt
