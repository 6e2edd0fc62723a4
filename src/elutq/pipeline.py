"""Streaming, resumable quantization: GPTQ or RTN, one decoder layer in memory at a time.

    source shards ──► embed(calibration ids) ──► the layer loop (layerloop.py), for each layer i:
                                                   load layer i from the shards
                                                   (GPTQ) run the calibration activations through it,
                                                          quantize its linears group by group
                                                   (RTN)  quantize its linears from the weights alone
                                                   write model-layer-i.safetensors, the next
                                                   activations and progress.json; free the layer
                                               ──► final norm, lm_head (optionally quantized), embeddings
                                               ──► config.json + index → rename OUT.partial → OUT

The whole fp model is never materialised: a meta-device skeleton gives the module structure and
each layer is filled from the safetensors shards only while it is being quantized.  Calibration
activations live in RAM when they fit and in chunk files under ``offload_dir`` otherwise.  The
per-layer plug-ins are ``quantize_layer_gptq`` and ``quantize_layer_rtn`` (which the in-memory
``quantize()`` runs too); resume and progress are the layer loop's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .calibration import CalibConfig, calibration_ids
from .checkpoint import (
    EMBED,
    SHARED,
    SafetensorsDir,
    check_output,
    finish_checkpoint,
    quantization_config,
    read_header,
    storage_dtype,
)
from .gptq import CodesMode, Hessian, gptq_plan, gptq_quantize_weight
from .hlq import QuantConfig, QuantizedWeight, quantize_weight
from .layerloop import (
    Activations,
    LayerStep,
    Run,
    atomic_save,
    fingerprint,
    layer_prefix,
    materialize,
    run_layer,
    run_layers,
)
from .models import check_architecture, meta_model, position_embeddings, resolve_source_dir
from .modules import HLQLinear, rotate_mlps, set_module
from .rotation import NORM_MATRIX, NORM_ROTATION, RotatedSource, Rotation
from .utils import ElutqError, move_into_place, release_free_memory

HIDDEN = "hidden"  # the calibration activations' stream in the layer loop

# Inside a decoder layer, GPTQ quantizes these groups in order, re-running the layer in between so
# each group sees the inputs that the already-quantized groups produce.  Linears of a group share
# their input, so they share one Hessian.
SEQUENTIAL_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass(frozen=True)
class PipelineConfig:
    quant: QuantConfig = QuantConfig()
    method: Literal["rtn", "gptq"] = "gptq"
    lm_head: QuantConfig | None = QuantConfig(bits=4, group_size=128)  # None: keep lm_head 16-bit
    embed: QuantConfig | None = None  # the embeddings (always RTN: a lookup has no activations); None: 16-bit
    calib: CalibConfig = CalibConfig()
    damp: float = 0.01
    act_order: bool = True
    true_sequential: bool = True
    codes: CodesMode = "per-column"
    batch_size: int = 8  # calibration samples per forward (and per offloaded chunk)
    offload: Literal["auto", "always", "never"] = "auto"
    offload_dir: str | None = None
    device: str = "auto"  # where GPTQ's layer forwards and math run: "cpu", "cuda[:N]" or "auto"
    # Per-module (name, bits, group size) (mixed precision: mixed.allocate); the others: quant.
    module_quant: tuple[tuple[str, int, int], ...] = ()
    rotation: Rotation | None = None  # incoherence rotation fused into the weights (rotation.py); None: none

    def __post_init__(self) -> None:
        if self.method not in ("rtn", "gptq"):
            raise ValueError(f"method must be 'rtn' or 'gptq' (got {self.method!r})")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1) (got {self.damp})")

    def quant_for(self, name: str) -> QuantConfig:
        """The setting of decoder linear ``name`` (its full name): ``quant``, or its own in ``module_quant``."""
        for n, bits, group in self.module_quant:
            if n == name:
                return replace(self.quant, bits=bits, group_size=group)
        return self.quant

    def settings(self) -> dict[str, Any]:
        """What determines the result (and so the resume fingerprint)."""
        d = asdict(self)
        d.pop("offload")
        d.pop("offload_dir")
        d.pop("device")  # same result up to fp noise: a run may resume on another device
        if self.embed is None:
            d.pop("embed")  # runs from before the option keep their fingerprint
        if not self.module_quant:
            d.pop("module_quant")
        if self.rotation is None:
            d.pop("rotation")
        if self.method == "rtn":
            for k in ("calib", "damp", "act_order", "true_sequential", "codes", "batch_size"):
                d.pop(k)
        return d


# ----------------------------------------------------------------------------- reading the source


def open_source(src_dir: Path, config, rotation: Rotation | None) -> SafetensorsDir | RotatedSource:
    """The source model's tensors as the quantizer sees them: rotated where ``rotation`` says."""
    source = SafetensorsDir(src_dir)
    return source if rotation is None else RotatedSource(source, config, rotation)


# ----------------------------------------------------------------------------- one layer


def resolve_device(spec: str) -> torch.device:
    """``"cpu"``, ``"cuda"``/``"cuda:N"`` or ``"auto"`` (CUDA when available) → a torch device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as e:
        raise ElutqError(f"unknown device {spec!r}; pass --device cpu, cuda, cuda:N or auto") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ElutqError(
                f"--device {spec} was asked for, but PyTorch {torch.__version__} ({build}) sees no CUDA GPU; "
                "pass --device cpu (or auto), or install a CUDA build of PyTorch on a machine with an NVIDIA GPU"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ElutqError(
                f"--device {spec} does not exist: {torch.cuda.device_count()} CUDA device(s) are visible; "
                "pass --device cuda:0 (or auto)"
            )
    elif dev.type != "cpu":
        raise ElutqError(f"device {spec!r} is not supported; pass --device cpu, cuda, cuda:N or auto")
    return dev


def _sequential_groups(layer: nn.Module, true_sequential: bool) -> list[list[str]]:
    linears = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    if not true_sequential:
        return [[n] for n in linears]  # one pass, each linear its own Hessian
    known = [[n for n in g if n in linears] for g in SEQUENTIAL_GROUPS]
    groups = [g for g in known if g]
    rest = [n for n in linears if not any(n in g for g in groups)]
    return groups + [[n] for n in rest]


class _StopForward(Exception):
    """Raised by a hook once a pass has the inputs it needs: the rest of the layer would be wasted work."""


@torch.no_grad()
def quantize_layer_gptq(
    layer: nn.Module, acts: Activations, pos, cfg: PipelineConfig, prefix: str = ""
) -> tuple[dict[str, tuple[nn.Linear, HLQLinear]], torch.Tensor | None]:
    """GPTQ every linear of ``layer`` in place.

    Returns the replaced modules and the full-precision layer output for the first calibration chunk
    (the reference for the reported per-layer error).
    """
    groups = _sequential_groups(layer, cfg.true_sequential)
    replaced: dict[str, tuple[nn.Linear, HLQLinear]] = {}
    dev = pos[0].device
    fp_first = run_layer(layer, next(iter(acts)), pos)  # nothing is quantized yet: the fp reference
    passes = [groups] if not cfg.true_sequential else [[g] for g in groups]
    for pass_groups in passes:
        # With one group per pass, nothing after the group's input is needed: stop the forward there
        # (the q/k/v pass then costs one RMSNorm instead of a whole layer).
        stop = len(pass_groups) == 1
        hessians: dict[str, Hessian] = {}
        hooks = []
        for group in pass_groups:
            first = layer.get_submodule(group[0])
            hessians[group[0]] = hess = Hessian(first.in_features, device=dev)

            def hook(m, args, hess=hess, stop=stop) -> None:
                hess.add(args[0])
                if stop:
                    raise _StopForward

            hooks.append(first.register_forward_pre_hook(hook))
        try:
            for x in acts:
                with contextlib.suppress(_StopForward):
                    run_layer(layer, x, pos)
        finally:
            for h in hooks:
                h.remove()
        del hook, hess  # the hooks' closures must not keep a Hessian alive past its plan
        for group in pass_groups:
            h = hessians.pop(group[0]).h
            quants = {name: cfg.quant_for(prefix + name) for name in group}
            sizes = sorted({q.group_for(h.shape[0]) for q in quants.values()})
            # One factorization per input and group size, shared by the group; the last consumes (frees) the
            # Hessian (mixed precision may give the linears reading one input different group sizes).
            plans = {g: gptq_plan(h, g, damp=cfg.damp, act_order=cfg.act_order, consume=g == sizes[-1])
                     for g in sizes}  # fmt: skip
            del h
            release_free_memory()
            for name in group:
                linear = layer.get_submodule(name)
                quant = quants[name]
                plan = plans[quant.group_for(linear.in_features)]
                qw = gptq_quantize_weight(linear.weight, None, quant, codes=cfg.codes, plan=plan)
                bias = None if linear.bias is None else linear.bias.cpu()
                module = HLQLinear.from_quantized(qw, bias).to(dev)
                set_module(layer, name, module)
                # The caller only needs the shape: a meta-device shell frees the fp32 weight now.
                replaced[name] = (linear.to("meta"), module)
            del plans, plan
            release_free_memory()
    return replaced, fp_first


@torch.no_grad()
def quantize_layer_rtn(
    layer: nn.Module, quant: QuantConfig, quant_for: Callable[[str], QuantConfig] | None = None
) -> dict[str, tuple[nn.Linear, HLQLinear]]:
    """RTN every linear of ``layer`` in place (the in-memory ``quantize()`` runs this too); ``quant_for(name)``,
    if given, sets each linear's own.

    Returns the replaced modules by name: ``(the original linear, its HLQLinear)``."""
    replaced = {}
    for name, linear in [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]:
        q = quant if quant_for is None else quant_for(name)
        module = HLQLinear.from_quantized(quantize_weight(linear.weight, q), linear.bias)
        set_module(layer, name, module)
        replaced[name] = (linear, module)
    return replaced


def _layer_tensors(layer: nn.Module, prefix: str, prefer: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in layer.state_dict().items():
        if t.is_floating_point() and not name.endswith((".scales", ".zeros")):
            t = t.to(storage_dtype(t, prefer))
        out[prefix + name] = t.contiguous().cpu()
    return out


# ----------------------------------------------------------------------------- the pipeline


@dataclass
class PipelineReport:
    seconds: float = 0.0
    layer_errors: list[float] = field(default_factory=list)  # relative output MSE (GPTQ) or weight MSE (RTN)
    n_params: int = 0
    storage_bits: int = 0
    resumed_from: int = 0
    calib_source: str | None = None

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits / max(self.n_params, 1)


def _use_offload(cfg: PipelineConfig, n_bytes: int) -> bool:
    if cfg.offload == "always":
        return True
    if cfg.offload == "never":
        return False
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return n_bytes * 3 > avail // 4  # inputs, outputs and fp outputs must fit in a quarter of free RAM


def _check_offload_dir(path: Path, need_bytes: int) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as e:
        raise ElutqError(
            f"cannot write to the offload directory {path} ({e.strerror}); pass a writable --offload-dir"
        ) from e
    free = shutil.disk_usage(path).free
    if free < 2 * need_bytes:
        raise ElutqError(
            f"the offload directory {path} has {free / 2**30:.1f} GiB free but the activations need "
            f"{2 * need_bytes / 2**30:.1f} GiB; pass an --offload-dir with more space"
        )


def quantize_streaming(
    model: str,
    out: str | Path,
    cfg: PipelineConfig,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> PipelineReport:
    """Quantize ``model`` (any spec `elutq quantize` accepts) into the checkpoint directory ``out``."""
    from transformers import AutoConfig, AutoTokenizer

    t0 = time.perf_counter()
    out = check_output(out, overwrite)
    src_dir = resolve_source_dir(model)
    config = AutoConfig.from_pretrained(src_dir)
    check_architecture(config)
    source = open_source(src_dir, config, cfg.rotation)
    # Before anything is written, so a bad --device leaves no unfinished run behind.
    device = resolve_device(cfg.device) if cfg.method == "gptq" else torch.device("cpu")  # RTN: no activations
    tokenizer = AutoTokenizer.from_pretrained(src_dir)
    run = Run.open(
        out,
        fingerprint({"model": source.fingerprint(), "settings": cfg.settings()}),
        {"layers_done": 0, "hidden": {}, "layers": []},
        resume,
        overwrite,
        inputs="model or other settings",
    )
    skeleton = meta_model(config)
    rotate_mlps(skeleton, cfg.rotation)
    # The counts of the layers done before a resume come from progress.json (a resumed run reports all).
    report = PipelineReport(
        resumed_from=run.layers_done,
        n_params=run.state.get("n_params", 0),
        storage_bits=run.state.get("storage_bits", 0),
    )
    prefer = torch.bfloat16 if str(getattr(config, "dtype", None) or "").endswith("bfloat16") else torch.float16

    def count(replaced: dict[str, tuple[nn.Linear, HLQLinear]]) -> None:
        for lin, m in replaced.values():
            report.n_params += lin.weight.numel()
            report.storage_bits += m.quantized().storage_bits()
        run.state.update(n_params=report.n_params, storage_bits=report.storage_bits)  # saved with the layer

    def rtn_step(i: int, layer: nn.Module, acts: dict[str, Activations]) -> LayerStep:
        layer = materialize(layer, source, layer_prefix(i))
        replaced = quantize_layer_rtn(layer, cfg.quant, lambda name: cfg.quant_for(layer_prefix(i) + name))
        sq = sum((m.weight().float() - lin.weight).pow(2).sum().item() for lin, m in replaced.values())
        err = sq / sum(lin.weight.numel() for lin, _ in replaced.values())
        count(replaced)
        return LayerStep(_layer_tensors(layer, layer_prefix(i), prefer), {}, err, {"err": f"{err:.2e}"})

    acts: dict[str, Activations] = {}
    step = rtn_step
    if cfg.method == "gptq":
        # Calibration activations entering layer `layers_done`.
        ids, report.calib_source = calibration_ids(tokenizer, cfg.calib, model=src_dir)
        act_bytes = ids.numel() * config.hidden_size * 4
        offload_root: Path | None = None
        if _use_offload(cfg, act_bytes):
            offload_root = Path(cfg.offload_dir) if cfg.offload_dir else run.work / "activations"
            _check_offload_dir(offload_root, act_bytes)
        pos = position_embeddings(config, cfg.calib.seqlen, device, skeleton)
        if run.layers_done == 0:
            rows, ids_rows = _calibration_embeddings(source.get(f"{EMBED}.weight"), ids, cfg.embed)
            batches = [ids_rows[i : i + cfg.batch_size] for i in range(0, ids.shape[0], cfg.batch_size)]
            acts = {HIDDEN: Activations(list(batches)).map(lambda b: rows[b], _chunk_dir(offload_root, 0))}
            del rows
        else:
            acts = run.activations()

        def gptq_step(i: int, layer: nn.Module, acts: dict[str, Activations]) -> LayerStep:
            layer = materialize(layer, source, layer_prefix(i), device)
            replaced, fp_out = quantize_layer_gptq(layer, acts[HIDDEN], pos, cfg, layer_prefix(i))
            new = acts[HIDDEN].map(lambda x: run_layer(layer, x, pos), _chunk_dir(offload_root, i + 1))
            q_first = next(iter(new))
            err = ((q_first - fp_out).pow(2).sum() / fp_out.pow(2).sum()).item()
            count(replaced)
            return LayerStep(_layer_tensors(layer, layer_prefix(i), prefer), {HIDDEN: new}, err, {"err": f"{err:.2e}"})

        step = gptq_step

    acts = run_layers(run, skeleton.model.layers, step, acts, progress)
    report.layer_errors = list(run.entries)

    head_bits, head_params = _write_head(skeleton, source, config, acts.get(HIDDEN), cfg, run.work, prefer, device)
    report.storage_bits += head_bits
    report.n_params += head_params
    _finish(run, config, tokenizer, cfg, report, overwrite, src_dir)
    report.seconds = time.perf_counter() - t0
    return report


HEAD_ROWS = 8192  # lm_head rows quantized at a time


def shares_embedding(cfg: PipelineConfig, config) -> bool:
    """Whether the checkpoint stores one quantized tensor for lm_head and the embeddings: the source ties them
    and both are quantized alike.  The shared tensor is the head's (GPTQ's, with that method); the layer loop
    embeds the calibration text with the embeddings' RTN rows, the nearest it can know before the head exists."""
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return tied and cfg.embed is not None and cfg.embed == cfg.lm_head


def _chunk_dir(root: Path | None, layer: int) -> Path | None:
    return None if root is None else root / f"layer-{layer:05d}"


@torch.no_grad()
def _write_head(
    skeleton,
    source: SafetensorsDir,
    config,
    acts,
    cfg: PipelineConfig,
    work: Path,
    prefer: torch.dtype,
    device: torch.device,
):
    """Embeddings, final norm and lm_head → model-head.safetensors. Returns (storage bits, params) of
    what it quantized (lm_head, embeddings)."""
    tensors: dict[str, torch.Tensor] = {}
    emb = source.get(f"{EMBED}.weight")
    bits = params = 0
    if cfg.embed is None:
        tensors[f"{EMBED}.weight"] = emb.to(storage_dtype(emb, prefer))
    elif not shares_embedding(cfg, config):
        bits += _quantize_rows(emb, lambda w: quantize_weight(w, cfg.embed), EMBED, tensors)
        params += emb.numel()
    norm = source.get("model.norm.weight")
    tensors["model.norm.weight"] = norm.to(storage_dtype(norm, prefer))
    norm_rotation = source.get(NORM_ROTATION).float() if NORM_ROTATION in source else None
    if norm_rotation is not None:  # fp16 whatever the model's dtype: its entries are bounded by the norm's weight
        tensors[NORM_ROTATION] = norm_rotation.half()
    tied = getattr(config, "tie_word_embeddings", False)
    head_w = emb if tied or "lm_head.weight" not in source else source.get("lm_head.weight")
    if cfg.lm_head is None:
        if not tied or cfg.embed is not None:  # quantized embeddings untie a 16-bit head (see _finish)
            tensors["lm_head.weight"] = head_w.to(storage_dtype(head_w, prefer))
    else:
        # Rows are independent in both RTN and GPTQ (one Hessian for all rows), so the vocabulary is
        # quantized in slices: the fp32 working copies then stay small for any vocabulary size.
        if cfg.method == "gptq":
            rms = type(skeleton.model.norm)(config.hidden_size, eps=config.rms_norm_eps)
            rms.weight.data = norm.to(device=device, dtype=torch.float32)
            h = Hessian(config.hidden_size, device=device)
            for x in acts:
                h.add(rms(x.to(device)) if norm_rotation is None else rms(x.to(device)) @ norm_rotation.to(device))
            g = cfg.lm_head.group_for(config.hidden_size)
            plan = gptq_plan(h.h, g, damp=cfg.damp, act_order=cfg.act_order, consume=True)  # once for all slices
            del h

            def quantize_rows(w: torch.Tensor) -> QuantizedWeight:
                return gptq_quantize_weight(w.to(device), None, cfg.lm_head, codes=cfg.codes, plan=plan)
        else:

            def quantize_rows(w: torch.Tensor) -> QuantizedWeight:
                return quantize_weight(w, cfg.lm_head)

        bits += _quantize_rows(head_w, quantize_rows, "lm_head", tensors)
        params += head_w.numel()
    atomic_save({k: v.contiguous() for k, v in tensors.items()}, work / "model-head.safetensors", {"format": "pt"})
    return bits, params


def _calibration_embeddings(
    emb: torch.Tensor, ids: torch.Tensor, embed: QuantConfig | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding rows the calibration ids look up, in fp32 — as the quantized model will see them
    where the embeddings are quantized (RTN row by row, so quantizing only these rows gives the rows
    the checkpoint stores) — and the ids as indices into them."""
    used, inverse = torch.unique(ids, return_inverse=True)
    rows = emb[used].to(torch.float32)
    if embed is not None:
        rows = quantize_weight(rows, embed).dequantize()
    return rows, inverse


def _quantize_rows(w: torch.Tensor, quantize_rows, name: str, tensors: dict[str, torch.Tensor]) -> int:
    """``name``'s packed tensors into ``tensors``, quantized HEAD_ROWS rows at a time; returns storage bits."""
    packed, scales, zeros = [], [], []
    bits = 0
    for r in range(0, w.shape[0], HEAD_ROWS):
        qw = quantize_rows(w[r : r + HEAD_ROWS])
        packed.append(qw.pack().cpu())
        scales.append(qw.scales.cpu())
        zeros.append(qw.zeros.cpu())
        bits += qw.storage_bits()
        del qw
    tensors[f"{name}.qweight"] = torch.cat(packed, 1)
    tensors[f"{name}.scales"], tensors[f"{name}.zeros"] = torch.cat(scales), torch.cat(zeros)
    return bits


def _finish(
    run: Run,
    config,
    tokenizer,
    cfg: PipelineConfig,
    report: PipelineReport,
    overwrite: bool,
    src_dir: Path,
) -> None:
    """Index, config, tokenizer and generation defaults into the work dir, then rename it into place."""
    work = run.work
    names = [k for f in sorted(work.glob("*.safetensors")) for k in read_header(f)]
    modules = {
        k.removesuffix(".qweight"): {"bits": q.bits, "group_size": q.group_size}
        for k in names
        if k.endswith(".qweight") and (q := cfg.quant_for(k.removesuffix(".qweight")))
    }
    if cfg.lm_head is not None:
        modules["lm_head"] = {"bits": cfg.lm_head.bits, "group_size": cfg.lm_head.group_size}
    if cfg.embed is not None:
        modules[EMBED] = {"bits": cfg.embed.bits, "group_size": cfg.embed.group_size}
        if shares_embedding(cfg, config):
            modules[EMBED][SHARED] = "lm_head"
    cfg_dict = config.to_dict()
    if cfg.lm_head is not None or cfg.embed is not None:
        cfg_dict["tie_word_embeddings"] = False
    info = {
        "method": cfg.method,
        "format": cfg.quant.format,
        "bits": "mixed" if cfg.module_quant else cfg.quant.bits,  # per module in "modules"
        "group_size": cfg.quant.group_size,
        "iters": cfg.quant.iters,
        "settings": cfg.settings(),
        "calibration_text": report.calib_source,
    }
    if cfg.rotation is not None:
        info["rotation"] = {**cfg.rotation.spec(), NORM_MATRIX: NORM_ROTATION in SafetensorsDir(work)}
    cfg_dict["quantization_config"] = quantization_config(modules, info)

    def close() -> None:
        run.close()
        shutil.rmtree(work / "activations", ignore_errors=True)

    finish_checkpoint(work, cfg_dict, tokenizer, generation_from=src_dir, index=True, close=close)
    move_into_place(work, run.out, overwrite)
