"""Mixed precision to a target size (``elutq quantize --target-bpw``): measure, allocate, then quantize.

``measure``: streamed through the layer loop like GPTQ.  For every decoder linear and ``lm_head``, and each
candidate bit width, what RTN's error at that width costs the model's loss on calibration text.  A layer's
output error alone (``tr(E·H·Eᵀ)``, ``E = W − RTN_b(W)``, ``H = XᵀX`` of the unquantized inputs: what GPTQ
minimises) ranks modules badly: it cannot see that an error in layer 3 grows through 27 more layers while
one in the last layer is mostly normed away, nor that the attention-sink tokens, whose inputs dominate
``H``, barely move the loss.  So each output error is weighted by the loss's gradient there (the diagonal
Fisher of BRECQ, ``Σ_t Σ_o g_to²·δ_to²`` for output ``o`` at token ``t``; ``δ = E·x``), factored as
``g_to² ≈ w_t·c_o``: ``cost = Σ_o c_o·(E·H_w·Eᵀ)_oo`` with ``H_w = Σ_t w_t·x_t x_tᵀ``, ``w_t = Σ_o g_to²``
and ``c_o = Σ_t g_to² / Σ_t w_t`` (``loss_gradients``: a backward pass of the unquantized model, streamed
layer by layer; ``MeasureConfig.weighting = "none"`` keeps the plain output error).  The measurement is
a JSON file (reused for any target; keyed by the model and the settings that change it), its run
resumable like a quantization.

``allocate``: one width (2-4 bits) per module minimising the summed error subject to the whole file's size
(``target × the source's parameters`` bits, 16-bit tensors included): a Lagrangian sweep (each module picks
``argmin cost + λ·bits``, λ bisected to the largest feasible size), then greedy upgrades into what is left.
The embeddings go with ``lm_head``'s width (one shared tensor for a tied model, an RTN copy otherwise).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from .calibration import CalibConfig, calibration_ids
from .checkpoint import EMBED, SafetensorsDir, read_header
from .gptq import Hessian
from .hlq import QuantConfig, quantize_weight
from .layerloop import (
    Activations,
    LayerStep,
    Run,
    atomic_json,
    atomic_save,
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

CANDIDATE_BITS = (2, 3, 4)  # measured and chosen from: 1-bit linears that the (unweighted) proxy deemed cheap
# wrecked the model (2.5 bpw on the default model with 1-bit allowed: WikiText-2 ppl 2,454, against 189 for
# 2-bit everywhere at 2.49); 2-bit with one group per row (2.03 bits on 4096-wide rows) is the cheap option now
GROUP_SIZES = (-1, 32, 64, 128)  # measured and chosen from (-1: one group per row)
HIDDEN = "hidden"
FORMAT = 2  # of the measurement file: 2 keys each module's candidates as "options" ("2g128": [cost, bits])
WEIGHTINGS = ("loss", "none")
GRADIENTS = "gradients.safetensors"  # loss_gradients' result in the run directory, kept for a resume
HEAD_ROWS = 8192  # lm_head rows quantized at a time


def option(bits: int, group_size: int) -> str:
    """A candidate setting's key in a measurement: ``"2g128"``, ``"2g-1"`` (one group per row)."""
    return f"{bits}g{group_size}"


def parse_option(key: str) -> tuple[int, int]:
    """``"2g128"`` → ``(2, 128)``."""
    bits, group = key.split("g")
    return int(bits), int(group)


@dataclass(frozen=True)
class MeasureConfig:
    group_sizes: tuple[int, ...] = GROUP_SIZES
    format: str = "hlq"
    iters: int = 20
    calib: CalibConfig = CalibConfig(n_samples=32)
    batch_size: int = 8
    rotation: Rotation | None = None  # measure the rotated model (rotation.py) that --rotate quantizes
    weighting: str = "loss"  # "loss": output errors weighted by the loss's gradient (module docstring); "none"

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")

    def settings(self) -> dict[str, Any]:
        d = asdict(self)
        d["group_sizes"] = list(self.group_sizes)  # as JSON reads it back
        if self.rotation is None:
            d.pop("rotation")  # measurements from before the option keep their fingerprint
        if self.weighting == "none":
            d.pop("weighting")  # as before the option
        return d

    def quant(self, bits: int, group_size: int) -> QuantConfig:
        return QuantConfig(bits=bits, group_size=group_size, format=self.format, iters=self.iters)  # type: ignore[arg-type]

    def options(self) -> list[tuple[int, int]]:
        return [(b, g) for b in CANDIDATE_BITS for g in self.group_sizes]


def _costs(
    w: torch.Tensor, h: torch.Tensor, cfg: MeasureConfig, rows: torch.Tensor | None = None
) -> dict[str, list[float]]:
    """``{option: [Σ_o rows_o·(E H Eᵀ)_oo, storage bits]}`` for one weight ``[out, in]`` and each candidate
    setting (``rows``: the channel weights ``c``, default 1: ``tr(E H Eᵀ)``); rows in slices, for a wide head."""
    out: dict[str, list[float]] = {}
    h = h.float()
    for b, g in cfg.options():
        cost, bits = 0.0, 0
        for r in range(0, w.shape[0], HEAD_ROWS):
            qw = quantize_weight(w[r : r + HEAD_ROWS].float(), cfg.quant(b, g))
            e = w[r : r + HEAD_ROWS].float() - qw.dequantize()
            per_row = ((e @ h) * e).sum(1)
            cost += float(per_row.sum() if rows is None else per_row @ rows[r : r + HEAD_ROWS].float())
            bits += qw.storage_bits()
        out[option(b, g)] = [cost, bits]
    return out


def _head_input(norm: nn.Module, rot: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """What ``lm_head`` reads: the final norm of ``x`` (in the rotated basis for a rotated tied model)."""
    return norm(x) if rot is None else norm(x) @ rot


def _final_norm(skeleton: nn.Module, source, config) -> tuple[nn.Module, torch.Tensor | None]:
    norm = type(skeleton.model.norm)(config.hidden_size, eps=config.rms_norm_eps)
    norm.weight.data = source.get("model.norm.weight").float()
    norm.weight.requires_grad_(False)
    return norm, (source.get(NORM_ROTATION).float() if NORM_ROTATION in source else None)


def _head_weight(source, config) -> torch.Tensor:
    # Tied as the quantizer decides it (pipeline.shares_embedding): then one tensor serves both in the file.
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return source.get("lm_head.weight" if "lm_head.weight" in source and not tied else f"{EMBED}.weight")


def loss_gradients(config, source, rotation: Rotation | None, ids: torch.Tensor, pos, progress: bool = True,
                   chunk: int = 4, keep_every: int | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """The loss's gradient at every decoder linear's and ``lm_head``'s output, from the unquantized model on
    the calibration samples ``ids [N, T]`` (next-token cross-entropy summed over samples, each sample's
    mean over its tokens): ``{name + ".tokens": w [N, T], name + ".channels": c [out]}``, ``w_t = Σ_o g_to²``
    and ``c_o = Σ_t g_to² / Σ_t w_t`` (the module docstring's factors).

    Streamed like quantization, never the whole model in memory: a forward pass keeps the input of every
    ``keep_every``-th layer (``N·T·hidden`` floats each; default ⌈√layers⌉), then a backward pass from the
    last segment recomputes its layers' inputs from the kept one, and from its last layer materialises each
    layer again, reruns it on its input with autograd and carries the gradient to the layer below.  So about
    2·√layers inputs are held at once instead of one per layer (the default model at 64 samples: 2.3 GB of
    inputs otherwise), for one more forward pass; each layer is read three times (``keep_every=1``: twice,
    every input kept).  ``chunk`` samples run at a time."""
    skeleton = meta_model(config)
    rotate_mlps(skeleton, rotation)
    metas = list(skeleton.model.layers)
    emb = source.get(f"{EMBED}.weight").float()
    n = ids.shape[0]
    spans = [slice(a, min(a + chunk, n)) for a in range(0, n, chunk)]
    tokens: dict[str, torch.Tensor] = {}
    channels: dict[str, torch.Tensor] = {}

    def record(name: str, rows: slice, g: torch.Tensor) -> None:
        g2 = g.detach().float().pow(2)
        if name not in tokens:
            tokens[name] = torch.zeros(ids.shape)
            channels[name] = torch.zeros(g2.shape[-1], dtype=torch.float64)
        tokens[name][rows] = g2.sum(-1)
        channels[name] += g2.sum((0, 1))

    def layer(i: int) -> nn.Module:
        return materialize(copy.deepcopy(metas[i]), source, layer_prefix(i))

    L = len(metas)
    every = math.ceil(math.sqrt(L)) if keep_every is None else keep_every
    if every < 1:
        raise ValueError(f"keep_every must be at least 1 (got {keep_every})")
    # forward, head, backward, and the recomputed inputs (every layer but the kept ones)
    bar = tqdm(total=3 * L + 1 - math.ceil(L / every), desc="loss gradients", unit="pass", disable=not progress,
               leave=False)  # fmt: skip
    inputs: dict[int, torch.Tensor] = {}

    def forward(i: int, x: torch.Tensor) -> torch.Tensor:
        f = layer(i)
        y = torch.cat([run_layer(f, x[s], pos) for s in spans])
        bar.update(1)
        return y

    x = emb[ids]
    for i in range(L):  # forward: keep the input of every `every`-th layer
        if i % every == 0:
            inputs[i] = x
        x = forward(i, x)
    del emb  # the head's copy below is read only now: one table in memory at a time
    norm, rot = _final_norm(skeleton, source, config)
    head = _head_weight(source, config).float()
    grad = torch.empty_like(x)
    with torch.enable_grad():
        for k in range(n):  # the head and the loss, a sample at a time: logits are T × vocabulary floats
            xs = x[k : k + 1].clone().requires_grad_(True)
            logits = _head_input(norm, rot, xs) @ head.T
            logits.register_hook(lambda g, k=k: record("lm_head", slice(k, k + 1), g))
            nn.functional.cross_entropy(logits[0, :-1], ids[k, 1:]).backward()
            grad[k] = xs.grad[0]
        del head, logits
        bar.update(1)
        current = [slice(0)]  # the samples being run, as the hooks see them

        def watch(name: str):
            def hook(_m: nn.Module, _a: tuple, out: torch.Tensor) -> None:  # None: the output stays as it is
                rows = current[0]
                out.register_hook(lambda g: record(name, rows, g))

            return hook

        for i in reversed(range(L)):  # backward: rerun each layer on its input, carry the gradient down
            if i not in inputs:  # a segment's first visit: recompute its layers' inputs from the kept one
                c = i - i % every
                for j in range(c + 1, i + 1):
                    inputs[j] = forward(j - 1, inputs[j - 1])
            f = layer(i)
            hooks = [m.register_forward_hook(watch(layer_prefix(i) + name)) for name, m in f.named_modules()
                     if isinstance(m, nn.Linear)]  # fmt: skip
            try:
                for s in spans:
                    current[0] = s
                    xs = inputs[i][s].clone().requires_grad_(True)
                    out = f(xs, attention_mask=None, position_embeddings=pos)
                    (out[0] if isinstance(out, tuple) else out).backward(grad[s])
                    grad[s] = xs.grad
            finally:
                for h in hooks:
                    h.remove()
            del inputs[i]  # no longer needed
            del f
            bar.update(1)
    bar.close()
    out: dict[str, torch.Tensor] = {}
    for name, w in tokens.items():
        out[f"{name}.tokens"] = w
        out[f"{name}.channels"] = (channels[name] / channels[name].sum().clamp_min(1e-30)).float()
    return out


def default_measurement_path(model: str, cfg: MeasureConfig) -> Path:
    """Where a measurement of ``model`` under ``cfg`` is kept: one per model and settings, reused by any target."""
    from . import __version__
    from .models import cache_dir

    src = resolve_source_dir(model)
    inputs = [SafetensorsDir(src).fingerprint(), cfg.settings(), CANDIDATE_BITS, FORMAT, __version__]
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
    fp = fingerprint({"model": source.fingerprint(), "settings": cfg.settings(), "candidates": CANDIDATE_BITS,
                      "format": FORMAT})  # fmt: skip
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
    grads: dict[str, torch.Tensor] = {}
    if cfg.weighting == "loss":
        if (run.work / GRADIENTS).is_file():
            grads = load_file(str(run.work / GRADIENTS))
        else:
            grads = loss_gradients(config, source, cfg.rotation, ids, pos, progress)
            atomic_save(grads, run.work / GRADIENTS)
            run.save()  # the run has started: a resume keeps the gradients (a folder without progress is wiped)
    if run.layers_done == 0:
        emb = source.get(f"{EMBED}.weight").float()
        acts = {HIDDEN: Activations([emb[ids[i : i + cfg.batch_size]] for i in range(0, ids.shape[0], cfg.batch_size)])}
        del emb
    else:
        acts = run.activations()

    def weighted_add(h: Hessian, name: str, x: torch.Tensor, first: int) -> None:
        """``h += x`` of samples ``first..`` (each token's row scaled by √w_t: ``H_w``)."""
        if grads:
            x = x * grads[f"{name}.tokens"][first : first + x.shape[0]].sqrt().unsqueeze(-1)
        h.add(x)

    def rows(name: str) -> torch.Tensor | None:
        return grads.get(f"{name}.channels")

    def step(i: int, layer: nn.Module, acts: dict[str, Activations]) -> LayerStep:
        layer = materialize(layer, source, layer_prefix(i))
        linears = [(layer_prefix(i) + n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        hess = {n: Hessian(m.in_features) for n, m in linears}
        first = [0]  # the first sample of the batch being run

        def forward(x: torch.Tensor) -> torch.Tensor:
            y = run_layer(layer, x, pos)
            first[0] += x.shape[0]
            return y

        hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: weighted_add(hess[n], n, a[0], first[0]))
                 for n, m in linears]  # fmt: skip
        try:
            new = acts[HIDDEN].map(forward, None)  # the unquantized model's stream
        finally:
            for h in hooks:
                h.remove()
        entry = {n: {"params": m.weight.numel(), "options": _costs(m.weight, hess[n].h, cfg, rows(n))}
                 for n, m in linears}  # fmt: skip
        return LayerStep({}, {HIDDEN: new}, entry, {})

    acts = run_layers(run, skeleton.model.layers, step, acts, progress)
    modules: dict[str, Any] = {}
    for entry in run.entries:
        modules.update(entry)
    norm, rot = _final_norm(skeleton, source, config)  # rot: stored 16-bit, counted in extra_bits
    h = Hessian(config.hidden_size)
    first = 0
    for x in acts[HIDDEN]:
        weighted_add(h, "lm_head", _head_input(norm, rot, x), first)
        first += x.shape[0]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head = _head_weight(source, config)
    modules["lm_head"] = {"params": head.numel(), "options": _costs(head, h.h, cfg, rows("lm_head"))}
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
    m: dict[str, Any],
    target_bpw: float,
    widths: tuple[int, ...] = CANDIDATE_BITS,
    groups: tuple[int, ...] | None = None,
) -> tuple[dict[str, tuple[int, int]], float]:
    """One setting (bits in ``widths``, group size in ``groups``, default all measured) per module (``lm_head``'s
    also the embeddings') minimising the summed measured error with the whole file at most ``target_bpw`` bits
    per source parameter.  Returns ``({module: (bits, group size)}, achieved bpw)``."""
    mods = m["modules"]
    quantized = sum(v["params"] for v in mods.values()) + (0 if m["tied"] else m["embedding_params"])
    other_bits = 16 * (m["n_params"] - quantized) + m.get("extra_bits", 0)  # norms, biases: 16-bit
    emb_scale = 0.0 if m["tied"] else m["embedding_params"] / mods["lm_head"]["params"]
    allowed = [k for k in next(iter(mods.values()))["options"]
               if parse_option(k)[0] in widths and (groups is None or parse_option(k)[1] in groups)]  # fmt: skip
    if not allowed:
        raise ElutqError(f"the measurement has no setting of {widths} bits with group sizes {groups}")

    def cost_size(name: str, k: str) -> tuple[float, float]:
        cost, bits = mods[name]["options"][k]
        return cost, bits * (1 + emb_scale) if name == "lm_head" else bits  # an untied embedding copies the head

    def size(choice: dict[str, str]) -> float:
        return sum(cost_size(n, k)[1] for n, k in choice.items())

    budget = target_bpw * m["n_params"] - other_bits
    smallest = {n: min(allowed, key=lambda k, n=n: cost_size(n, k)[1]) for n in mods}
    if budget < size(smallest):
        raise ElutqError(
            f"--target-bpw {target_bpw} is below what the smallest setting everywhere reaches "
            f"({(size(smallest) + other_bits) / m['n_params']:.3f}); pass a larger target"
        )

    def pick(lam: float) -> dict[str, str]:
        return {n: min(allowed, key=lambda k, n=n: cost_size(n, k)[0] + lam * cost_size(n, k)[1]) for n in mods}

    choice = pick(0.0)
    if size(choice) > budget:
        lo, hi = 0.0, 1.0
        while size(pick(hi)) > budget:  # λ large enough to fit
            hi *= 4
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if size(pick(mid)) <= budget else (mid, hi)
        choice = pick(hi)
        while True:  # spend what is left: the change that buys the most error per bit, while it fits
            room = budget - size(choice)
            best = None
            for n, k in choice.items():
                c, b = cost_size(n, k)
                for nk in allowed:
                    dc, db = c - cost_size(n, nk)[0], cost_size(n, nk)[1] - b
                    if 0 < db <= room and dc > 0 and (best is None or dc / db > best[0]):
                        best = (dc / db, n, nk)
            if best is None:
                break
            choice[best[1]] = best[2]
    return {n: parse_option(k) for n, k in choice.items()}, (size(choice) + other_bits) / m["n_params"]


def setting_name(bits: int, group_size: int) -> str:
    """``w2g128``; ``w2`` for one group per row."""
    return f"w{bits}" + (f"g{group_size}" if group_size != -1 else " per-row")


def summary(choice: dict[str, tuple[int, int]]) -> str:
    """``"w2g128: 120, w3g64: 80, w4g128: 11"``: how many modules got each setting."""
    counts: dict[tuple[int, int], int] = {}
    for v in choice.values():
        counts[v] = counts.get(v, 0) + 1
    return ", ".join(f"{setting_name(*k)}: {c}" for k, c in sorted(counts.items()))
