"""Numeric command-line options checked at parse time: argparse type functions whose errors name the
option (``argument --lm-head-bits: must be 0 (16-bit) or 1-4, got 5``), and the thread-count cap."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

MAX_SEED = 2**63 - 1


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def integer(lo: int | None = None, hi: int | None = None, what: str | None = None) -> Callable[[str], int]:
    """An int in ``lo..hi`` (either end open when None); ``what`` describes the range in the error."""
    if what is None:
        what = (f"between {lo} and {hi}" if hi is not None else f">= {lo}") if lo is not None else f"<= {hi}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {what}, got {text!r}") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {what}, got {v}")
        return v

    return parse


def number(
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    what: str | None = None,
) -> Callable[[str], float]:
    """A finite float in the interval from ``lo`` to ``hi`` (open ends with ``lo_open`` / ``hi_open``)."""
    if what is None:
        parts = []
        if lo is not None:
            parts.append(f"{'>' if lo_open else '>='} {lo}")
        if hi is not None:
            parts.append(f"{'<' if hi_open else '<='} {hi}")
        what = " and ".join(parts) or "finite"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {what}, got {text!r}") from None
        bad = not math.isfinite(v)
        bad |= lo is not None and (v <= lo if lo_open else v < lo)
        bad |= hi is not None and (v >= hi if hi_open else v > hi)
        if bad:
            raise argparse.ArgumentTypeError(f"must be a finite number {what}, got {text}")
        return v

    return parse


positive = integer(1)
non_negative = integer(0)
seed = integer(0, MAX_SEED, what=f"between 0 and {MAX_SEED}")
port = integer(1, 65535, what="a TCP port, 1-65535")
bits = integer(1, 4, what="1, 2, 3 or 4")
bits_or_off = integer(0, 4, what="0 (keep 16-bit) or 1-4")
context = integer(2, what=">= 2 tokens")
fraction = number(0, 1, lo_open=True, hi_open=True)
probability = number(0, 1, lo_open=True)
positive_number = number(0, lo_open=True)
non_negative_number = number(0)


def group_size(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v not in (32, 64, 128, -1):
        raise argparse.ArgumentTypeError(f"must be 32, 64, 128 or -1 (one group per row), got {text!r}")
    return v


def group_sizes(text: str) -> list[int]:
    """A comma-separated list of group sizes (``-1,64,128``), each as ``group_size`` checks it, none twice."""
    values = [group_size(t.strip()) for t in text.split(",")]
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"names a group size twice: {text!r}")
    return values


def check_threads(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--threads`` above the cores available is refused (it oversubscribes the cores: every step
    waits on descheduled threads) unless ``--force-threads`` is passed."""
    threads = getattr(args, "threads", None)
    if threads is None or getattr(args, "force_threads", False):
        return
    cores = available_cores()
    worst = max(threads) if isinstance(threads, list) else threads
    if worst > cores:
        parser.error(
            f"argument --threads: {worst} is more than the {cores} cores available to this process; "
            "pass at most that, or add --force-threads to use more anyway"
        )


def calib_dataset(text: str) -> str:
    """A calibration dataset name, or a mix of parts joined by ``+`` (``calibration.mix_parts``)."""
    from .calibration import CHAT, SELF, mix_parts
    from .eval import dataset_names
    from .utils import ElutqError

    if "+" not in text and text not in (SELF, CHAT):
        if text not in dataset_names():
            raise argparse.ArgumentTypeError(
                f"unknown dataset {text!r}; choose one of {dataset_names()}, a mix of parts joined by '+' "
                f"(e.g. wikitext2+python-code+{SELF}), or pass --calib-text FILE"
            )
        return text
    try:
        mix_parts(text)
    except ElutqError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text
