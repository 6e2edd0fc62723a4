"""HLQ-FT: finetune the scales and offsets of a quantized checkpoint, codes frozen.

Block reconstruction (``stage="block"``), streamed one decoder layer at a time (a plug-in of the
layer loop in layerloop.py, as GPTQ and RTN quantization are)::

    checkpoint + source shards ──► embed(calibration ids) = X_fp = X_q
                                   for each layer i:
                                     fp layer i (source)   : Y_fp = layer_fp(X_fp)           (target)
                                     quantized layer i (ckpt): train s, z so layer_q(X_q) ≈ Y_fp (MSE)
                                       AdamW + cosine schedule, held-out samples pick the best state
                                     write model-layer-i.safetensors (fp16 s, z), progress.json
                                     X_fp ← Y_fp,  X_q ← layer_q(X_q) with the written (fp16) parameters
                               ──► head tensors copied, config.json + index → rename OUT.partial → OUT

The {0,1} codes never change, so ``W = z[:, grp] + Σ_i s[:, grp, i]·b_i`` is linear in the trained
parameters and needs no straight-through estimator.  Inputs of layer ``i`` come from the already
finetuned layers, so each layer also learns to correct the error its predecessors left.  The result
is a normal checkpoint (same tensors, same loader, same kernels).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint as recompute
from tqdm import tqdm

from .calibration import CalibConfig, calibration_ids
from .checkpoint import (
    EMBED,
    WEIGHTS_FILE,
    SafetensorsDir,
    check_output,
    embedding_prefix,
    finish_checkpoint,
    module_group_size,
    read_quantization_config,
    shares_head,
    stored_embedding,
)
from .hlq import dequantize, nearest_codes, pack_bitplanes, unpack_bitplanes
from .kernels import cpu_features, decode_planes, decode_planes_grad
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
from .modules import HLQEmbedding, HLQLinear, rotate_mlps, set_module
from .pipeline import open_source
from .rotation import NORM_ROTATION, RotatedSource, rotation_from_spec
from .utils import ElutqError, move_into_place, peak_rss_mb, release_free_memory

DEFAULT_LR = {"block": 3e-3, "e2e": 1e-4}  # AdamW learning rates (cosine schedule) per stage
HIDDEN_FP, HIDDEN_Q = "hidden-fp", "hidden-q"  # the layer loop's activation streams: fp model, quantized model
# Config fields that must agree between the checkpoint and the source model.
_SHAPE_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


@dataclass(frozen=True)
class FinetuneConfig:
    stage: Literal["block", "e2e"] = "block"
    calib: CalibConfig = CalibConfig(n_samples=64, seqlen=256)  # 16k tokens: CPU-sized
    val_fraction: float = 0.125  # held-out calibration samples (early stopping / best state)
    batch_size: int = 4  # samples per step (and per activation chunk)
    epochs: int = 4  # passes over the training samples per layer
    lr: float | None = None  # None: DEFAULT_LR of the stage (block: best of 1e-2..1e-5, layers 5, 20, w2g128, w3g128)
    weight_decay: float = 0.0  # decay would pull scales towards 0, not towards their fitted values
    warmup_frac: float = 0.0
    eval_every: int = 0  # steps between held-out evaluations (0: once per epoch... and at the end)
    patience: int = 0  # evaluations without improvement before stopping (0: never stop early)
    seed: int = 0
    loss: Literal["kl", "ce"] = "kl"  # e2e: KL to the fp model's next-token distribution, or causal-LM loss
    teacher_topk: int = 0  # e2e KL: keep the teacher's k most likely tokens per position and the rest's mass (0: all)
    reassign_codes: bool = False  # block: between epochs, re-assign codes to the fp weights' nearest level
    block_loss: Literal["normed", "mse"] = "normed"  # block: each token's error as the next norm sees it, or plain MSE
    # e2e: the training steps' matmuls in bf16 (autocast; parameters, optimizer, loss and held-out checks stay
    # fp32): 1.5-1.6x the step rate where the CPU has bf16 dot products (default_precision; docs/RESULTS.md)
    precision: Literal["fp32", "bf16"] = "fp32"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.stage not in ("block", "e2e"):
            raise ValueError(f"stage must be 'block' or 'e2e' (got {self.stage!r})")
        if self.loss not in ("kl", "ce"):
            raise ValueError(f"loss must be 'kl' or 'ce' (got {self.loss!r})")
        if self.block_loss not in ("normed", "mse"):
            raise ValueError(f"block_loss must be 'normed' or 'mse' (got {self.block_loss!r})")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16' (got {self.precision!r})")
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR[self.stage])
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1) (got {self.val_fraction})")
        if self.batch_size < 1 or self.epochs < 0 or self.lr <= 0:
            raise ValueError("batch_size >= 1, epochs >= 0 and lr > 0 are required")
        if self.teacher_topk < 0:
            raise ValueError(f"teacher_topk must be >= 0 (0: the whole distribution), got {self.teacher_topk}")

    def settings(self) -> dict[str, Any]:
        """What determines the result (and so the resume fingerprint); the device is left out."""
        d = asdict(self)
        d.pop("device")
        if self.stage != "e2e" or self.loss != "kl" or not self.teacher_topk:
            d.pop("teacher_topk")  # only a top-k teacher changes a run (older runs keep their fingerprint)
        if self.stage == "block":
            d.pop("loss")  # e2e's objective
        else:
            d.pop("reassign_codes")  # e2e keeps the codes
            d.pop("block_loss")
        if not self.reassign_codes:
            d.pop("reassign_codes", None)  # checkpoints from before the option keep their fingerprint
        if self.stage != "e2e" or self.precision == "fp32":
            d.pop("precision")  # only e2e trains in bf16; fp32 runs keep the fingerprint of before the option
        return d


def default_precision(stage: str, device: str) -> str:
    """``"bf16"`` for an e2e stage where bf16 matmuls are fast (a CPU with AVX512-BF16, a CUDA GPU that
    supports bf16), else ``"fp32"`` (elsewhere bf16 matmuls are emulated: slower than fp32)."""
    if stage != "e2e":
        return "fp32"
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_features().get("avx512bf16") else "fp32"


# ----------------------------------------------------------------------------- the trainable view


DECODE_ROWS = 1024  # rows of a matrix decoded (or differentiated) at a time: temporaries the size of the block
NATIVE_DECODE = True  # CPU tensors decode in native code (kernels.decode_planes); tests turn it off for the torch path


class _Decode(torch.autograd.Function):
    """The weight ``[out, in]`` from packed bit-planes ``qweight [bits, out, ⌈in/8⌉]`` and ``s``, ``z``, as
    ``hlq.dequantize`` decodes it, unpacking a block of rows at a time.  The backward unpacks the codes again
    instead of keeping what autograd would (gather's int64 index, 8 bytes per weight: 1.9 GB for a
    151,936 × 1536 head):  ``∂L/∂z[o, G] = Σ_{j∈G} ∂L/∂w[o, j]``,
    ``∂L/∂s[o, G, i] = Σ_{j∈G} ∂L/∂w[o, j]·bit_i(code[o, j])``."""

    @staticmethod
    def forward(ctx, qweight: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group_size: int, n: int) -> torch.Tensor:
        ctx.save_for_backward(qweight)
        ctx.group_size, ctx.n = group_size, n
        if NATIVE_DECODE and qweight.device.type == "cpu":  # no unpacked codes, no gather index
            return decode_planes(qweight, s, z, n, group_size)
        w = torch.empty(qweight.shape[1], n, dtype=torch.float32, device=qweight.device)
        for r in range(0, w.shape[0], DECODE_ROWS):
            rs = slice(r, r + DECODE_ROWS)
            w[rs] = dequantize(unpack_bitplanes(qweight[:, rs], n), s[rs].detach(), z[rs].detach(), group_size)
        return w

    @staticmethod
    def backward(ctx, gw: torch.Tensor):
        (qweight,) = ctx.saved_tensors
        bits, out, _ = qweight.shape
        g, n = ctx.group_size, ctx.n
        if NATIVE_DECODE and qweight.device.type == "cpu":
            return None, *decode_planes_grad(qweight, gw, g), None, None
        ng = -(-n // g)
        gs = gw.new_empty(out, ng, bits, dtype=torch.float32)
        gz = gw.new_empty(out, ng, dtype=torch.float32)
        pad = (0, ng * g - n)
        for r in range(0, out, DECODE_ROWS):
            rs = slice(r, r + DECODE_ROWS)
            gb = nn.functional.pad(gw[rs].float(), pad).view(-1, ng, g)
            cb = nn.functional.pad(unpack_bitplanes(qweight[:, rs], n), pad).view(-1, ng, g)
            gz[rs] = gb.sum(-1)
            for i in range(bits):
                gs[rs, :, i] = (gb * ((cb >> i) & 1)).sum(-1)
        return None, gs, gz, None, None


class TrainableHLQ(nn.Module):
    """An ``HLQLinear`` with fp32 trainable scales ``s`` [out, ng, bits] and offsets ``z`` [out, ng].

    Codes are a frozen buffer, kept packed as the checkpoint stores them (``qweight``: 2 bits per weight
    at 2 bits, where unpacked codes would take 8).  The forward dequantizes with the same function as
    ``HLQLinear``, so before training (``s``, ``z`` = the fp16 values) the outputs are bit-identical.
    """

    def __init__(self, m: HLQLinear):
        super().__init__()
        self.in_features, self.out_features = m.in_features, m.out_features
        self.bits, self.group_size = m.bits, m.group_size
        self.register_buffer("qweight", m.qweight.detach().clone())
        self.s = nn.Parameter(m.scales.detach().float().clone())
        self.z = nn.Parameter(m.zeros.detach().float().clone())
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().float().clone(), requires_grad=False)
        self.reassigned = False  # set by reassign_: write_back then stores the new codes

    @property
    def codes(self) -> torch.Tensor:
        """The codes ``[out, in]``, unpacked (a copy)."""
        return unpack_bitplanes(self.qweight, self.in_features)

    def weight(self) -> torch.Tensor:
        return _Decode.apply(self.qweight, self.s, self.z, self.group_size, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def round_(self) -> None:
        """Round ``s``, ``z`` to the fp16 values a checkpoint stores (so the forward equals the written model)."""
        self.s.copy_(self.s.half().float())
        self.z.copy_(self.z.half().float())

    @torch.no_grad()
    def reassign_(self, w_fp: torch.Tensor) -> int:
        """Give every weight the code of the level nearest its full-precision value ``w_fp`` [out, in]
        under the current ``s``, ``z``; returns how many codes changed."""
        codes = nearest_codes(w_fp, self.s.detach(), self.z.detach(), self.group_size)
        changed = int((codes != self.codes).sum().item())
        self.qweight.copy_(pack_bitplanes(codes, self.bits))
        self.reassigned = True
        return changed

    @torch.no_grad()
    def write_back(self, m: HLQLinear) -> None:
        """Store the parameters into ``m`` as fp16 s, z and (possibly re-assigned) packed codes."""
        m.scales.copy_(self.s.half().cpu())
        m.zeros.copy_(self.z.half().cpu())
        if self.reassigned:  # otherwise m.qweight already holds these codes
            m.qweight.copy_(self.qweight.cpu())


class TrainableTiedRows(nn.Module):
    """The embedding of a model whose quantized embedding is its head's tensor: rows of the head's
    ``TrainableHLQ``, so training moves both uses of the one tensor the checkpoint stores."""

    def __init__(self, head: TrainableHLQ, dtype: torch.dtype):
        super().__init__()
        self.head, self.dtype = head, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, flat = self.head, ids.reshape(-1)
        rows = _Decode.apply(h.qweight[:, flat], h.s[flat], h.z[flat], h.group_size, h.in_features)
        return rows.to(self.dtype).view(*ids.shape, h.in_features)


def trainable_views(module: nn.Module) -> dict[str, TrainableHLQ]:
    """Replace every ``HLQLinear`` inside ``module`` by a ``TrainableHLQ``; returns them by name.  A
    quantized embedding of its own stays frozen: it is a lookup, which ``TrainableHLQ`` (a linear) does not
    model; one that is the head's tensor looks its rows up in the head's view."""
    views = {}
    tied = hasattr(module, "lm_head") and shares_head(module)
    hlq = [(n, m) for n, m in module.named_modules() if isinstance(m, HLQLinear) and not isinstance(m, HLQEmbedding)]
    for name, m in hlq:
        views[name] = TrainableHLQ(m)
        set_module(module, name, views[name])
    if tied:
        emb = module.get_submodule(EMBED)
        set_module(module, EMBED, TrainableTiedRows(views["lm_head"], emb.dtype))
    return views


# ----------------------------------------------------------------------------- reading the inputs


def _load_config_without_quant(path: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    config.__dict__.pop("quantization_config", None)
    return config


def _check_source_matches(
    ckpt: Path, ckpt_cfg, qc: dict, src: Path, src_cfg, ck: SafetensorsDir, source: SafetensorsDir
):
    fix = "pass --source the model this checkpoint was quantized from"
    for k in _SHAPE_FIELDS:
        a, b = getattr(ckpt_cfg, k, None), getattr(src_cfg, k, None)
        if a != b:
            raise ElutqError(f"the source model {src} does not match the checkpoint {ckpt}: {k} is {b}, not {a}; {fix}")
    # 16-bit embeddings in the checkpoint: the source's, rounded, must be the same tensor (quantized ones
    # only the same vocabulary; the shape fields above already match).
    name = "model.embed_tokens.weight"
    if name not in ck:  # shapes from the headers: a rotated source would rotate the whole table to compare
        if ck.shape(f"{embedding_prefix(qc)}.qweight")[1] != source.shape(name)[0]:
            raise ElutqError(
                f"the source model {src} does not match the checkpoint {ckpt}: the vocabularies differ; {fix}"
            )
        return
    orig, stored = source.get(name), ck.get(name)
    if stored.shape != orig.shape or not torch.allclose(
        stored.float(), orig.to(stored.dtype).float(), atol=1e-3, rtol=1e-2
    ):
        raise ElutqError(f"the source model {src} does not match the checkpoint {ckpt}: the embeddings differ; {fix}")


def materialize_quantized(layer: nn.Module, ck: SafetensorsDir, prefix: str, modules: dict) -> nn.Module:
    """A meta-device layer filled from the checkpoint: ``HLQLinear`` where it is quantized, fp32 elsewhere."""
    for name, lin in [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]:
        spec = modules.get(prefix + name)
        if spec is not None:
            set_module(
                layer,
                name,
                HLQLinear(
                    lin.in_features,
                    lin.out_features,
                    spec["bits"],
                    module_group_size(spec, lin.in_features),
                    bias=lin.bias is not None,
                ),
            )
    layer = layer.to_empty(device="cpu")
    for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
        v = ck.get(prefix + name)
        t.data = v if name.endswith((".qweight", ".scales", ".zeros")) else v.to(torch.float32)
        t.requires_grad_(False)
    return layer


# ----------------------------------------------------------------------------- one layer


@dataclass
class LayerResult:
    start_val: float  # held-out relative MSE before training
    best_val: float  # held-out relative MSE of the state written (fp16 parameters)
    steps: int
    best_step: int
    curve: list[list[float]] = field(default_factory=list)  # [step, held-out error] at each evaluation


def _forward(layer: nn.Module, x: torch.Tensor, pos) -> torch.Tensor:
    out = layer(x, attention_mask=None, position_embeddings=pos)
    return out[0] if isinstance(out, tuple) else out


def block_error(yq: torch.Tensor, y: torch.Tensor, norm_w: torch.Tensor | None) -> torch.Tensor:
    """Per-token error of a block's output ``yq`` against the fp model's ``y`` ([..., hidden]).

    ``norm_w`` (the weight of the RMSNorm that reads the stream next): the error as that norm passes it on,
    ``‖w∘(yq − y)‖² / ‖w∘y‖²`` per token (``"normed"``).  Plain MSE over the stream (``None``) is not what the
    model computes with: a few tokens (the attention sinks) and channels carry most of the stream's energy
    (the first token alone 78-98% of it from the default model's layer 12 on), so it fits those and lets every
    other token drift; the norm divides each token by its own scale and weighs each channel as the next layer
    reads it."""
    d = yq - y
    if norm_w is None:
        return d.pow(2).mean(-1)
    return (d * norm_w).pow(2).sum(-1) / (y * norm_w).pow(2).sum(-1).clamp_min(1e-20)


def next_norm(layer: int, n_layers: int) -> str:
    """The RMSNorm weight that reads decoder layer ``layer``'s output: the next layer's input norm, or the final one."""
    return f"{layer_prefix(layer + 1)}input_layernorm.weight" if layer + 1 < n_layers else "model.norm.weight"


def _loss(yq: torch.Tensor, y: torch.Tensor, norm_w: torch.Tensor | None) -> torch.Tensor:
    """The training objective: mean ``block_error``; plain MSE relative to the stream's mean square."""
    e = block_error(yq, y, norm_w).mean()
    return e if norm_w is not None else e / y.pow(2).mean()


def _val_error(layer: nn.Module, xs: list[torch.Tensor], ys: list[torch.Tensor], pos, dev: torch.device,
               norm_w: torch.Tensor | None = None) -> float:
    """The held-out error: mean normed ``block_error`` per token, or (``norm_w`` None) the relative MSE
    ``Σ(yq - y)² / Σy²`` over the held-out chunks."""
    num = den = 0.0
    with torch.no_grad():
        for x, y in zip(xs, ys, strict=True):
            y = y.to(dev)
            e = block_error(run_layer(layer, x.to(dev), pos), y, norm_w)
            num += e.sum().item()
            den += e.numel() if norm_w is not None else y.pow(2).mean(-1).sum().item()
    return num / max(den, 1e-30)


def train_layer(
    layer: nn.Module,
    views: dict[str, TrainableHLQ],
    x_q: list[torch.Tensor],
    y_fp: list[torch.Tensor],
    pos,
    cfg: FinetuneConfig,
    layer_idx: int,
    progress: bool = True,
    fp_weights: dict[str, torch.Tensor] | None = None,
    norm_w: torch.Tensor | None = None,
) -> LayerResult:
    """Train the views' ``s``, ``z`` so ``layer(x_q) ≈ y_fp``; leaves the best held-out state, fp16-rounded.

    ``norm_w``: the next RMSNorm's weight, for the error as it sees it (``block_error``); ``None``: plain MSE.

    ``fp_weights`` (the full-precision weight of each view, by name): after every epoch but the last,
    re-assign each weight's code to its nearest level (``cfg.reassign_codes``); the codes are then part
    of the state the held-out check keeps."""
    dev = torch.device(cfg.device)
    n_val = max(1, round(len(x_q) * cfg.val_fraction))
    if len(x_q) - n_val < 1:
        raise ElutqError(
            f"{len(x_q)} calibration chunks leave none for training after {n_val} held out; "
            "pass more --calib-samples or a smaller --batch-size"
        )
    train_idx, val_idx = list(range(len(x_q) - n_val)), list(range(len(x_q) - n_val, len(x_q)))
    xv, yv = [x_q[k] for k in val_idx], [y_fp[k] for k in val_idx]
    params = [p for v in views.values() for p in (v.s, v.z)]
    state = params + ([v.qweight for v in views.values()] if fp_weights else [])
    for v in views.values():
        v.round_()

    def snapshot() -> list[torch.Tensor]:
        return [p.detach().clone() for p in state]

    start = best = _val_error(layer, xv, yv, pos, dev, norm_w)
    best_state, best_step = snapshot(), 0
    curve = [[0, start]]
    total = cfg.epochs * len(train_idx)
    if total == 0 or not params:
        return LayerResult(start, best, 0, 0, curve)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = int(cfg.warmup_frac * total)

    def lr_at(step: int) -> float:  # linear warmup, then cosine to 0
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    eval_every = cfg.eval_every or len(train_idx)
    # Seeded per layer, so a resumed run draws the same batches as an uninterrupted one.
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + layer_idx)
    order = [train_idx[k] for e in range(cfg.epochs) for k in torch.randperm(len(train_idx), generator=gen).tolist()]
    bar = tqdm(order, desc=f"layer {layer_idx}", unit="step", leave=False, disable=not progress)
    bad_evals, step, running = 0, 0, None
    for step, k in enumerate(bar, start=1):
        y = y_fp[k].to(dev)
        loss = _loss(_forward(layer, x_q[k].to(dev), pos), y, norm_w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % eval_every == 0 or step == total:
            # Judge the state as it would be written: fp16-rounded, then go on from the fp32 one.
            fp32 = snapshot()
            for v in views.values():
                v.round_()
            val = _val_error(layer, xv, yv, pos, dev, norm_w)
            curve.append([step, val])
            if val < best:
                best, best_state, best_step, bad_evals = val, snapshot(), step, 0
            else:
                bad_evals += 1
            with torch.no_grad():
                for p, t in zip(state, fp32, strict=True):
                    p.copy_(t)
            bar.set_postfix(loss=f"{running:.3e}", val=f"{val:.3e}", best=f"{best:.3e}")
            if cfg.patience and bad_evals >= cfg.patience:
                break
        else:
            bar.set_postfix(loss=f"{running:.3e}", best=f"{best:.3e}")
        if fp_weights and step % len(train_idx) == 0 and step < total:  # an epoch ended, another follows
            for name, v in views.items():
                v.reassign_(fp_weights[name])
    bar.close()
    with torch.no_grad():
        for p, t in zip(state, best_state, strict=True):
            p.copy_(t)
    return LayerResult(start, best, step, best_step, curve)


# ----------------------------------------------------------------------------- the stage


@dataclass
class FinetuneReport:
    seconds: float = 0.0
    layers: list[dict] = field(default_factory=list)  # per layer: start_val, best_val, steps, best_step
    resumed_from: int = 0  # block: layers done before; e2e: steps done before
    calib_source: str | None = None
    peak_rss_mb: float = 0.0
    e2e: dict | None = None  # the e2e stage's E2EResult


@dataclass
class _Inputs:
    """A finetuning run's inputs, checked, and its work directory (``run``: progress read or fresh)."""

    ckpt: Path
    qc: dict
    config: Any
    ck: SafetensorsDir
    source: SafetensorsDir | RotatedSource
    tokenizer: Any
    run: Run


def _open_run(
    checkpoint: str | Path, source_model: str, out: str | Path, cfg: FinetuneConfig, resume: bool, overwrite: bool,
    fresh: dict,
) -> _Inputs:
    from transformers import AutoTokenizer

    ckpt, out = Path(checkpoint), Path(out)
    qc = read_quantization_config(ckpt)
    if out.resolve() == ckpt.resolve():
        raise ElutqError(f"the output {out} is the input checkpoint; write the finetuned model elsewhere")
    check_output(out, overwrite)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ElutqError(f"--device {cfg.device} was asked for but torch sees no CUDA device; use --device cpu")
    src_dir = resolve_source_dir(source_model)
    config, src_config = _load_config_without_quant(ckpt), _load_config_without_quant(src_dir)
    check_architecture(config)
    # A rotated checkpoint's layers are trained against the rotated source's (the same function)
    ck, source = SafetensorsDir(ckpt), open_source(src_dir, src_config, rotation_from_spec(qc.get("rotation")))
    _check_source_matches(ckpt, config, qc, src_dir, src_config, ck, source)
    tokenizer = AutoTokenizer.from_pretrained(ckpt if (ckpt / "tokenizer_config.json").exists() else src_dir)
    inputs = {"checkpoint": ck.fingerprint(), "source": source.fingerprint(), "settings": cfg.settings()}
    run = Run.open(out, fingerprint(inputs), fresh, resume, overwrite, inputs="checkpoint, source or settings")
    return _Inputs(ckpt, qc, config, ck, source, tokenizer, run)


def finetune_block(
    checkpoint: str | Path,
    source_model: str,
    out: str | Path,
    cfg: FinetuneConfig = FinetuneConfig(),
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> FinetuneReport:
    """Block reconstruction of the quantized ``checkpoint`` against ``source_model`` into ``out``."""
    t0 = time.perf_counter()
    fresh = {"layers_done": 0, "hidden": {}, "layers": []}
    inp = _open_run(checkpoint, source_model, out, cfg, resume, overwrite, fresh)
    run, ck, config = inp.run, inp.ck, inp.config
    skeleton = meta_model(config)
    rotate_mlps(skeleton, rotation_from_spec(inp.qc.get("rotation")))
    report = FinetuneReport(resumed_from=run.layers_done)
    modules: dict = inp.qc["modules"]
    dev = torch.device(cfg.device)

    ids, report.calib_source = calibration_ids(inp.tokenizer, cfg.calib, model=inp.source.dir)
    pos = position_embeddings(config, cfg.calib.seqlen, dev, skeleton)
    if run.layers_done == 0:
        emb = inp.source.get(f"{EMBED}.weight").to(torch.float32)
        # The quantized model embeds with its stored table (16-bit or quantized).
        emb_q = stored_embedding(ck.get, inp.qc, config.hidden_size)
        chunks = [ids[i : i + cfg.batch_size] for i in range(0, ids.shape[0], cfg.batch_size)]
        acts = {HIDDEN_FP: Activations([emb[c] for c in chunks]), HIDDEN_Q: Activations([emb_q[c] for c in chunks])}
        del emb, emb_q
    else:
        acts = run.activations()

    n_layers = len(skeleton.model.layers)

    def step(i: int, layer: nn.Module, acts: dict[str, Activations]) -> LayerStep:
        prefix = layer_prefix(i)
        fp_layer = materialize(copy.deepcopy(layer), inp.source, prefix).to(dev)
        y_fp = acts[HIDDEN_FP].map(functools.partial(run_layer, fp_layer, pos=pos), None)
        # The fp weights stay only when codes are re-assigned against them.
        fp_w = ({n: m.weight.detach() for n, m in fp_layer.named_modules() if isinstance(m, nn.Linear)}
                if cfg.reassign_codes else None)
        del fp_layer
        q_layer = materialize_quantized(layer, ck, prefix, modules)
        hlq = {n: m for n, m in q_layer.named_modules() if isinstance(m, HLQLinear)}
        views = trainable_views(q_layer)
        q_layer.to(dev)
        norm_w = ck.get(next_norm(i, n_layers)).to(dev, torch.float32) if cfg.block_loss == "normed" else None
        res = train_layer(q_layer, views, acts[HIDDEN_Q].chunks, y_fp.chunks, pos, cfg, i, progress, fp_w, norm_w)
        del fp_w
        x_q = acts[HIDDEN_Q].map(lambda x: run_layer(q_layer, x, pos), None)  # the written (fp16) parameters
        tensors = {}
        for name, v in views.items():
            v.write_back(hlq[name])
            tensors[f"{prefix}{name}.scales"] = hlq[name].scales.contiguous()
            tensors[f"{prefix}{name}.zeros"] = hlq[name].zeros.contiguous()
            tensors[f"{prefix}{name}.qweight"] = hlq[name].qweight.contiguous()  # changed only by reassign_codes
        # Everything else of the layer is copied from the checkpoint unchanged.
        for k in ck.weight_map:
            if k.startswith(prefix) and k not in tensors:
                tensors[k] = ck.get(k).contiguous()
        postfix = {"err": f"{res.start_val:.2e}→{res.best_val:.2e}"}
        return LayerStep(tensors, {HIDDEN_FP: y_fp, HIDDEN_Q: x_q}, asdict(res), postfix)

    run_layers(run, skeleton.model.layers, step, acts, progress)
    report.layers = list(run.entries)

    _write_rest(inp, len(skeleton.model.layers), cfg, report)
    move_into_place(run.work, run.out, overwrite)
    report.seconds = time.perf_counter() - t0
    report.peak_rss_mb = peak_rss_mb()
    return report


def _write_rest(inp: _Inputs, n_layers: int, cfg: FinetuneConfig, report: FinetuneReport) -> None:
    """Non-layer tensors (embeddings, norm, lm_head) copied, index, config and tokenizer; progress removed."""
    ck, work = inp.ck, inp.run.work
    prefixes = tuple(layer_prefix(i) for i in range(n_layers))
    head = {k: ck.get(k).contiguous() for k in ck.weight_map if not k.startswith(prefixes)}
    atomic_save(head, work / "model-head.safetensors", {"format": "pt"})
    entry = {
        "stage": cfg.stage,
        "settings": cfg.settings(),
        "calibration_text": report.calib_source,
        # per layer [before, after]: "normed" block_error per token, or the relative MSE ("mse")
        "held_out_block_error": [[r["start_val"], r["best_val"]] for r in report.layers],
        "held_out_curves": [r["curve"] for r in report.layers],  # per layer: [step, error] at each evaluation
    }
    _write_config(inp.ckpt, work, inp.qc, entry, inp.tokenizer, index=True, close=inp.run.close)


def _write_config(ckpt: Path, work: Path, qc: dict, entry: dict, tokenizer, index: bool = False, close=None) -> None:
    """The input checkpoint's config.json with this stage appended to its finetuning history, and the rest
    of a checkpoint (``finish_checkpoint``)."""
    cfg_dict = json.loads((ckpt / "config.json").read_text())
    cfg_dict["quantization_config"]["finetune"] = [*qc.get("finetune", []), entry]
    finish_checkpoint(work, cfg_dict, tokenizer, generation_from=ckpt, index=index, close=close)


def _maybe_stop_for_test_at(step: int) -> None:
    """Tests simulate a crash right after the state of step ``step`` is saved (ELUTQ_TEST_CRASH_AFTER_STEP)."""
    if os.environ.get("ELUTQ_TEST_CRASH_AFTER_STEP") == str(step):
        os._exit(17)


# ----------------------------------------------------------------------------- end to end

TEACHER_DIR = "teacher"
E2E_STATE_FILE = "e2e-state.safetensors"


@dataclass
class E2EResult:
    loss: str
    start_val: float  # held-out loss before training (KL to the teacher, or cross-entropy)
    best_val: float  # held-out loss of the state written (fp16 parameters)
    steps: int
    best_step: int
    curve: list[list[float]] = field(default_factory=list)  # [step, held-out loss] at each evaluation


@torch.no_grad()
def _write_teacher(skeleton, source: SafetensorsDir, chunks: list[torch.Tensor], pos, work: Path, dev, progress,
                   topk: int = 0):
    """The fp model's next-token log-probabilities on each chunk of calibration ids (all of them in fp16, or the
    top ``topk`` and the rest's mass: ``_teacher_record``), one file per chunk.  Streamed one decoder layer at a
    time, so the teacher is never resident."""
    emb = source.get("model.embed_tokens.weight").to(torch.float32)
    hs = [emb[c] for c in chunks]
    head = source.get("lm_head.weight").to(torch.float32) if "lm_head.weight" in source else emb
    del emb
    layers = skeleton.model.layers
    for i in tqdm(range(len(layers)), desc="teacher", unit="layer", disable=not progress, leave=False):
        layer = materialize(copy.deepcopy(layers[i]), source, f"model.layers.{i}.", dev)
        hs = [run_layer(layer, h.to(dev), pos).cpu() for h in hs]
        del layer
    norm = materialize(copy.deepcopy(skeleton.model.norm), source, "model.norm.", dev)
    if NORM_ROTATION in source:  # a rotated tied model: the norm's weight in the rotated basis
        rot = source.get(NORM_ROTATION).to(device=dev, dtype=torch.float32)
        norm = nn.Sequential(norm, nn.Linear(rot.shape[0], rot.shape[0], bias=False, device=dev))
        norm[1].weight.data = rot.T.contiguous()
    (work / TEACHER_DIR).mkdir(exist_ok=True)
    head = head.to(dev)
    for k, h in enumerate(hs):
        h = norm(h.to(dev)).flatten(0, 1)  # [B·T, H]
        parts: dict[str, list[torch.Tensor]] = {}
        for r in range(0, h.shape[0], LOSS_ROWS):  # one slice of the vocabulary projection at a time
            logp = (h[r : r + LOSS_ROWS] @ head.T).log_softmax(-1)
            for name, t in _teacher_record(logp, topk).items():
                parts.setdefault(name, []).append(t.cpu())
        b, n = hs[k].shape[:2]
        rec = {name: torch.cat(ts).reshape(b, n, *ts[0].shape[1:]).contiguous() for name, ts in parts.items()}
        atomic_save(rec, work / TEACHER_DIR / f"chunk-{k:05d}.safetensors")


LOSS_ROWS = 128  # positions whose logits over the vocabulary exist at once (teacher and student alike)


def _teacher_record(logp: torch.Tensor, topk: int) -> dict[str, torch.Tensor]:
    """What is kept of the teacher's log-probabilities ``logp [rows, V]``: all of them (fp16), or the ``topk``
    largest with their token ids and the log of the mass left over (fp32: a few numbers per position)."""
    if not topk or topk >= logp.shape[-1]:
        return {"logp": logp.half()}
    values, index = logp.topk(topk, dim=-1)
    rest = logp.scatter(-1, index, float("-inf")).logsumexp(-1)
    return {"top_logp": values.float(), "top_index": index.int(), "rest_logp": rest.float()}


def _kl_rows(logits: torch.Tensor, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ over rows of KL(teacher ‖ student) for student ``logits [rows, V]``: over the whole vocabulary, or, for
    a top-k teacher, over its k tokens plus one bin holding everything else (a lower bound that is exact when
    the rest has no mass)."""
    logq = logits.float().log_softmax(-1)
    if "logp" in teacher:
        logp = teacher["logp"].float()
        return (logp.exp() * (logp - logq)).sum()
    logp, index, rest = teacher["top_logp"], teacher["top_index"].long(), teacher["rest_logp"]
    q_top = logq.gather(-1, index)
    q_rest = logq.scatter(-1, index, float("-inf")).logsumexp(-1)
    kl = (logp.exp() * (logp - q_top)).sum(-1) + rest.exp() * (rest - q_rest)
    return kl.sum()


def e2e_loss(model: nn.Module, ids: torch.Tensor, teacher: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """The loss per position; the vocabulary projection and the loss go ``LOSS_ROWS`` positions at a time, each
    slice recomputed in the backward pass (activation checkpointing), so no ``[B, T, vocab]`` tensor exists."""
    h = model.model(input_ids=ids, use_cache=False).last_hidden_state.flatten(0, 1)  # [B·T, H]
    if teacher is None:  # causal-LM loss on the calibration text: position t predicts t + 1
        rows = torch.arange(h.shape[0], device=h.device).reshape(ids.shape)[:, :-1].flatten()
        h, targets = h[rows], ids[:, 1:].flatten()
    else:
        teacher = {k: v.flatten(0, 1) for k, v in teacher.items()}
    # The head's weight is decoded once per step (a trainable view decodes it from its scales on every call),
    # outside the recomputed slices: they keep a reference to it, not a copy.
    head = model.lm_head
    w = head.weight() if callable(head.weight) else head.weight
    bias = head.bias

    def logits(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    total = h.new_zeros((), dtype=torch.float32)
    for r in range(0, h.shape[0], LOSS_ROWS):
        part = slice(r, r + LOSS_ROWS)
        if teacher is None:
            fn = lambda x, t: nn.functional.cross_entropy(logits(x).float(), t, reduction="sum")  # noqa: E731
            total = total + recompute(fn, h[part], targets[part], use_reentrant=False)
        else:
            t = {k: v[part] for k, v in teacher.items()}
            total = total + recompute(lambda x, t=t: _kl_rows(logits(x), t), h[part], use_reentrant=False)
    return total / h.shape[0]


def finetune_e2e(
    checkpoint: str | Path,
    source_model: str,
    out: str | Path,
    cfg: FinetuneConfig,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> FinetuneReport:
    """End-to-end tuning of every quantized linear's scales and offsets of ``checkpoint`` (codes
    frozen) with the KL divergence to ``source_model``'s next-token distribution (``cfg.loss='kl'``)
    or the causal-LM loss (``'ce'``), whole model at once with gradient checkpointing, into ``out``.

    The teacher's log-probabilities are computed once, streamed layer by layer, and kept on disk in
    the run's work directory.  After every held-out evaluation the parameters, the optimizer state
    and the best state so far are saved there, so ``resume=True`` continues a killed run and gives
    the same checkpoint as an uninterrupted one."""
    from .checkpoint import load_quantized

    if cfg.stage != "e2e":
        raise ValueError("finetune_e2e needs a FinetuneConfig with stage='e2e'")
    t0 = time.perf_counter()
    inp = _open_run(checkpoint, source_model, out, cfg, resume, overwrite, {"teacher_done": False, "step": 0})
    run = inp.run
    work, dev, state = run.work, torch.device(cfg.device), run.state
    report = FinetuneReport(resumed_from=state["step"])

    ids, report.calib_source = calibration_ids(inp.tokenizer, cfg.calib, model=inp.source.dir)
    chunks = [ids[i : i + cfg.batch_size] for i in range(0, ids.shape[0], cfg.batch_size)]
    n_val = max(1, round(len(chunks) * cfg.val_fraction))
    train_idx, val_idx = list(range(len(chunks) - n_val)), list(range(len(chunks) - n_val, len(chunks)))
    if not train_idx:
        raise ElutqError(
            f"{len(chunks)} calibration chunks leave none for training after {n_val} held out; "
            "pass more --calib-samples or a smaller --batch-size"
        )
    if cfg.loss == "kl" and not state["teacher_done"]:
        skeleton = meta_model(inp.config)
        rotate_mlps(skeleton, rotation_from_spec(inp.qc.get("rotation")))
        pos = position_embeddings(inp.config, cfg.calib.seqlen, dev, skeleton)
        _write_teacher(skeleton, inp.source, chunks, pos, work, dev, progress, cfg.teacher_topk)
        del skeleton
        run.save(teacher_done=True)
    if isinstance(inp.source, RotatedSource):
        inp.source.release()  # training reads no source tensor

    def teacher(k: int) -> dict[str, torch.Tensor] | None:
        if cfg.loss != "kl":
            return None
        return {n: t.to(dev) for n, t in load_file(str(work / TEACHER_DIR / f"chunk-{k:05d}.safetensors")).items()}

    model, _, _ = load_quantized(inp.ckpt)
    for p in model.parameters():
        p.requires_grad_(False)
    views = trainable_views(model)
    model.to(dev)
    model.config.use_cache = False
    # Activation checkpointing: each decoder layer's activations are recomputed in the backward pass.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers < 5.24
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    names = sorted(views)
    params = [p for n in names for p in (views[n].s, views[n].z)]
    for v in views.values():
        v.round_()

    def val_loss(model: nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            loss = sum(e2e_loss(model, chunks[k].to(dev), teacher(k)).item() for k in val_idx) / len(val_idx)
        model.train()
        return loss

    total = cfg.epochs * len(train_idx)
    eval_every = cfg.eval_every or len(train_idx)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = [train_idx[k] for e in range(cfg.epochs) for k in torch.randperm(len(train_idx), generator=gen).tolist()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = int(cfg.warmup_frac * total)

    def lr_at(step: int) -> float:  # step counts from 0: linear warmup, then cosine to 0
        if step < warm:
            return cfg.lr * (step + 1) / warm
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))

    step = state["step"]
    if step == 0:
        best = start = val_loss(model)
        best_state, best_step = [p.detach().clone() for p in params], 0
        curve = [[0, start]]
    else:  # resume: parameters, optimizer moments and the best state as saved after an evaluation
        saved = load_file(str(work / E2E_STATE_FILE))
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(saved[f"param.{i}"])
                opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": saved[f"exp_avg.{i}"].to(dev),
                                "exp_avg_sq": saved[f"exp_avg_sq.{i}"].to(dev)}  # fmt: skip
        best_state = [saved[f"best.{i}"].to(dev) for i in range(len(params))]
        start, best, best_step = state["start_val"], state["best_val"], state["best_step"]
        curve = state.get("curve") or [[0, start]]

    model.train()
    bar = tqdm(total=total, initial=step, desc="e2e", unit="step", disable=not progress)
    running = None
    while step < total:
        k = order[step]
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss = e2e_loss(model, chunks[k].to(dev), teacher(k))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        release_free_memory()  # the step's freed temporaries, so the next one starts from an unfragmented heap
        step += 1
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}", best=f"{best:.4f}")
        if step % eval_every and step != total:
            continue
        # Judge the state as it would be written (fp16-rounded), then go on from the fp32 one.
        fp32 = [p.detach().clone() for p in params]
        for v in views.values():
            v.round_()
        val = val_loss(model)
        curve.append([step, val])
        if val < best:
            best, best_state, best_step = val, [p.detach().clone() for p in params], step
        with torch.no_grad():
            for p, t in zip(params, fp32, strict=True):
                p.copy_(t)
        del fp32
        tensors = {}
        for i, p in enumerate(params):
            st = opt.state[p]
            tensors[f"param.{i}"], tensors[f"best.{i}"] = p.detach().cpu(), best_state[i].cpu()
            tensors[f"exp_avg.{i}"], tensors[f"exp_avg_sq.{i}"] = st["exp_avg"].cpu(), st["exp_avg_sq"].cpu()
        atomic_save({k: t.contiguous() for k, t in tensors.items()}, work / E2E_STATE_FILE)
        run.save(step=step, start_val=start, best_val=best, best_step=best_step, curve=curve)
        bar.set_postfix(loss=f"{running:.4f}", val=f"{val:.4f}", best=f"{best:.4f}")
        _maybe_stop_for_test_at(step)
    bar.close()

    with torch.no_grad():
        for p, t in zip(params, best_state, strict=True):
            p.copy_(t)
    updated = {}
    for n in names:
        updated[f"{n}.scales"] = views[n].s.detach().half().cpu().contiguous()
        updated[f"{n}.zeros"] = views[n].z.detach().half().cpu().contiguous()
    # The model and the optimizer go before the checkpoint's tensors are read for the output.
    del model, views, params, opt, best_state
    release_free_memory()
    report.e2e = asdict(E2EResult(cfg.loss, start, best, step, best_step, curve))
    tensors = {k: updated.get(k, inp.ck.get(k)).contiguous() for k in inp.ck.weight_map}
    atomic_save(tensors, work / WEIGHTS_FILE, {"format": "pt"})
    history_entry = {
        "stage": "e2e",
        "settings": cfg.settings(),
        "calibration_text": report.calib_source,
        "held_out_loss": [start, best],
        "held_out_curve": curve,  # [step, loss] at each evaluation
    }

    def close() -> None:
        run.close()
        (work / E2E_STATE_FILE).unlink(missing_ok=True)
        shutil.rmtree(work / TEACHER_DIR, ignore_errors=True)

    _write_config(inp.ckpt, work, inp.qc, history_entry, inp.tokenizer, close=close)
    move_into_place(work, run.out, overwrite)
    report.seconds = time.perf_counter() - t0
    report.peak_rss_mb = peak_rss_mb()
    return report
