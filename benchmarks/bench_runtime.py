"""elutq's native runtime against llama.cpp (issue 5), both measured in this run.

Speed, for (a) the default model (SmolLM2-135M-Instruct): elutq HLQ w2g128 and w4g128 checkpoints
against llama.cpp GGUF Q2_K, Q4_0 and TQ2_0 converted and quantized from the same HF directory; and
(b) a LLaMA-2-7B shape with random weights: elutq's ``bench.synthetic_model`` against a random F16
GGUF of the same shape quantized by llama.cpp to the same three types.  For each: prefill
(``--prompt`` tokens) and decode tokens/s at 1 and 2 threads, weight bytes streamed per decode step,
the fraction of the read bandwidth measured in this run, peak RSS; then elutq/llama.cpp ratios and
the issue's goals.  Every engine runs in its own subprocess, so peak RSS is per engine.

Quality (``--quality``): WikiText-2 test perplexity of each variant of the default model over the
first ``--max-tokens`` tokens (HF tokenizer ids for both engines), ours through our runtime, llama.cpp's
through its own logits, with bits per weight read from the files.

    bash scripts/setup_peer.sh                                    # once: builds llama.cpp (~20 min)
    .venv/bin/python benchmarks/bench_runtime.py --prepare-only   # checkpoints, GGUFs (no timing)
    .venv/bin/python benchmarks/bench_runtime.py --quality        # everything
    .venv/bin/python benchmarks/bench_runtime.py --skip-7b        # the default model only

Artifacts (checkpoints, GGUFs) go to ``--work`` (default /tmp/elutq-bench) and are reused; the 7B
F16 GGUF (13.5 GB) is deleted once quantized.  On a shared machine compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from elutq.roofline import paired_rounds, peak_rss_mb

PEER_TYPES = ("Q2_K", "Q4_0", "TQ2_0")
FTYPES = {"Q2_K": 10, "Q4_0": 2, "TQ2_0": 37}  # llama_ftype: LLAMA_FTYPE_MOSTLY_*
PAIRS = (("hlq w2g128", "Q2_K"), ("hlq w2g128", "TQ2_0"), ("hlq w4g128", "Q4_0"))
LLAMA7B = dict(n_layers=32, hidden=4096, inter=11008, n_heads=32, n_kv_heads=32, vocab=32000)


# ----------------------------------------------------------------------------- workers (subprocesses)


def _random_prompt(vocab: int, n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, size=n).tolist()  # as elutq.bench.measure draws it


def w_elutq_speed(a: dict) -> dict:
    from elutq import bench, kernels

    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    if a["model"].startswith("synthetic:"):
        model = bench.synthetic_model(bits=int(a["model"].split(":")[1]), n_layers=a["n_layers"],
                                      max_ctx=a["prompt"] + a["gen"] + 1)
    else:
        import elutq

        model = elutq.load(a["model"], max_ctx=a["prompt"] + a["gen"] + 1)
    load_s = time.perf_counter() - t0
    from elutq.runtime import Session

    session = Session(model, max_ctx=a["prompt"] + a["gen"] + 1)  # reused, as llama.cpp's context is

    def one_round(t: int) -> tuple[float, float]:
        sp = bench.measure(model, t, a["prompt"], a["gen"], 1, session=session)
        return sp.prefill_tokens_per_s, sp.decode_tokens_per_s

    rows = [paired_rounds(one_round, t, a["repeats"]) for t in a["threads"]]
    kv_bytes_per_pos = session.cache.nbytes // session.cache.max_ctx  # K and V rows of every layer
    return dict(rows=rows, weight_bytes=int(model.runtime.weight_bytes), kv_bytes_per_pos=kv_bytes_per_pos,
                rss_mb=peak_rss_mb(), rss_import_mb=rss0,
                load_s=load_s, kernel=kernels.active_path())


def _llama(path: str, n_ctx: int, n_batch: int, threads: int, logits_all: bool = False):
    from llama_cpp import Llama

    return Llama(model_path=path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=min(n_batch, 512), n_threads=threads,
                 n_threads_batch=threads, logits_all=logits_all, verbose=False)


def w_llama_speed(a: dict) -> dict:
    import llama_cpp

    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    llm = _llama(a["model"], a["prompt"] + a["gen"] + 1, max(a["prompt"], 32), a["threads"][0])
    load_s = time.perf_counter() - t0
    vocab = llm.n_vocab()
    prompt = _random_prompt(vocab, a["prompt"])

    def last_logits() -> np.ndarray:  # what our loop argmaxes too
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))

    def one_round(t: int) -> tuple[float, float]:
        llama_cpp.llama_set_n_threads(llm.ctx, t, t)
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        tok = int(np.argmax(last_logits()))
        for _ in range(a["gen"]):
            llm.eval([tok])
            tok = int(np.argmax(last_logits()))
        t2 = time.perf_counter()
        return a["prompt"] / (t1 - t0), a["gen"] / (t2 - t1)

    rows = [paired_rounds(one_round, t, a["repeats"]) for t in a["threads"]]
    return dict(rows=rows, rss_mb=peak_rss_mb(), rss_import_mb=rss0, load_s=load_s,
                system_info=llama_cpp.llama_print_system_info().decode())


class _LlamaCppLM:
    """llama.cpp behind the interface ``elutq.eval.perplexity`` takes: ``config`` and ``token_logprobs(ids)``."""

    def __init__(self, path: str, seqlen: int, threads: int):
        from types import SimpleNamespace

        self.llm = _llama(path, seqlen, seqlen, threads, logits_all=True)
        self.config = SimpleNamespace(max_position_embeddings=seqlen)

    def logits(self, ids):
        import torch

        ids = [int(i) for i in ids]
        self.llm.reset()
        self.llm.eval(ids)
        return torch.from_numpy(np.array(self.llm.scores[: len(ids)]))

    def token_logprobs(self, ids):
        """``log p(ids[t+1] | ids[:t+1])``, as ``elutq.eval.window_logprobs`` asks of a non-torch engine."""
        import torch

        ids = torch.as_tensor(ids, dtype=torch.long)
        logp = torch.log_softmax(self.logits(ids)[:-1].float(), dim=-1)
        return logp.gather(1, ids[1:, None])[:, 0]


def w_perplexity(a: dict) -> dict:
    import torch

    from elutq.eval import perplexity

    ids = torch.from_numpy(np.load(a["ids"]).astype(np.int64))
    if a["engine"] == "elutq":
        import elutq
        from elutq import kernels

        kernels.set_num_threads(a["threads"])
        model = elutq.load(a["model"], max_ctx=a["seqlen"])
    else:
        model = _LlamaCppLM(a["model"], a["seqlen"], a["threads"])
    r = perplexity(model, ids, seqlen=a["seqlen"], max_tokens=a["max_tokens"], progress=False)
    return dict(ppl=r.ppl, tokens_scored=r.tokens_scored, tokens_total=r.tokens_total, windows=r.windows,
                seqlen=r.seqlen, seconds=r.seconds)


def w_quantize_gguf(a: dict) -> dict:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = a["ftype"]
    p.nthread = a["threads"]
    rc = llama_cpp.llama_model_quantize(a["src"].encode(), a["dst"].encode(), p)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    return {}


def w_random_gguf(a: dict) -> dict:
    """A llama-shaped F16 GGUF with random weights (|w| in [2^-7, 2^-5), random sign and mantissa) and a
    placeholder SentencePiece-style vocabulary (the benchmark feeds token ids, never text)."""
    import gguf

    s = a["shape"]
    H, F, L, V = s["hidden"], s["inter"], s["n_layers"], s["vocab"]
    kv = H // s["n_heads"] * s["n_kv_heads"]
    w = gguf.GGUFWriter(a["path"], "llama")
    w.add_context_length(4096)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_rope_dimension_count(H // s["n_heads"])
    w.add_head_count(s["n_heads"])
    w.add_head_count_kv(s["n_kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(1)  # MOSTLY_F16
    w.add_vocab_size(V)
    w.add_tokenizer_model("llama")
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256  # UNKNOWN, CONTROL, CONTROL, BYTE...
    toks += [f"\u2581t{i}" for i in range(V - len(toks))]
    types += [1] * (V - len(types))
    w.add_token_list(toks)
    w.add_token_types(types)
    w.add_token_scores([-float(i) for i in range(V)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    tensors: list[tuple[str, tuple[int, ...], type]] = [("token_embd.weight", (V, H), np.float16)]
    for i in range(L):
        b = f"blk.{i}."
        tensors += [(b + "attn_norm.weight", (H,), np.float32), (b + "attn_q.weight", (H, H), np.float16),
                    (b + "attn_k.weight", (kv, H), np.float16), (b + "attn_v.weight", (kv, H), np.float16),
                    (b + "attn_output.weight", (H, H), np.float16), (b + "ffn_norm.weight", (H,), np.float32),
                    (b + "ffn_gate.weight", (F, H), np.float16), (b + "ffn_up.weight", (F, H), np.float16),
                    (b + "ffn_down.weight", (H, F), np.float16)]
    tensors += [("output_norm.weight", (H,), np.float32), ("output.weight", (V, H), np.float16)]
    for name, shape, dt in tensors:
        w.add_tensor_info(name, shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _name, shape, dt in tensors:
        if dt is np.float32:
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
            bits &= 0x87FF  # sign, lowest exponent bit, mantissa
            bits |= 0x2000  # exponent 8 or 9: |w| in [2^-7, 2^-5)
            w.write_tensor_data(bits.view(np.float16))
    w.close()
    return {}


WORKERS = {"elutq_speed": w_elutq_speed, "llama_speed": w_llama_speed, "perplexity": w_perplexity,
           "quantize_gguf": w_quantize_gguf, "random_gguf": w_random_gguf}


def run_worker(kind: str, **a) -> dict:
    """Run one worker in a fresh interpreter; its last stdout line is its JSON result."""
    cmd = [sys.executable, __file__, "_worker", kind, json.dumps(a)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-5000:])
        raise SystemExit(f"worker {kind} failed (exit {p.returncode}): {' '.join(cmd[:4])} {cmd[4][:300]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- artifacts


def make_checkpoint(out: Path, bits: int, method: str, iters: int | None) -> Path:
    if not (out / "config.json").is_file():
        print(f"  quantizing the default model: HLQ w{bits}g128 {method} -> {out}", flush=True)
        elutq_cli = Path(sys.executable).with_name("elutq")
        extra = ["--iters", str(iters)] if iters is not None else []
        subprocess.run([str(elutq_cli), "quantize", "default", "-o", str(out), "--method", method, "--bits", str(bits),
                        "--group-size", "128", "--overwrite", "--rotate", "none", *extra],
                       check=True, stdout=subprocess.DEVNULL)
    return out


def peer_dir() -> Path:
    base = Path(os.environ.get("PEER_DIR", Path(os.environ.get("ELUTQ_CACHE", Path.home() / ".cache/elutq")) / "peer"))
    found = sorted(base.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if not found:
        raise SystemExit(f"llama.cpp's converter is not under {base}: run `bash scripts/setup_peer.sh`")
    return found[-1].parent


def make_default_ggufs(work: Path, threads: int) -> dict[str, Path]:
    from elutq.models import resolve_source_dir

    src = work / "smollm2-f32.gguf"
    if not src.is_file():
        print("  converting the default model to GGUF (F32) with llama.cpp's convert_hf_to_gguf.py", flush=True)
        tmp = src.with_suffix(".tmp")
        subprocess.run([sys.executable, str(peer_dir() / "convert_hf_to_gguf.py"), str(resolve_source_dir("default")),
                        "--outtype", "f32", "--outfile", str(tmp)], check=True, capture_output=True)
        tmp.rename(src)
    out = {"F32": src}
    for t in PEER_TYPES:
        out[t] = quantize_gguf(src, work / f"smollm2-{t}.gguf", t, threads)
    return out


def quantize_gguf(src: Path, dst: Path, t: str, threads: int) -> Path:
    if not dst.is_file():
        print(f"  llama_model_quantize {src.name} -> {t}", flush=True)
        t0 = time.perf_counter()
        tmp = dst.with_suffix(".tmp")
        run_worker("quantize_gguf", src=str(src), dst=str(tmp), ftype=FTYPES[t], threads=threads)
        tmp.rename(dst)
        print(f"    {time.perf_counter() - t0:.0f}s", flush=True)
    return dst


def make_7b_ggufs(work: Path, n_layers: int, threads: int) -> dict[str, Path]:
    tag = f"llama7b-shape-L{n_layers}"
    out = {t: work / f"{tag}-{t}.gguf" for t in PEER_TYPES}
    if all(p.is_file() for p in out.values()):
        return out
    f16 = work / f"{tag}-F16.gguf"
    if not f16.is_file():
        print(f"  writing a random F16 GGUF of the LLaMA-2-7B shape ({n_layers} layers) -> {f16}", flush=True)
        t0 = time.perf_counter()
        tmp = f16.with_suffix(".tmp")
        run_worker("random_gguf", path=str(tmp), shape=dict(LLAMA7B, n_layers=n_layers))
        tmp.rename(f16)
        print(f"    {time.perf_counter() - t0:.0f}s", flush=True)
    for t in PEER_TYPES:
        quantize_gguf(f16, out[t], t, threads)
    f16.unlink()
    return out


def gguf_summary(path: Path) -> dict:
    """Tensor types and bits per weight, read from the file itself."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    types: dict[str, int] = {}
    lin_bits = lin_n = mm_bytes = 0
    has_output = any(t.name == "output.weight" for t in r.tensors)
    for t in r.tensors:
        if len(t.shape) < 2:
            continue
        name = t.tensor_type.name
        types[name] = types.get(name, 0) + 1
        if t.name.startswith("blk."):
            lin_bits += 8 * int(t.n_bytes)
            lin_n += int(t.n_elements)
        # matrices multiplied each step: the layers and the output (token_embd when the output is tied)
        if t.name.startswith("blk.") or t.name == "output.weight" or (t.name == "token_embd.weight" and not has_output):
            mm_bytes += int(t.n_bytes)
    by = {t.name: t.tensor_type.name for t in r.tensors}
    emb_out = f"token_embd {by.get('token_embd.weight')}, output {by.get('output.weight', '(tied)')}"
    return dict(types=types, bpw_linears=lin_bits / max(lin_n, 1), weight_bytes=mm_bytes, emb_out=emb_out)


def checkpoint_bpw(path: Path) -> float:
    """Bits per weight of the decoder linears (packed planes + scales + zeros), from the checkpoint."""
    from safetensors import safe_open

    from elutq.checkpoint import read_quantization_config, weight_files

    mods = {m for m in read_quantization_config(path)["modules"] if m.startswith("model.layers.")}
    bits = n = 0
    for f in weight_files(path):
        with safe_open(str(f), framework="np") as h:
            for k in h.keys():  # noqa: SIM118
                mod, _, kind = k.rpartition(".")
                if mod not in mods:
                    continue
                sl = h.get_slice(k)
                shape = sl.get_shape()
                size = int(np.prod(shape))
                bits += size * (8 if sl.get_dtype() == "U8" else 16)
                if kind == "qweight":
                    n += shape[1] * shape[2] * 8
    return bits / n


# ----------------------------------------------------------------------------- report


def roofline(row: dict, weight_bytes: int) -> tuple[float, float]:
    """Median probe (GB/s) and median over rounds of that round's weight GB/s / its own probe."""
    bw = float(np.median([r["bw"] for r in row["rounds"]]))
    frac = float(np.median([r["decode"] * weight_bytes / 1e9 / r["bw"] for r in row["rounds"]]))
    return bw, frac


def fmt_rows(name: str, res: dict, bpw: float | None, extra: str = "") -> list[str]:
    lines = []
    for r in res["rows"]:
        gbs = r["decode"] * res["weight_bytes"] / 1e9
        bw, frac = roofline(r, res["weight_bytes"])
        lines.append(
            f"| {name} | {bpw:.3f} | {r['threads']} | {r['prefill']:.1f} | {r['decode']:.2f} | "
            f"{res['weight_bytes'] / 1e6:.1f} | {gbs:.2f} | {bw:.1f} | {frac:.0%} | {res['rss_mb']:.0f} | {extra} |"
        )
    return lines


HEADER = ("| engine / weights | BPW (decoder linears) | threads | prefill tok/s | decode tok/s | MB/token | GB/s | "
          "read BW GB/s | of BW | peak RSS MiB | tensor types (2-D) |\n|---|---|---|---|---|---|---|---|---|---|---|")


def speed_section(title: str, ours: dict[str, dict], peers: dict[str, dict],
                  bpw: dict[str, float], summaries: dict[str, dict], prompt: int, gen: int, repeats: int) -> dict:
    print(f"\n### {title}\n")
    print(f"prefill of {prompt} random tokens, then {gen} greedy decode steps; best of {repeats} rounds, each "
          "between two read-bandwidth probes (sustained: 0.5 s each of a plain and a prefetching read loop, "
          "same threads); GB/s: the best round's; read BW: median over rounds of the probes' mean; of BW: median "
          "over rounds of the round's decode GB/s / its probes' mean; peak RSS without the probes' buffer\n")
    print(HEADER)
    for name, res in ours.items():
        for line in fmt_rows(f"elutq {name}", res, bpw[name], f"HLQ ({res['kernel']} kernels)"):
            print(line)
    for name, res in peers.items():
        s = summaries[name]
        types = ", ".join(f"{k}×{v}" for k, v in sorted(s["types"].items(), key=lambda kv: -kv[1]))
        for line in fmt_rows(f"llama.cpp {name}", res, s["bpw_linears"], f"{types}; {s['emb_out']}"):
            print(line)
    for name, res in ours.items():
        kv = res["kv_bytes_per_pos"] * (prompt + gen / 2)
        print(f"\nelutq {name}: its fp16 KV cache adds {kv / 1e6:.0f} MB read per decode step at the mean position "
              f"({prompt + gen / 2:.0f}), {kv / res['weight_bytes']:.1%} of the weights (not in MB/token, GB/s, of BW)")
    print("\nRSS after imports, before loading: elutq "
          + ", ".join(f"{n} {r['rss_import_mb']:.0f}" for n, r in ours.items())
          + " MiB; llama.cpp " + ", ".join(f"{n} {r['rss_import_mb']:.0f}" for n, r in peers.items()) + " MiB")
    print("\nelutq / llama.cpp (higher is better for elutq):\n")
    print("| pair | threads | decode ratio | prefill ratio |\n|---|---|---|---|")
    for a, b in PAIRS:
        if a not in ours or b not in peers:
            continue
        for ra, rb in zip(ours[a]["rows"], peers[b]["rows"], strict=True):
            print(f"| {a} / {b} | {ra['threads']} | {ra['decode'] / rb['decode']:.2f} | "
                  f"{ra['prefill'] / rb['prefill']:.2f} |")
    return dict(ours=ours, peers=peers)


def goals(sec: dict) -> None:
    ours, peers = sec["ours"], sec["peers"]
    w2 = ours.get("hlq w2g128")
    if not w2 or "Q2_K" not in peers:
        return
    print("\nIssue 5 goals on this shape:\n")
    for i, r in enumerate(w2["rows"]):
        t = r["threads"]
        q2 = peers["Q2_K"]["rows"][i]["decode"]
        frac = roofline(r, w2["weight_bytes"])[1]
        best_pf_name = max(peers, key=lambda n: peers[n]["rows"][i]["prefill"])
        best_pf = peers[best_pf_name]["rows"][i]["prefill"]
        print(f"- {t} thread(s): decode w2g128 / Q2_K = {r['decode'] / q2:.2f} (goal >= 1.5: "
              f"{'met' if r['decode'] >= 1.5 * q2 else 'NOT met'}); roofline {frac:.0%} (goal >= 80%: "
              f"{'met' if frac >= 0.8 else 'NOT met'}); prefill {r['prefill']:.1f} vs llama.cpp's fastest "
              f"({best_pf_name}) {best_pf:.1f} tok/s (goal >= 1: {'met' if r['prefill'] >= best_pf else 'NOT met'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/elutq-bench"), help="checkpoints and GGUFs (reused)")
    ap.add_argument("--w2", type=Path, help="HLQ w2g128 checkpoint of the default model (default: make one, RTN)")
    ap.add_argument("--w4", type=Path, help="HLQ w4g128 checkpoint of the default model (default: make one, RTN)")
    ap.add_argument("--method", default="rtn", choices=["rtn", "gptq"], help="for checkpoints made here")
    ap.add_argument("--iters", type=int, help="HLQ ALS iterations for checkpoints made here (default: elutq's)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeats-7b", type=int, default=3)
    ap.add_argument("--layers-7b", type=int, default=32, help="decoder layers of the 7B shape (32 = LLaMA-2-7B)")
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--skip-small", action="store_true", help="skip the default model's speed section")
    ap.add_argument("--quality", action="store_true", help="also WikiText-2 perplexity of the default model's variants")
    ap.add_argument("--max-tokens", type=int, default=16384, help="perplexity over this many test tokens")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--prepare-only", action="store_true",
                    help="make the checkpoints and GGUFs, then stop (so the timed part can run on a quiet machine)")
    args = ap.parse_args()

    try:
        import llama_cpp
    except ImportError:
        raise SystemExit(
            "llama_cpp is not installed: run `bash scripts/setup_peer.sh` (builds llama.cpp, ~20 min)"
        ) from None
    from elutq import kernels

    args.work.mkdir(parents=True, exist_ok=True)
    print(f"llama-cpp-python {llama_cpp.__version__}; elutq kernels: {kernels.active_path()}; "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at start", flush=True)
    print("preparing artifacts...", flush=True)
    tag = args.method + (f"-iters{args.iters}" if args.iters is not None else "")
    w2 = args.w2 or make_checkpoint(args.work / f"smollm2-hlq-w2g128-{tag}", 2, args.method, args.iters)
    w4 = args.w4 or make_checkpoint(args.work / f"smollm2-hlq-w4g128-{tag}", 4, args.method, args.iters)
    ours_ckpt = {"hlq w2g128": w2, "hlq w4g128": w4}
    ggufs = make_default_ggufs(args.work, max(args.threads))
    ggufs_7b = {} if args.skip_7b else make_7b_ggufs(args.work, args.layers_7b, max(args.threads))
    sums = {t: gguf_summary(p) for t, p in ggufs.items()}
    for n, p in ours_ckpt.items():
        qc = json.loads((p / "config.json").read_text())["quantization_config"]
        print(f"  elutq {n}: {p} (method {qc.get('method')}, ALS iters {qc.get('iters')})")
    bpw = {n: checkpoint_bpw(p) for n, p in ours_ckpt.items()}
    common = dict(threads=args.threads, prompt=args.prompt, gen=args.gen)
    if args.prepare_only:
        print("artifacts ready in", args.work)
        return

    if not args.skip_small:
        ours = {n: run_worker("elutq_speed", model=str(p), repeats=args.repeats, **common)
                for n, p in ours_ckpt.items()}
        peers = {}
        for t in PEER_TYPES:
            peers[t] = run_worker("llama_speed", model=str(ggufs[t]), repeats=args.repeats, **common)
            peers[t]["weight_bytes"] = sums[t]["weight_bytes"]
        speed_section(f"Speed: default model (SmolLM2-135M-Instruct), elutq checkpoints {args.method.upper()}",
                      ours, peers, bpw, sums, args.prompt, args.gen, args.repeats)
        print(f"\nllama.cpp build: {peers['Q2_K']['system_info']}")

    if not args.skip_7b:
        sums7 = {t: gguf_summary(p) for t, p in ggufs_7b.items()}
        ours, peers = {}, {}
        for bits in (2, 4):
            ours[f"hlq w{bits}g128"] = run_worker("elutq_speed", model=f"synthetic:{bits}", n_layers=args.layers_7b,
                                                  repeats=args.repeats_7b, **common)
        for t in PEER_TYPES:
            peers[t] = run_worker("llama_speed", model=str(ggufs_7b[t]), repeats=args.repeats_7b, **common)
            peers[t]["weight_bytes"] = sums7[t]["weight_bytes"]
        bpw7 = {f"hlq w{b}g128": b + 16 * (b + 1) / 128 for b in (2, 4)}
        shape = "LLaMA-2-7B" if args.layers_7b == 32 else f"LLaMA-2-7B matrices, {args.layers_7b} of its 32 layers"
        sec = speed_section(f"Speed: {shape} shape, random weights (elutq lm_head HLQ 4-bit g128)",
                            ours, peers, bpw7, sums7, args.prompt, args.gen, args.repeats_7b)
        goals(sec)

    if args.quality:
        from transformers import AutoTokenizer

        from elutq.eval import load_text, tokenize
        from elutq.models import resolve_source_dir

        tok = AutoTokenizer.from_pretrained(resolve_source_dir("default"))
        text, source = load_text(dataset="wikitext2", split="test")
        ids_file = args.work / "wikitext2-test-ids.npy"
        np.save(ids_file, tokenize(tok, text).numpy().astype(np.int32))
        print(f"\n### Quality: WikiText-2 test perplexity, default model ({source})\n")
        variants = [("elutq", "fp16 (unquantized)", str(resolve_source_dir("default")), None)]
        variants += [("elutq", n, str(p), bpw[n]) for n, p in ours_ckpt.items()]
        variants += [("llama.cpp", t, str(ggufs[t]), sums[t]["bpw_linears"]) for t in ("F32", *PEER_TYPES)]
        print("| engine | weights | BPW (decoder linears) | ppl | tokens scored | tensor types (2-D) |")
        print("|---|---|---|---|---|---|")
        for engine, name, path, b in variants:
            r = run_worker("perplexity", engine="elutq" if engine == "elutq" else "llama", model=path,
                           ids=str(ids_file), seqlen=args.seqlen, max_tokens=args.max_tokens, threads=max(args.threads))
            types = ""
            if engine == "llama.cpp":
                s = sums[name]
                types = ", ".join(f"{k}×{v}" for k, v in sorted(s["types"].items(), key=lambda kv: -kv[1]))
                types += f"; {s['emb_out']}"
            bstr = f"{b:.3f}" if b else "16"
            print(f"| {engine} | {name} | {bstr} | {r['ppl']:.2f} | {r['tokens_scored']} "
                  f"({r['windows']} windows of {r['seqlen']}) | {types} |", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        result = WORKERS[sys.argv[2]](json.loads(sys.argv[3]))
        print(json.dumps(result))
    else:
        main()
