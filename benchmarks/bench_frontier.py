"""The accuracy–size–speed frontier of one model: elutq's settings against llama.cpp's low-bit types (issue 28).

For ``--model`` (``default``: SmolLM2-135M-Instruct; ``qwen-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct after
``elutq fetch qwen-coder-1.5b``), every point is

- elutq: ``elutq quantize`` RTN and GPTQ, HLQ and uniform, at w2g64, w2g128, w3g128, w4g128, the embeddings and
  lm_head quantized too (``--lm-head-bits``/``--embed-bits``: 4-bit g128 for 3- and 4-bit points, 2-bit g64
  for 2-bit ones, see ``head_for``; a tied model stores the two as one tensor); and GPTQ-HLQ mixed precision
  (``--target-bpw``) at 2.25 ... 3.5 bits per weight of the whole file;
- llama.cpp (the peer build of ``scripts/setup_peer.sh``): ``llama-imatrix`` over the calibration text, then
  ``llama-quantize --allow-requantize --imatrix`` of the model's own GGUF to IQ2_XXS ... Q4_K_M;

and for each: bits per weight of the whole file and of the decoder linears alone (read from the files; the
denominator of the whole-file figure is the source model's parameter count, tied embeddings once),
perplexity on WikiText-2 ``test`` and on ``python-code/test.txt`` (both engines score the same token ids —
the source model's HF tokenizer — in the same non-overlapping windows), prefill and decode tokens/s at 1
and 2 threads (each engine in its own process, the same random prompt; ``bench_runtime.py``'s workers),
and the engine's peak RSS.  The baseline row is the source model unquantized in elutq's runtime (fp16): for
the default model its Q4_1 GGUF dequantized, for qwen-coder-1.5b its Q4_K_M GGUF dequantized.

Calibration (GPTQ's activations and llama.cpp's importance matrix alike) comes from one text made of the
``valid`` splits only: WikiText-2 valid and python-code valid, interleaved in blocks, cut to
``--calib-samples × --calib-seqlen`` tokens (``calib.txt`` in ``--work``); GPTQ draws its samples from it,
llama-imatrix reads all of it in chunks of ``--calib-seqlen``.

Results go to ``--json`` after every step (resumable: a rerun skips what is there; one with other token
counts is refused rather than mixing them), then a markdown table (this model's section of ``--md``,
docs/FRONTIER.md) and two plots (``--png``: perplexity vs bits per weight with each engine's Pareto front;
decode tokens/s vs perplexity).

    bash scripts/setup_peer.sh      # once: llama.cpp, llama-imatrix, llama-quantize, matplotlib
    .venv/bin/python benchmarks/bench_frontier.py --model default
    .venv/bin/python benchmarks/bench_frontier.py --model qwen-coder-1.5b --methods rtn --max-tokens 4096
    .venv/bin/python benchmarks/bench_frontier.py --model default --report-only   # table + plots from the JSON
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from _common import ROOT, elutq_cmd, fmt_int, parse_setting, run_measured

sys.path.insert(0, str(Path(__file__).parent))
import bench_runtime as br  # noqa: E402  (its workers: speed, perplexity; file summaries)

SETTINGS = ("w2g64", "w2g128", "w3g128", "w4g128")  # each may end in a ROTATIONS suffix: rotated
ROTATIONS = {"+rot": "residual", "+full": "full"}  # setting suffix: --rotate
# After mixed-T (and any rotation suffix): the measurement's --measure-weighting and --mixed-group-sizes.
PROXIES = {"+g128": ("loss", "128"), "+plain": ("none", "128")}
TARGETS = ("2.25", "2.5", "2.75", "3.0", "3.5")
FORMATS = ("hlq", "uniform")
METHODS = ("rtn", "gptq")
PEER_TYPES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K", "IQ3_XXS", "IQ3_S", "Q3_K_M", "IQ4_XS", "Q4_0", "Q4_K_M")
TEXTS = {"wikitext2": "wikitext-2", "python-code": "python-code"}
BASELINE = {"default": "Q4_1 GGUF dequantized, fp16", "qwen-coder-1.5b": "Q4_K_M GGUF dequantized, fp16"}


def head_for(bits: int) -> tuple[int, int]:
    """(bits, group) of the lm_head and embeddings at a decoder setting of ``bits``: 2-bit points keep them
    at 2 bits (g64), 3- and 4-bit points at 4 bits (g128) — a low-bit file's size is its whole size."""
    return (2, 64) if bits <= 2 else (4, 128)


# ----------------------------------------------------------------------------- inputs


def data_text(name: str, split: str) -> str:
    """A shipped text (``$ELUTQ_DATA`` first, then the package's copy), as ``elutq eval --dataset`` reads it."""
    from elutq.eval import load_text

    return load_text(dataset=name, split=split)[0]


def source_gguf(model: str) -> Path:
    from elutq import models

    if model == "default":
        return models._default_gguf()
    m = models.named_model(model)
    if m is None:
        raise SystemExit(f"--model must be 'default' or a named model ({', '.join(models.NAMED_MODELS)})")
    return models.named_gguf(m)


def calibration_text(tokenizer, out: Path, n_tokens: int) -> Path:
    """WikiText-2 valid and python-code valid interleaved in blocks of ~2,000 characters, cut to ``n_tokens``
    tokens (plus one block), so any contiguous run of chunks sees both domains."""
    if out.is_file():
        return out
    texts = [data_text(t, "valid") for t in TEXTS]
    blocks: list[str] = []
    pos = [0, 0]
    n = 0
    while n < n_tokens and any(p < len(t) for p, t in zip(pos, texts, strict=True)):
        for k, t in enumerate(texts):
            if pos[k] >= len(t):
                continue
            end = t.find("\n", pos[k] + 2000)
            end = len(t) if end < 0 else end + 1
            blocks.append(t[pos[k] : end])
            n += len(tokenizer(blocks[-1], add_special_tokens=False)["input_ids"])
            pos[k] = end
    if n < n_tokens:
        raise SystemExit(f"the valid splits hold only {n} tokens; lower --calib-samples or --calib-seqlen")
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(blocks), encoding="utf-8")
    tmp.rename(out)
    return out


def source_params(src_dir: Path) -> int:
    """Parameters of the source model: every tensor of its safetensors, a tied lm_head once."""
    from safetensors import safe_open

    n = 0
    for f in sorted(src_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="np") as h:
            for k in h.keys():  # noqa: SIM118
                n += int(np.prod(h.get_slice(k).get_shape()))
    return n


# ----------------------------------------------------------------------------- artifacts


def quantize_args(setting: str, fmt: str, work: Path) -> tuple[dict, list[str], str | None]:
    """The point's facts, ``elutq quantize``'s width options and its ``--rotate`` for ``setting``: ``wBgG`` (one
    width, head and embeddings as ``head_for`` says, or as ``+hBgG`` after it says) or ``mixed-T``
    (``--target-bpw T``, groups of 128: every width chosen by the allocator, head and embeddings included);
    ``+rot`` after either: ``--rotate residual`` (``+full``: ``--rotate full``); after ``mixed-T``, ``+g128``:
    groups of 128 only (``--mixed-group-sizes 128``), ``+plain``: that and the measurement unweighted
    (``--measure-weighting none``).  ValueError for a setting it cannot read."""
    proxy = next((k for k in PROXIES if setting.endswith(k)), "")
    setting = setting.removesuffix(proxy)
    suffix = next((k for k in ROTATIONS if setting.endswith(k)), "")
    setting, rot = setting.removesuffix(suffix), ROTATIONS.get(suffix)
    if setting.startswith("mixed-"):
        weighting, groups = PROXIES.get(proxy, ("loss", "-1,32,64,128"))
        name = f"measurement-{fmt}{'-' + rot if rot else ''}-{weighting}-g{groups}.json"
        float(setting.removeprefix("mixed-"))
        return {"head": "mixed"}, ["--target-bpw", setting.removeprefix("mixed-"), "--measurement", str(work / name),
                                   "--measure-weighting", weighting, f"--mixed-group-sizes={groups}"], rot
    if proxy:
        raise ValueError(f"{proxy} goes after a mixed-T setting only")
    setting, _, head = setting.partition("+h")  # wBgG+hBgG: the head and embeddings at that setting
    bits, group = parse_setting(setting)
    hb, hg = parse_setting(f"w{head}") if head else head_for(bits)
    widths = ["--bits", str(bits), "--group-size", str(group), "--lm-head-bits", str(hb),
              "--lm-head-group-size", str(hg), "--embed-bits", str(hb), "--embed-group-size", str(hg)]  # fmt: skip
    return {"head": f"w{hb}g{hg}"}, widths, rot


def make_elutq(work: Path, model: str, method: str, fmt: str, setting: str, calib: Path, args) -> tuple[Path, dict]:
    """The checkpoint of one point (``quantize_args`` reads ``setting``), made unless it is there."""
    out = work / f"elutq-{method}-{fmt}-{setting}"
    info, widths, rot = quantize_args(setting, fmt, work)
    if (out / "config.json").is_file():
        return out, info
    cmd = elutq_cmd(
        "quantize", model, "-o", str(out), "--overwrite", "--resume", "--method", method, "--format", fmt, *widths,
        "--calib-text", str(calib), "--calib-samples", str(args.calib_samples),
        "--calib-seqlen", str(args.calib_seqlen), "--rotate", rot or "none",
    )  # fmt: skip
    print(f"  {shlex.join(cmd[2:])}", flush=True)
    m = run_measured(cmd, log=work / f"{out.name}.log")
    if m.returncode != 0:
        raise RuntimeError(f"quantize failed:\n{m.output[-3000:]}")
    info.update(quant_seconds=m.seconds, quant_cpu_seconds=m.cpu_seconds, quant_rss_mb=m.peak_rss_mb)
    return out, info


def peer_tools() -> dict[str, Path]:
    base = br.peer_dir().parents[1].parent  # $PEER_DIR/llama_cpp_python-V/vendor/llama.cpp -> $PEER_DIR
    version = br.peer_dir().parents[1].name.removeprefix("llama_cpp_python-")
    bin_dir = base / f"tools-{version}" / "bin"  # scripts/setup_peer.sh's TOOLS_DIR
    tools = {t: bin_dir / f"llama-{t}" for t in ("imatrix", "quantize")}
    missing = [str(p) for p in tools.values() if not os.access(p, os.X_OK)]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not built: run `bash scripts/setup_peer.sh`")
    return tools


def make_imatrix(work: Path, src: Path, calib: Path, args) -> tuple[Path, dict]:
    out = work / "imatrix.gguf"
    if out.is_file():
        return out, {}
    tmp = work / "imatrix.tmp.gguf"
    cmd = [str(peer_tools()["imatrix"]), "-m", str(src), "-f", str(calib), "-o", str(tmp), "-c", str(args.calib_seqlen),
           "-b", str(args.calib_seqlen), "-t", str(max(args.threads)), "--no-ppl"]
    print(f"  {shlex.join(cmd)}", flush=True)
    m = run_measured(cmd, log=work / "imatrix.log")
    if m.returncode != 0 or not tmp.is_file():
        raise RuntimeError(f"llama-imatrix failed:\n{m.output[-3000:]}")
    tmp.rename(out)
    return out, {"imatrix_seconds": m.seconds}


def make_peer(work: Path, src: Path, imatrix: Path, qtype: str, args) -> tuple[Path, dict]:
    out = work / f"llama-{qtype}.gguf"
    if out.is_file():
        return out, {}
    tmp = work / f"llama-{qtype}.tmp.gguf"
    cmd = [str(peer_tools()["quantize"]), "--allow-requantize", "--imatrix", str(imatrix), str(src), str(tmp), qtype,
           str(max(args.threads))]
    print(f"  {shlex.join(cmd)}", flush=True)
    m = run_measured(cmd, log=work / f"llama-{qtype}.log")
    if m.returncode != 0 or not tmp.is_file():
        raise RuntimeError(f"llama-quantize {qtype} failed:\n{m.output[-3000:]}")
    tmp.rename(out)
    return out, {"quant_seconds": m.seconds, "quant_cpu_seconds": m.cpu_seconds, "quant_rss_mb": m.peak_rss_mb}


def elutq_sizes(path: Path, n_params: int) -> dict:
    nbytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return dict(file_bytes=nbytes, bpw_file=8 * nbytes / n_params, bpw_linears=br.checkpoint_bpw(path))


def peer_sizes(path: Path, n_params: int) -> dict:
    s = br.gguf_summary(path)
    nbytes = path.stat().st_size
    return dict(file_bytes=nbytes, bpw_file=8 * nbytes / n_params, bpw_linears=s["bpw_linears"],
                types=s["types"], emb_out=s["emb_out"])


# ----------------------------------------------------------------------------- the run


class Results:
    """The JSON of one model's points, rewritten (atomically) after every step."""

    def __init__(self, path: Path, config: dict):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"config": config, "points": {}}
        old = self.data["config"]
        clash = {k: (old.get(k), v) for k, v in config.items() if k in old and old[k] != v}
        if clash:
            raise SystemExit(
                f"{path} holds results measured with other settings ({clash}); pass another --json (nothing there is "
                "deleted: its results cannot be recomputed under these settings)"
            )
        self.data["config"] = {**config, **old}
        self.loaded = {k: json.dumps(v, sort_keys=True) for k, v in self.data["points"].items()}

    def point(self, key: str, **fields) -> dict:
        p = self.data["points"].setdefault(key, {})
        for k, v in fields.items():
            p.setdefault(k, v)
        return p

    def save(self) -> None:
        """Replace the JSON atomically, point by point: a point this run changed is written as it has it, any
        other as the file now holds it — so two runs adding different points to one JSON lose nothing (two runs
        changing the same point: the last one's version stays)."""
        lock = os.open(self.path.parent, os.O_RDONLY)  # the folder's own lock: no lock file left beside the JSON
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.is_file():
                on_disk = json.loads(self.path.read_text())
                for k, v in on_disk.items():  # e.g. another run's importance-matrix facts
                    self.data.setdefault(k, v)
                disk, mine = on_disk["points"], self.data["points"]
                for key in disk.keys() - mine.keys():
                    mine[key] = disk[key]
                for key in disk.keys() & mine.keys():
                    if json.dumps(mine[key], sort_keys=True) == self.loaded.get(key):
                        mine[key].clear()  # in place: a caller may hold this point's dict
                        mine[key].update(disk[key])
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            os.replace(tmp, self.path)
        finally:
            os.close(lock)  # releases the lock
        self.loaded = {k: json.dumps(v, sort_keys=True) for k, v in self.data["points"].items()}


def measure(res: Results, key: str, engine: str, path: Path, ids: dict[str, Path], args, speed: bool = True) -> None:
    p = res.data["points"][key]
    for text, ids_file in ids.items():
        if text not in p.setdefault("ppl", {}):
            t0 = time.perf_counter()
            r = br.run_worker("perplexity", engine="elutq" if engine == "elutq" else "llama", model=str(path),
                              ids=str(ids_file), seqlen=args.seqlen, max_tokens=args.max_tokens,
                              threads=max(args.threads))
            p["ppl"][text] = r
            res.save()
            print(f"    {key}: {text} ppl {r['ppl']:.3f} ({r['tokens_scored']} tokens, "
                  f"{time.perf_counter() - t0:.0f}s)", flush=True)
    if speed and not args.skip_speed:
        time_point(res, key, engine, path, args)


def time_point(res: Results, key: str, engine: str, path: Path, args) -> None:
    """Prefill and decode tokens/s of ``path`` at each thread count, into point ``key`` — unless it was timed on
    this CPU already.  A speed from another CPU is kept under ``speed_other`` (nothing measured is dropped)."""
    p = res.data["points"][key]
    if "speed" in p:
        if p.get("speed_cpu") == cpu_label() and key not in (args.time or ()):
            return
        p.setdefault("speed_other", []).append({k: p.pop(k) for k in ("speed", "rss_mb", "speed_cpu", "speed_file")
                                                if k in p})
    worker = "elutq_speed" if engine == "elutq" else "llama_speed"
    r = br.run_worker(worker, model=str(path), threads=list(args.threads), prompt=args.prompt, gen=args.gen,
                      repeats=args.repeats)
    p["speed"] = {str(row["threads"]): {"prefill": row["prefill"], "decode": row["decode"]} for row in r["rows"]}
    p["rss_mb"] = r["rss_mb"]
    p["speed_cpu"] = cpu_label()
    if path.name != f"elutq-{p.get('method')}-{p.get('format')}-{p.get('setting')}" and engine == "elutq" \
            and p.get("setting") != "fp16":
        p["speed_file"] = path.name
    res.save()
    print(f"    {key}: decode " + ", ".join(f"{t}t {v['decode']:.1f}" for t, v in p["speed"].items())
          + f" tok/s, peak RSS {r['rss_mb']:.0f} MiB" + (f" ({path.name})" if "speed_file" in p else ""), flush=True)


def speed_jobs(res: Results, work: Path, args) -> list[tuple[str, object]]:
    """--speed-only: every scored point of the --only engines not yet timed whose file is on disk.  --retime: every
    scored point not timed on this CPU; a llama.cpp or RTN file is remade if gone (cheap) and a GPTQ
    point whose checkpoint is gone is timed on the RTN checkpoint of the same format and setting (made if
    missing; the decode kernels read only the layout, which the two share: checked by size)."""
    jobs: list[tuple[str, object]] = []
    again = args.time or []
    for key, p in res.data["points"].items():
        if not all(t in p.get("ppl", {}) for t in TEXTS) or p.get("failed") or (again and key not in again):
            continue
        if "speed" in p and key not in again and (not args.retime or p.get("speed_cpu") == cpu_label()):
            continue
        if p["engine"] == "llama.cpp":
            made = args.retime or (work / f"llama-{p['format']}.gguf").is_file()
            job: tuple[str, object] = ("llama", p["format"])
        elif p["setting"] == "fp16":
            made, job = True, ("baseline", None)
        else:
            spec = (p["method"], p["format"], p["setting"])
            made = (work / f"elutq-{p['method']}-{p['format']}-{p['setting']}" / "config.json").is_file()
            job = ("elutq", spec)
            if not made and (args.retime or again) and p["method"] == "rtn":
                made = True  # RTN is cheap to remake (and deterministic)
            if not made and (args.retime or again) and p["method"] == "gptq" and not p["setting"].startswith("mixed-"):
                made, job = True, ("twin", (key, spec))
        if job[0].replace("twin", "elutq") not in args.only or (job[0] == "baseline" and not args.baseline_speed):
            continue
        if made:
            jobs.append(job)
        else:
            print(f"{key}: its file is not under {work} (rerun without --speed-only to make it): not timed", flush=True)
    return jobs


def run(args) -> Results:
    from transformers import AutoTokenizer

    from elutq.eval import tokenize
    from elutq.models import resolve_source_dir

    work = args.work / args.model
    work.mkdir(parents=True, exist_ok=True)
    src_dir = resolve_source_dir(args.model)
    tok = AutoTokenizer.from_pretrained(src_dir)
    config = dict(model=args.model, max_tokens=args.max_tokens, seqlen=args.seqlen, calib_samples=args.calib_samples,
                  calib_seqlen=args.calib_seqlen, prompt=args.prompt, gen=args.gen, threads=list(args.threads))
    res = Results(args.json, config)
    res.data.setdefault("baseline", BASELINE.get(args.model, "source model, fp16"))
    res.data.setdefault("n_params", source_params(src_dir))
    n_params = res.data["n_params"]
    ids = {}
    for text in TEXTS:
        f = work / f"{text}-test-ids.npy"
        if not f.is_file():
            np.save(f, tokenize(tok, data_text(text, "test")).numpy().astype(np.int32))
        ids[text] = f
    calib = calibration_text(tok, work / "calib.txt", args.calib_samples * args.calib_seqlen)
    res.data.setdefault("calib_tokens", len(tokenize(tok, calib.read_text(encoding="utf-8"))))
    res.save()
    print(f"{args.model}: {n_params / 1e6:.1f}M parameters; results -> {args.json}", flush=True)

    jobs: list[tuple[str, object]] = []
    if "baseline" in args.only:
        jobs.append(("baseline", None))
    if "elutq" in args.only:
        jobs += [("elutq", (m, f, s)) for m in args.methods for s in args.settings for f in args.formats]
        jobs += [("elutq", ("gptq", "hlq", f"mixed-{t}")) for t in args.targets]
    if "llama" in args.only:
        jobs += [("llama", t) for t in args.peer_types]
    if args.speed_only or args.retime or args.time:
        jobs = speed_jobs(res, work, args)
        missing = set(args.time or ()) - set(res.data["points"])
        if missing:
            sys.exit(f"--time: no such point in {args.json}: {', '.join(sorted(missing))}")
    if args.order == "cheap-first":  # RTN before GPTQ, llama.cpp between them
        rank = {"baseline": 0, "llama": 2, "twin": 1}
        jobs.sort(key=lambda j: rank.get(j[0], 1 if j[0] == "elutq" and j[1][0] == "rtn" else 3))
    for kind, spec in jobs:
        try:
            if kind == "baseline":
                key = "elutq 16-bit (baseline)"
                p = res.point(key, engine="elutq", method="-", format="-", setting="fp16")
                p.update(elutq_sizes_fp(src_dir, n_params))
                measure(res, key, "elutq", src_dir, ids, args, speed=args.baseline_speed)
            elif kind == "twin":  # time a GPTQ point on the RTN file of its setting (same layout and bytes)
                key, (_, fmt, setting) = spec
                print(f"{key}: timed on the RTN file of {setting} (its own file is not under {work})", flush=True)
                path, _ = make_elutq(work, args.model, "rtn", fmt, setting, calib, args)
                size = elutq_sizes(path, n_params)["file_bytes"]
                if size != res.data["points"][key]["file_bytes"]:
                    raise RuntimeError(f"{path.name} holds {size} bytes, {key} {res.data['points'][key]['file_bytes']}:"
                                       " not the same layout, not timed")
                time_point(res, key, "elutq", path, args)
            elif kind == "elutq":
                method, fmt, setting = spec
                key = f"elutq {method} {fmt} {setting}"
                p = res.point(key, engine="elutq", method=method, format=fmt, setting=setting)
                if p.get("failed"):
                    continue
                print(f"{key}", flush=True)
                path, info = make_elutq(work, args.model, method, fmt, setting, calib, args)
                for k, v in info.items():
                    p.setdefault(k, v)
                p.update(elutq_sizes(path, n_params))
                res.save()
                measure(res, key, "elutq", path, ids, args)
            else:
                key = f"llama.cpp {spec}"
                p = res.point(key, engine="llama.cpp", method="imatrix", format=spec, setting=spec)
                if p.get("failed"):
                    continue
                print(f"{key}", flush=True)
                src = source_gguf(args.model)
                imatrix, info = make_imatrix(work, src, calib, args)
                res.data.update(info)
                path, info = make_peer(work, src, imatrix, spec, args)
                for k, v in info.items():
                    p.setdefault(k, v)
                p.update(peer_sizes(path, n_params))
                res.save()
                measure(res, key, "llama.cpp", path, ids, args)
        except (RuntimeError, SystemExit) as e:
            print(f"  failed: {str(e)[-2000:]}", flush=True)
            if isinstance(e, SystemExit):
                raise
            res.data["points"].setdefault(key, {})["failed"] = str(e)[-500:]
            res.save()
    return res


def elutq_sizes_fp(src_dir: Path, n_params: int) -> dict:
    """The baseline as the runtime holds it: fp16, whatever the source files store."""
    return dict(file_bytes=2 * n_params, bpw_file=16.0, bpw_linears=16.0)


# ----------------------------------------------------------------------------- report


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats on both size and perplexity, by size."""
    front, best = [], float("inf")
    for x, y, name in sorted(points):
        if y < best:
            front.append((x, y, name))
            best = y
    return front


def done_points(res: dict) -> list[tuple[str, dict]]:
    return [(k, p) for k, p in res["points"].items() if "bpw_file" in p and p.get("ppl")]


def cpu_label() -> str:
    """This machine's CPU as a speed figure needs it: model name, widest vector ISA, cores."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else platform.machine()
    return f"{name or platform.processor() or 'unknown CPU'}, {isa}, {os.cpu_count()} cores"


def markdown(res: dict) -> str:
    cfg = res["config"]
    lines = [
        f"### {cfg['model']}: {res['n_params'] / 1e6:.1f}M parameters; baseline: {res['baseline']}",
        "",
        f"Perplexity over the first {cfg['max_tokens']} tokens of each test text in windows of {cfg['seqlen']} "
        f"(the source model's tokenizer, the same ids for both engines); calibration {res.get('calib_tokens')} tokens "
        f"of WikiText-2 valid + python-code valid ({cfg['calib_samples']} × {cfg['calib_seqlen']} for GPTQ, all of it "
        f"for llama-imatrix); speed: prompt {cfg['prompt']} tokens, {cfg['gen']} generated, best of the rounds. "
        "BPW file: bytes of the weights files × 8 / parameters; BPW linears: the decoder layers' matrices only.",
        "",
        "| engine | point | head/emb | BPW file | BPW linears | MiB | ppl wikitext2 | ppl python-code "
        "| decode 1t | decode 2t | prefill 1t | prefill 2t | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = done_points(res)
    rows.sort(key=lambda kp: (kp[1]["engine"] != "elutq" or kp[1].get("setting") != "fp16", kp[1]["bpw_file"]))
    # Speeds compare only within one CPU: each CPU the points were timed on gets a mark (the most used none).
    cpus = Counter(p.get("speed_cpu", "not recorded") for _, p in rows if p.get("speed"))
    marks = {c: "" if i == 0 else "abcdefgh"[i - 1] for i, (c, _) in enumerate(cpus.most_common())}
    for key, p in rows:
        sp = p.get("speed", {})
        mark = marks.get(p.get("speed_cpu", "not recorded"), "") if sp else ""

        twin = "†" if p.get("speed_file") else ""

        def s(t: str, what: str, sp=sp, mark=mark, twin=twin) -> str:
            return f"{sp[t][what]:.1f}{twin}{f' ({mark})' if mark else ''}" if t in sp else "–"

        ppl = {t: fmt_int(p["ppl"][t]["ppl"]) if t in p["ppl"] else "–" for t in TEXTS}
        head = p.get("head") or p.get("emb_out", "")
        name = key.removeprefix("elutq ").removeprefix("llama.cpp ")
        rss = f"{p['rss_mb']:.0f}" if "rss_mb" in p else "–"
        lines.append(
            f"| {p['engine']} | {name} | {head} | {p['bpw_file']:.3f} | {p['bpw_linears']:.3f} | "
            f"{p['file_bytes'] / 2**20:.1f} | {ppl['wikitext2']} | {ppl['python-code']} | {s('1', 'decode')} | "
            f"{s('2', 'decode')} | {s('1', 'prefill')} | {s('2', 'prefill')} | {rss} |"
        )
    if len(cpus) > 1:
        lines += ["", "Timed on: " + "; ".join(f"{f'({m}) ' if m else 'unmarked: '}{c}" for c, m in marks.items())
                  + ". Compare speeds only between points with the same mark."]
    if any(p.get("speed_file") for _, p in rows):
        lines += ["", "†: timed on the RTN checkpoint of the same format and setting (`speed_file` in the JSON), the "
                  "point's own checkpoint being gone: the kernels read only the layout, which the two share (same "
                  "bytes, checked)."]
    lines += nearest_speed_table(rows)
    failed = [k for k, p in res["points"].items() if p.get("failed")]
    if failed:
        lines += ["", "Failed: " + "; ".join(f"{k} ({res['points'][k]['failed'][-200:]!r})" for k in failed)]
    lines += ["", "Pareto fronts (BPW file → ppl):", ""]
    for text in TEXTS:
        for engine in ("elutq", "llama.cpp"):
            pts = [(p["bpw_file"], p["ppl"][text]["ppl"], k) for k, p in rows
                   if p["engine"] == engine and text in p["ppl"] and p.get("setting") != "fp16"]
            front = ", ".join(f"{n.split(' ', 1)[1]} ({x:.2f}, {fmt_int(y)})" for x, y, n in pareto(pts))
            lines.append(f"- {text}, {engine}: {front or '–'}")
    return "\n".join(lines) + "\n"


def nearest_speed_table(rows: list[tuple[str, dict]]) -> list[str]:
    """The issue's speed goal per elutq point: its decode tokens/s over that of the llama.cpp point of nearest
    WikiText-2 perplexity (nearest in log ppl) timed on the same CPU, at each thread count."""
    timed = [(k, p) for k, p in rows if p.get("speed") and "wikitext2" in p["ppl"] and p.get("setting") != "fp16"]
    out = ["", "Decode against the llama.cpp point of nearest WikiText-2 perplexity timed on the same CPU "
           "(the issue's goal: at least 1.5×):", "",
           "| elutq point | ppl | nearest llama.cpp | its ppl | decode 1t | decode 2t |", "|---|---|---|---|---|---|"]
    n = 0
    for key, p in timed:
        if p["engine"] != "elutq":
            continue
        peers = [(k, q) for k, q in timed if q["engine"] == "llama.cpp" and q.get("speed_cpu") == p.get("speed_cpu")]
        if not peers:
            continue
        ppl = p["ppl"]["wikitext2"]["ppl"]
        pk, q = min(peers, key=lambda kq: abs(np.log(kq[1]["ppl"]["wikitext2"]["ppl"] / ppl)))
        ratio = {t: p["speed"][t]["decode"] / q["speed"][t]["decode"] for t in p["speed"] if t in q["speed"]}
        cells = [f"{ratio[t]:.2f}×" + ("" if ratio[t] >= 1.5 else " (short of 1.5×)") if t in ratio else "–"
                 for t in ("1", "2")]
        out.append(f"| {key.removeprefix('elutq ')} | {fmt_int(ppl)} | {pk.removeprefix('llama.cpp ')} | "
                   f"{fmt_int(q['ppl']['wikitext2']['ppl'])} | {cells[0]} | {cells[1]} |")
        n += 1
    return out if n else []


def write_section(md: Path, model: str, table: str) -> None:
    """Replace (or append) this model's section of ``md``, between markers; other models' sections stay."""
    start, end = f"<!-- frontier:{model} -->", f"<!-- /frontier:{model} -->"
    text = md.read_text() if md.is_file() else "# Accuracy–size–speed frontier (benchmarks/bench_frontier.py)\n\n"
    block = f"{start}\n{table}{end}\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) + 1 :]
    else:
        text += ("\n" if not text.endswith("\n\n") else "") + block
    tmp = md.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, md)


def plots(res: dict, png: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = done_points(res)
    model = res["config"]["model"]
    colors = {"elutq": "tab:blue", "llama.cpp": "tab:red"}
    fig, axes = plt.subplots(1, len(TEXTS), figsize=(13, 5))
    for ax, text in zip(axes, TEXTS, strict=True):
        for engine in ("elutq", "llama.cpp"):
            pts = [(p["bpw_file"], p["ppl"][text]["ppl"], k) for k, p in rows
                   if p["engine"] == engine and text in p["ppl"] and p.get("setting") != "fp16"]
            if not pts:
                continue
            ax.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], color=colors[engine], alpha=0.45, s=18)
            front = pareto(pts)
            ax.plot([x for x, _, _ in front], [y for _, y, _ in front], "-o", color=colors[engine], ms=5,
                    label=f"{engine} (Pareto front)")
            for x, y, n in front:
                ax.annotate(n.split(" ", 1)[1], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        base = [p["ppl"][text]["ppl"] for _, p in rows if p.get("setting") == "fp16" and text in p["ppl"]]
        if base:
            ax.axhline(base[0], color="gray", ls="--", lw=1, label=f"baseline ({res['baseline']})")
            # Where the choice is: up to 12x the baseline (RTN's 2-bit points, at 10^5-10^8, are in the table).
            ax.set_ylim(base[0] * 0.9, base[0] * 12)
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight, whole file")
        ax.set_ylabel(f"perplexity ({text} test)")
        ax.set_title(f"{model}: {text}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out1 = png.with_name(png.stem + "-ppl-bpw.png")
    fig.savefig(out1, dpi=130)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    for engine in ("elutq", "llama.cpp"):
        pts = [(p["ppl"]["wikitext2"]["ppl"], p["speed"]["2"]["decode"], k) for k, p in rows
               if p["engine"] == engine and "wikitext2" in p["ppl"] and "2" in p.get("speed", {})]
        if pts:
            ax.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], color=colors[engine], label=engine, s=22)
            for x, y, n in pts:
                ax.annotate(n.split(" ", 1)[1], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("perplexity (wikitext2 test)")
    ax.set_ylabel("decode tokens/s, 2 threads")
    ax.set_title(f"{model}: decode speed vs perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out2 = png.with_name(png.stem + "-speed-ppl.png")
    fig.savefig(out2, dpi=130)
    plt.close(fig)
    return [out1, out2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="default, or a named model (qwen-coder-1.5b)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/elutq-frontier"), help="checkpoints and GGUFs (reused)")
    ap.add_argument("--json", type=Path, help="results (default docs/frontier-MODEL.json)")
    ap.add_argument("--md", type=Path, help="markdown file whose MODEL section is rewritten (default docs/FRONTIER.md)")
    ap.add_argument("--png", type=Path, help="plots: PNG-ppl-bpw.png, PNG-speed-ppl.png (default docs/frontier-MODEL)")
    ap.add_argument("--only", nargs="+", default=["baseline", "elutq", "llama"], choices=["baseline", "elutq", "llama"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS),
                    help="wBgG; +hBgG after it: head and embeddings at that setting; +rot after those (also "
                         "after a --targets value): --rotate residual, +full: --rotate full")
    ap.add_argument("--targets", nargs="*", default=list(TARGETS),
                    help="mixed precision: GPTQ-HLQ at these whole-file bits per weight (--target-bpw); after one, "
                    "+g128: groups of 128 only, +plain: also the measurement unweighted")
    ap.add_argument("--peer-types", nargs="+", default=list(PEER_TYPES))
    ap.add_argument("--order", choices=["cheap-first", "as-listed"], default="cheap-first")
    ap.add_argument("--max-tokens", type=int, default=16384, help="perplexity over the first N tokens of each text")
    ap.add_argument("--seqlen", type=int, default=1024, help="perplexity window")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompt", type=int, default=64, help="speed: prompt tokens")
    ap.add_argument("--gen", type=int, default=32, help="speed: generated tokens")
    ap.add_argument("--repeats", type=int, default=2, help="speed: rounds (best of)")
    ap.add_argument("--skip-speed", action="store_true",
                    help="make and score points, leave their timing to a later run on a quiet machine")
    ap.add_argument("--speed-only", action="store_true",
                    help="time every point of the --only engines already scored but not timed, whatever "
                         "--settings/--targets say, where its file is still on disk; make nothing new")
    ap.add_argument("--retime", action="store_true",
                    help="time every scored point not yet timed on this CPU, so one CPU times them all (earlier "
                         "figures are kept under speed_other); remakes a missing llama.cpp file and times a GPTQ "
                         "point whose checkpoint is gone on the RTN checkpoint of its setting (same layout)")
    ap.add_argument("--time", nargs="+", metavar="POINT",
                    help="time these scored points now, one after another, even if timed on this CPU before (the "
                         "earlier figures are kept under speed_other), e.g. to compare them in one run; "
                         "names as in the JSON ('elutq gptq hlq mixed-3.0+full'); files as --retime finds them")
    ap.add_argument("--baseline-speed", action="store_true", help="also time the fp16 baseline")
    ap.add_argument("--report-only", action="store_true", help="only write the table and plots from --json")
    args = ap.parse_args()
    for setting in [*args.settings, *(f"mixed-{t}" for t in args.targets)]:
        try:
            quantize_args(setting, "hlq", Path("."))
        except ValueError as e:
            ap.error(f"cannot read the setting {setting!r} ({e}); see --settings and --targets in --help")
    stem = args.model.replace("/", "_")
    args.json = args.json or ROOT / "docs" / f"frontier-{stem}.json"
    args.md = args.md or ROOT / "docs" / "FRONTIER.md"
    args.png = args.png or ROOT / "docs" / f"frontier-{stem}.png"
    res = json.loads(args.json.read_text()) if args.report_only else run(args).data
    table = markdown(res)
    write_section(args.md, args.model, table)
    print(table)
    try:
        for p in plots(res, args.png):
            print(f"plot: {p}")
    except ImportError:
        print("matplotlib is not installed (bash scripts/setup_peer.sh installs it): no plots")


if __name__ == "__main__":
    main()
