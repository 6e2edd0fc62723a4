"""Mixed precision to a target size (``elutq quantize --target-bpw``): measure, allocate, then quantize.

``measure``: streamed through the layer loop like GPTQ.  For every decoder linear and ``lm_head``, and each
candidate bit width, the error RTN at that width adds to the layer's output on calibration text,
``tr(E·H·Eᵀ)`` with ``E = W − RTN_b(W)`` and ``H = XᵀX`` of the unquantized model's inputs: the quantity
GPTQ minimises, before its compensation.  The measurement is a JSON file (reused for any target; keyed by
the model and the settings that change it), its run resumable like a quantization.

``allocate``: one width (2-4 bits) per module minimising the summed error subject to the whole file's size
(``target × the source's parameters`` bits, 16-bit tensors included): a Lagrangian sweep (each module picks
``argmin cost + λ·bits``, λ bisected to the largest feasible size), then greedy upgrades into what is left.
The embeddings go with ``lm_head``'s width (one shared tensor for a tied model, an RTN copy otherwise).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import CalibConfig, calibration_ids
from .checkpoint import EMBED, SafetensorsDir, read_header
from .gptq import Hessian
from .hlq import QuantConfig, quantize_weight
from .layerloop import (
    Activations,
    LayerStep,
    Run,
    atomic_json,
    fingerprint,
    layer_prefix,
    materialize,
    run_layer,
    run_layers,
)
from .models import check_architecture, meta_model, position_embeddings, resolve_source_dir
from .modules import rotate_mlps
from .rotation import NORM_ROTATION, Rotation
from .utils import ElutqError

CANDIDATE_BITS = (1, 2, 3, 4)  # measured
ALLOCATED_BITS = (2, 3, 4)  # chosen from: 1-bit linears that the proxy deems cheap wreck the model (2.5 bpw on
# the default model with 1-bit allowed: WikiText-2 ppl 2,454, against 189 for 2-bit everywhere at 2.49)
HIDDEN = "hidden"
HEAD_ROWS = 8192  # lm_head rows quantized at a time


@dataclass(frozen=True)
class MeasureConfig:
    group_size: int = 128
    format: str = "hlq"
    iters: int = 20
    calib: CalibConfig = CalibConfig(n_samples=32)
    batch_size: int = 8
    rotation: Rotation | None = None  # measure the rotated model (rotation.py) that --rotate quantizes

    def settings(self) -> dict[str, Any]:
        d = asdict(self)
        if self.rotation is None:
            d.pop("rotation")  # measurements from before the option keep their fingerprint
        return d

    def quant(self, bits: int) -> QuantConfig:
        return QuantConfig(bits=bits, group_size=self.group_size, format=self.format, iters=self.iters)  # type: ignore[arg-type]


def _costs(w: torch.Tensor, h: torch.Tensor, cfg: MeasureConfig) -> dict[str, list[float]]:
    """``{bits: [tr(E H Eᵀ), storage bits]}`` for one weight ``[out, in]`` (rows in slices: a wide head)."""
    out: dict[str, list[float]] = {}
    h = h.float()
    for b in CANDIDATE_BITS:
        cost, bits = 0.0, 0
        for r in range(0, w.shape[0], HEAD_ROWS):
            qw = quantize_weight(w[r : r + HEAD_ROWS].float(), cfg.quant(b))
            e = w[r : r + HEAD_ROWS].float() - qw.dequantize()
            cost += float(((e @ h) * e).sum())
            bits += qw.storage_bits()
        out[str(b)] = [cost, bits]
    return out


def default_measurement_path(model: str, cfg: MeasureConfig) -> Path:
    """Where a measurement of ``model`` under ``cfg`` is kept: one per model and settings, reused by any target."""
    from . import __version__
    from .models import cache_dir

    src = resolve_source_dir(model)
    inputs = [SafetensorsDir(src).fingerprint(), cfg.settings(), CANDIDATE_BITS, __version__]
    key = hashlib.sha256(json.dumps(inputs, default=str).encode()).hexdigest()[:20]
    return cache_dir() / "measurements" / f"{key}.json"


@torch.no_grad()
def measure(model: str, path: Path, cfg: MeasureConfig, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """The per-module, per-width errors of ``model`` (see the module docstring), written to ``path``; an
    existing measurement of the same inputs is read instead."""
    from transformers import AutoConfig, AutoTokenizer

    from .pipeline import open_source

    src_dir = resolve_source_dir(model)
    config = AutoConfig.from_pretrained(src_dir)
    source = open_source(src_dir, config, cfg.rotation)
    fp = fingerprint({"model": source.fingerprint(), "settings": cfg.settings(), "candidates": CANDIDATE_BITS})
    path = Path(path)
    if path.is_file():
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ElutqError(f"{path} is not a readable measurement ({e}); delete it to measure again") from e
        if m.get("fingerprint") != fp:
            raise ElutqError(
                f"{path} measures another model or other settings (group size, format, calibration, candidates); "
                "pass another --measurement file, or delete this one"
            )
        return m
    t0 = time.perf_counter()
    check_architecture(config)
    tokenizer = AutoTokenizer.from_pretrained(src_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = {"layers_done": 0, "hidden": {}, "layers": []}
    work = path.with_name(path.name + ".partial")
    try:
        stale = json.loads((work / "progress.json").read_text()).get("fingerprint") != fp
    except (OSError, ValueError):
        stale = False
    # An unfinished measurement of other inputs has nothing worth keeping: start over (it is only a cache).
    run = Run.open(path, fp, fresh, resume and not stale, True, inputs="model or settings")
    skeleton = meta_model(config)
    rotate_mlps(skeleton, cfg.rotation)
    ids, source_text = calibration_ids(tokenizer, cfg.calib, model=src_dir)
    pos = position_embeddings(config, cfg.calib.seqlen, torch.device("cpu"), skeleton)
    if run.layers_done == 0:
        emb = source.get(f"{EMBED}.weight").float()
        acts = {HIDDEN: Activations([emb[ids[i : i + cfg.batch_size]] for i in range(0, ids.shape[0], cfg.batch_size)])}
        del emb
    else:
        acts = run.activations()

    def step(i: int, layer: nn.Module, acts: dict[str, Activations]) -> LayerStep:
        layer = materialize(layer, source, layer_prefix(i))
        linears = [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        hess = {n: Hessian(m.in_features) for n, m in linears}
        hooks = [m.register_forward_pre_hook(lambda _m, a, h=hess[n]: h.add(a[0])) for n, m in linears]
        try:
            new = acts[HIDDEN].map(lambda x: run_layer(layer, x, pos), None)  # the unquantized model's stream
        finally:
            for h in hooks:
                h.remove()
        entry = {layer_prefix(i) + n: {"params": m.weight.numel(), "bits": _costs(m.weight, hess[n].h, cfg)}
                 for n, m in linears}  # fmt: skip
        return LayerStep({}, {HIDDEN: new}, entry, {})

    acts = run_layers(run, skeleton.model.layers, step, acts, progress)
    modules: dict[str, Any] = {}
    for entry in run.entries:
        modules.update(entry)
    norm = type(skeleton.model.norm)(config.hidden_size, eps=config.rms_norm_eps)
    norm.weight.data = source.get("model.norm.weight").float()
    h = Hessian(config.hidden_size)
    rot = source.get(NORM_ROTATION).float() if NORM_ROTATION in source else None  # stored 16-bit: extra_bits
    for x in acts[HIDDEN]:
        h.add(norm(x) if rot is None else norm(x) @ rot)
    # Tied as the quantizer decides it (pipeline.shares_embedding): then one tensor serves both in the file.
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head = source.get("lm_head.weight" if "lm_head.weight" in source and not tied else f"{EMBED}.weight")
    modules["lm_head"] = {"params": head.numel(), "bits": _costs(head, h.h, cfg)}
    shapes = {k: shape for f in sorted(set(source.weight_map.values())) for k, (_, shape) in
              read_header(source.dir / f).items()}  # fmt: skip
    n_params = sum(math.prod(shape) for k, shape in shapes.items() if not (tied and k == "lm_head.weight"))
    if "lm_head.weight" not in source and not tied:
        n_params += head.numel()  # an untied model without a stored head: the file stores one
    result = {
        "fingerprint": fp,
        "model": model,
        "settings": cfg.settings(),
        "calibration_text": source_text,
        "n_params": n_params,  # the source's parameters, a tied table once: the whole-file BPW denominator
        "tied": tied,
        "embedding_params": math.prod(shapes[f"{EMBED}.weight"]),
        "extra_bits": 0 if rot is None else 16 * rot.numel(),  # stored beyond the source's tensors
        "modules": modules,
        "seconds": time.perf_counter() - t0,
    }
    run.close()
    atomic_json(result, path)
    shutil.rmtree(run.work, ignore_errors=True)
    return result


def allocate(
    m: dict[str, Any], target_bpw: float, widths: tuple[int, ...] = ALLOCATED_BITS
) -> tuple[dict[str, int], float]:
    """One width of ``widths`` per module (``lm_head``'s also the embeddings') minimising the summed measured
    error with the whole file at most ``target_bpw`` bits per source parameter.  Returns ``(bits by module,
    achieved bpw)``."""
    mods = m["modules"]
    quantized = sum(v["params"] for v in mods.values()) + (0 if m["tied"] else m["embedding_params"])
    other_bits = 16 * (m["n_params"] - quantized) + m.get("extra_bits", 0)  # norms, biases: 16-bit
    emb_scale = 0.0 if m["tied"] else m["embedding_params"] / mods["lm_head"]["params"]

    def option(name: str, b: int) -> tuple[float, float]:
        cost, bits = mods[name]["bits"][str(b)]
        return cost, bits * (1 + emb_scale) if name == "lm_head" else bits  # an untied embedding copies the head

    budget = target_bpw * m["n_params"] - other_bits
    lo_bits = sum(option(n, min(widths))[1] for n in mods)
    hi_bits = sum(option(n, max(widths))[1] for n in mods)
    if budget < lo_bits:
        raise ElutqError(
            f"--target-bpw {target_bpw} is below what {min(widths)}-bit everywhere reaches "
            f"({(lo_bits + other_bits) / m['n_params']:.3f}); pass a larger target"
        )

    def pick(lam: float) -> dict[str, int]:
        return {n: min(widths, key=lambda b, n=n: option(n, b)[0] + lam * option(n, b)[1]) for n in mods}

    def size(choice: dict[str, int]) -> float:
        return sum(option(n, b)[1] for n, b in choice.items())

    if budget >= hi_bits:
        choice = {n: max(widths) for n in mods}
    else:
        lo, hi = 0.0, 1.0
        while size(pick(hi)) > budget:  # λ large enough to fit
            hi *= 4
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if size(pick(mid)) <= budget else (mid, hi)
        choice = pick(hi)
        while True:  # spend what is left: the upgrade that buys the most error per bit, while it fits
            room = budget - size(choice)
            best = None
            for n, b in choice.items():
                for nb in widths:
                    if nb <= b:
                        continue
                    dc = option(n, b)[0] - option(n, nb)[0]
                    db = option(n, nb)[1] - option(n, b)[1]
                    if db <= room and dc > 0 and (best is None or dc / db > best[0]):
                        best = (dc / db, n, nb)
            if best is None:
                break
            choice[best[1]] = best[2]
    return choice, (size(choice) + other_bits) / m["n_params"]


def summary(choice: dict[str, int]) -> str:
    """``"2-bit: 120, 3-bit: 80, 4-bit: 11"``: how many modules got each width."""
    counts = {b: sum(1 for v in choice.values() if v == b) for b in CANDIDATE_BITS}
    return ", ".join(f"{b}-bit: {c}" for b, c in counts.items() if c)


