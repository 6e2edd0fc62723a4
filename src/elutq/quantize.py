"""Quantize a model's linear layers in place: ``quantize(model, config)``.

Round-to-nearest (RTN) here means: fit each group's HLQ (or uniform) parameters to the weights
alone, with no calibration data.  Every ``nn.Linear`` inside the decoder layers is replaced by an
``HLQLinear``; norms stay in 16 bits, and so do ``lm_head`` and the embeddings unless given a config
(a quantized embedding becomes an ``HLQEmbedding``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import EMBED
from .hlq import QuantConfig, quantize_weight
from .layerloop import layer_prefix
from .models import decoder_layers
from .modules import HLQEmbedding, HLQLinear, set_module
from .pipeline import quantize_layer_rtn


@dataclass
class QuantReport:
    seconds: float = 0.0
    n_params: int = 0
    storage_bits: int = 0
    sq_error: float = 0.0  # Σ (w − ŵ)² over all quantized weights
    mse: dict[str, float] = field(default_factory=dict)  # per module: mean squared weight error

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits / max(self.n_params, 1)

    @property
    def mean_mse(self) -> float:
        """Mean squared weight error over all quantized weights."""
        return self.sq_error / max(self.n_params, 1)


@torch.no_grad()
def quantize_linear(linear: nn.Linear | nn.Embedding, config: QuantConfig) -> tuple[HLQLinear, float, int]:
    """One layer (a linear, or the embedding: an ``HLQEmbedding``): returns the HLQ module, its mean
    squared weight error and its storage bits."""
    w = linear.weight.detach().float()
    qw = quantize_weight(w, config)
    mse = (qw.dequantize() - w).pow(2).mean().item()
    if isinstance(linear, nn.Embedding):
        module = HLQEmbedding.from_quantized(qw)
        module.dtype = linear.weight.dtype  # rows come out in the model's own type, as nn.Embedding's do
        return module, mse, qw.storage_bits()
    return HLQLinear.from_quantized(qw, linear.bias), mse, qw.storage_bits()


@torch.no_grad()
def quantize(
    model: nn.Module,
    config: QuantConfig,
    lm_head: QuantConfig | None = None,
    progress: bool = True,
    embed: QuantConfig | None = None,
) -> QuantReport:
    """RTN-quantize every linear of the decoder layers (and ``lm_head``, the embeddings, if given a config;
    a tied model's head and embeddings quantized alike share one quantized tensor).

    Each decoder layer goes through ``quantize_layer_rtn``, the plug-in `elutq quantize --method rtn`
    runs in its layer loop, so both give the same tensors."""
    layers = decoder_layers(model)
    head_quantized = lm_head is not None and isinstance(getattr(model, "lm_head", None), nn.Linear)
    share = head_quantized and bool(getattr(model.config, "tie_word_embeddings", False))
    if (head_quantized or embed is not None) and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # a quantized head or embedding no longer shares the other
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    report = QuantReport()
    start = time.perf_counter()

    def add(name: str, n: int, mse: float, bits: int) -> None:
        report.mse[name] = mse
        report.n_params += n
        report.sq_error += mse * n
        report.storage_bits += bits

    for i, layer in enumerate(tqdm(layers, desc="quantize", unit="layer", disable=not progress)):
        for name, (linear, module) in quantize_layer_rtn(layer, config).items():
            w, qw = linear.weight.detach().float(), module.quantized()
            add(layer_prefix(i) + name, w.numel(), (qw.dequantize() - w).pow(2).mean().item(), qw.storage_bits())
    others = {"lm_head": lm_head} if head_quantized else {}
    if embed is not None and not (share and embed == lm_head):
        others[EMBED] = embed
    for name, cfg in others.items():
        linear = model.get_submodule(name)
        module, mse, bits = quantize_linear(linear, cfg)
        set_module(model, name, module)
        add(name, linear.weight.numel(), mse, bits)
    if embed is not None and EMBED not in others:  # one quantized tensor serves both, as one float one did
        set_module(model, EMBED, HLQEmbedding.tied_to(model.lm_head, dtype=model.get_submodule(EMBED).weight.dtype))
    report.seconds = time.perf_counter() - start
    return report
