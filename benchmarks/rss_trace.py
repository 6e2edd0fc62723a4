"""Where a command's memory goes: run an `elutq` command in this process and log, at each new maximum of
the resident set (in steps of ``--step`` MiB), the RSS split (anonymous / file-backed) and the main thread's
Python stack.  How the end-to-end tuning's peak on the second model was located (docs/RESULTS.md, Bounded
memory).

    .venv/bin/python benchmarks/rss_trace.py [--step 100] [--log rss-trace.log] -- finetune CKPT --source M ...
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import traceback
from pathlib import Path

from elutq.cli import main as elutq_main


def rss_mib() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS", "RssAnon", "RssFile")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) // 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step", type=int, default=100, help="log when the RSS passes the last logged maximum + STEP MiB")
    ap.add_argument("--log", type=Path, default=Path("rss-trace.log"))
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the elutq command and its arguments, after --")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    main_id = threading.get_ident()
    log = args.log.open("w")

    def sample() -> None:
        best = 0
        while True:
            r = rss_mib()
            if r["VmRSS"] > best + args.step:
                best = r["VmRSS"]
                stack = "".join(traceback.format_stack(sys._current_frames()[main_id])[-8:])
                log.write(f"=== {time.strftime('%X')} {r}\n{stack}\n")
                log.flush()
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    try:
        elutq_main(command)
    finally:
        log.write(f"END {rss_mib()}\n")
        log.close()


if __name__ == "__main__":
    main()
