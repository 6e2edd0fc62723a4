"""Load test of `elutq serve` on loopback: 1, 4 and 16 concurrent streaming clients.

    .venv/bin/python benchmarks/bench_server.py [--checkpoint DIR] [--requests 3] [--max-tokens 64]

Starts the server as a subprocess (default checkpoint: the default model, RTN HLQ w4g128, made once
under out/), then for each concurrency level runs that many clients, each sending ``--requests``
chat requests one after another (a bounded count), each ``--max-tokens`` long (``ignore_eos``).
Prints aggregate decode tokens/s, time to first token (p50/p99), per-token latency (p50/p99),
failures, the server's peak RSS, and the aggregate speed-up over a single client, measured in the
same run (``--speculative both``: a server with speculative decoding off and one with it on, taking
turns level by level so that the machine's slow spells fall on both, and the ratio per level); from the
server's /health counters: batched steps, tokens sampled per step, prompt tokens actually computed
(shared prefixes are not), and the share of wall time spent in the model's forward.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "List some facts about the moon.",
    "Describe a busy market in the morning.",
]


def default_checkpoint() -> Path:
    out = ROOT / "out" / "bench-smollm2-hlq-w4g128"
    if not (out / "config.json").is_file():
        cmd = [sys.executable, "-m", "elutq", "quantize", "default", "-o", str(out), "--method", "rtn", "--bits", "4"]
        subprocess.run(cmd, check=True)
    return out


async def one_client(client: httpx.AsyncClient, url: str, n: int, max_tokens: int, idx: int, stats: dict) -> None:
    for r in range(n):
        body = {
            "model": "bench",
            "messages": [{"role": "user", "content": QUESTIONS[(idx + r) % len(QUESTIONS)]}],
            "max_tokens": max_tokens,
            "temperature": 0.7,
            "seed": idx * 1000 + r,
            "ignore_eos": True,  # every reply max_tokens long: the same work whatever is sampled
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        t0 = time.perf_counter()
        stamps: list[float] = []
        tokens = 0
        try:
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
                if resp.status_code != 200:
                    stats["failed"] += 1
                    continue
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        stats["failed"] += 1
                        break
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        stamps.append(time.perf_counter())
        except httpx.HTTPError:
            stats["failed"] += 1
            continue
        if stamps:
            stats["ttft"].append(stamps[0] - t0)
            stats["itl"].extend(np.diff(stamps).tolist())
        stats["tokens"] += tokens
        stats["ok"] += 1


async def level(url: str, clients: int, n: int, max_tokens: int) -> dict:
    stats = {"ttft": [], "itl": [], "tokens": 0, "ok": 0, "failed": 0}
    # One connection per client, opened before the clock starts (building a client costs ~20 ms of
    # the load generator's CPU, which is not the server's time).
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(client.get(url + "/health") for _ in range(clients)))
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(client, url, n, max_tokens, i, stats) for i in range(clients)))
        stats["seconds"] = time.perf_counter() - t0
    return stats


def server_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def server(ckpt: Path, args: argparse.Namespace, speculative: bool) -> Iterator[tuple[subprocess.Popen, str]]:
    """A server subprocess on a free loopback port, up and healthy: ``(process, url)``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "elutq", "serve", str(ckpt), "--port", str(port), "--model-name", "bench",
           "--max-batch", str(max(args.clients)), "--ctx", "1024"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if not speculative:
        cmd += ["--no-speculative"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def measure(servers: dict[bool, tuple[subprocess.Popen, str]], ckpt: Path, args: argparse.Namespace
            ) -> dict[bool, dict[int, float]]:
    """Run the levels ``args.rounds`` times against each server — the servers take turns level by level, so a
    slow spell of the machine falls on both alike — printing each; returns each server's median tok/s per level."""
    print(f"\ncheckpoint: {ckpt}, {args.requests} requests per client, max_tokens {args.max_tokens}, loopback")
    print(f"{'spec':>4} {'clients':>7} {'ok':>4} {'fail':>4} {'tokens':>7} {'agg tok/s':>10} {'TTFT p50':>9} "
          f"{'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'vs 1 client':>11} {'steps':>6} {'rows/step':>9} "
          f"{'prompt tok':>10} {'in forward':>10}")
    agg = {m: {c: [] for c in args.clients} for m in servers}
    base: dict[bool, float] = {}
    fails = 0
    for rnd in range(args.rounds):
        for c in args.clients:
            turns = list(servers.items())
            for m, (_proc, url) in turns[::-1] if rnd % 2 else turns:  # neither always goes first
                h0 = httpx.get(url + "/health").json()
                st = asyncio.run(level(url, c, args.requests, args.max_tokens))
                h1 = httpx.get(url + "/health").json()
                steps = h1["steps"] - h0["steps"]
                rows = (h1["sampled_tokens"] - h0["sampled_tokens"]) / max(steps, 1)
                fwd = (h1["forward_seconds"] - h0["forward_seconds"]) / st["seconds"]
                prompt = h1["prompt_tokens_computed"] - h0["prompt_tokens_computed"]
                tps = st["tokens"] / st["seconds"]
                agg[m][c].append(tps)
                fails += st["failed"]
                if c == args.clients[0]:
                    base[m] = tps
                q = lambda xs, p: 1000 * float(np.percentile(xs, p)) if xs else float("nan")  # noqa: E731
                print(f"{'on' if m else 'off':>4} {c:>7} {st['ok']:>4} {st['failed']:>4} {st['tokens']:>7} "
                      f"{tps:>10.1f} {q(st['ttft'], 50):>7.0f}ms {q(st['ttft'], 99):>7.0f}ms "
                      f"{q(st['itl'], 50):>6.1f}ms {q(st['itl'], 99):>6.1f}ms {tps / base[m]:>10.2f}x {steps:>6} "
                      f"{rows:>9.1f} {prompt:>10} {fwd:>9.0%}", flush=True)
    med = {m: {c: float(np.median(v)) for c, v in per.items()} for m, per in agg.items()}
    c0 = args.clients[0]
    for m, (proc, _url) in servers.items():
        print(f"speculative {'on' if m else 'off'}: median of {args.rounds} rounds: " + ", ".join(
            f"{c} clients {med[m][c]:.1f} tok/s ({med[m][c] / med[m][c0]:.2f}x)" for c in args.clients)
            + f"; server peak RSS {server_rss_mb(proc.pid):.0f} MiB")
    print(f"{fails} requests failed")
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3,
                    help="run the levels this many times against each server; the summary takes each level's median")
    ap.add_argument("--speculative", choices=["on", "off", "both"], default="on",
                    help="the server's speculative decoding; both: one server each, taking turns, then the ratio "
                         "per level")
    args = ap.parse_args()
    ckpt = args.checkpoint or default_checkpoint()
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.speculative]
    with contextlib.ExitStack() as stack:
        servers = {m: stack.enter_context(server(ckpt, args, m)) for m in modes}
        med = measure(servers, ckpt, args)
    if len(med) == 2:
        print("\nspeculative on against off (median aggregate tok/s): " + ", ".join(
            f"{c} clients {med[True][c]:.1f} / {med[False][c]:.1f} = {med[True][c] / med[False][c]:.2f}x"
            for c in args.clients))


if __name__ == "__main__":
    main()
