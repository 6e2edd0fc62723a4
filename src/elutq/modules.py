"""The torch face of the HLQ format: modules that hold a quantized weight's packed tensors.

``HLQLinear`` multiplies with the dequantized weight (cached until the tensors change): the reference
the native kernels are checked against, and what GPTQ's later layers and finetuning run.
``HLQEmbedding`` looks rows of a quantized embedding up, decoding only those rows.  The tensors are
exactly those of the checkpoint format (``checkpoint.py``): ``qweight`` uint8 ``[bits, out, ceil(in/8)]``,
``scales`` fp16 ``[out, groups, bits]``, ``zeros`` fp16 ``[out, groups]``.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .hlq import QuantizedWeight, dequantize, num_groups, unpack_bitplanes
from .rotation import NORM_MATRIX, Rotation, fast_factors, rotation_from_spec


class HLQLinear(nn.Module):
    """A linear layer stored in HLQ form.  ``forward`` multiplies by the dequantized weight, or, with
    ``kernels`` set to ``"lut"`` (int8 tables, what the runtime runs) or ``"float"`` (exact float tables,
    slow), through the native LUT kernels straight from the bit-planes — on CPU, for inputs that need no
    gradient, at a group size the kernels take; anything else takes the dequantizing path."""

    KERNEL_MODES = ("off", "lut", "float")

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        ng = num_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(bits, out_features, math.ceil(in_features / 8), dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, ng, bits, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, ng, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._cache: tuple[Any, torch.Tensor] | None = None
        self.kernels = "off"
        self._lut: tuple[Any, Any] | None = None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> HLQLinear:
        out, n = qw.shape
        m = cls(n, out, qw.bits, qw.group_size, bias=bias is not None)
        m.qweight.copy_(qw.pack())
        m.scales.copy_(qw.scales)
        m.zeros.copy_(qw.zeros)
        if bias is not None:
            m.bias.data = bias.detach().clone().float()
        return m

    def quantized(self) -> QuantizedWeight:
        codes = unpack_bitplanes(self.qweight, self.in_features)
        return QuantizedWeight(codes, self.scales, self.zeros, self.group_size)

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight ``[out, in]``, cached until the packed tensors change."""
        key = (dtype, self.qweight.data_ptr(), self.scales.data_ptr(), self.zeros.data_ptr(), self.scales._version)
        if self._cache is None or self._cache[0] != key:
            codes = unpack_bitplanes(self.qweight, self.in_features)
            self._cache = (key, dequantize(codes, self.scales, self.zeros, self.group_size).to(dtype))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels != "off" and x.device.type == "cpu" and not x.requires_grad:
            lut = self._kernel()
            if lut is not None:
                y = lut(x.reshape(-1, self.in_features).float(), float_tables=self.kernels == "float")
                y = y.view(*x.shape[:-1], self.out_features)
                return (y if self.bias is None else y + self.bias).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight(x.dtype), bias)

    def _kernel(self):
        """The repacked matrix (``kernels.LUTLinear``), rebuilt when the packed tensors change; None where
        the kernels do not take this group size."""
        from .kernels import LUTLinear, kernel_group_size

        key = (self.qweight.data_ptr(), self.scales.data_ptr(), self.zeros.data_ptr(), self.scales._version)
        if self._lut is None or self._lut[0] != key:
            try:
                kernel_group_size(self.in_features, self.group_size)
            except ValueError:
                self._lut = (key, None)
            else:
                lut = LUTLinear.from_packed(self.qweight, self.scales, self.zeros, self.in_features, self.group_size)
                self._lut = (key, lut)
        return self._lut[1]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


class HLQEmbedding(HLQLinear):
    """A quantized embedding ``[vocab, hidden]``, stored as an ``HLQLinear`` with ``out = vocab``,
    ``in = hidden``; ``forward(ids)`` decodes only the rows it looks up (exactly the dequantized
    weight's rows), so the whole table is never materialised in float."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        if bias:
            raise ValueError("an embedding has no bias")
        super().__init__(in_features, out_features, bits, group_size)
        self.dtype = dtype
        self.tied = False  # its tensors are lm_head's (``tied_to``)

    @classmethod
    def tied_to(cls, head: HLQLinear, dtype: torch.dtype = torch.float32) -> HLQEmbedding:
        """The embedding of a tied model whose quantized head it shares: the same tensors, not a copy (a
        checkpoint then stores them once, as ``lm_head``'s)."""
        m = cls(head.in_features, head.out_features, head.bits, head.group_size, dtype=dtype)
        m.qweight, m.scales, m.zeros = head.qweight, head.scales, head.zeros
        m.tied = True  # survives a move to another device, which copies each buffer on its own
        return m

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Float32 ``[len(ids), hidden]``: rows ``ids`` of the dequantized weight."""
        codes = unpack_bitplanes(self.qweight[:, ids], self.in_features)
        return dequantize(codes, self.scales[ids], self.zeros[ids], self.group_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        return self.rows(flat).to(self.dtype).view(*ids.shape, self.in_features)

    def extra_repr(self) -> str:
        return f"vocab={self.out_features}, hidden={self.in_features}, bits={self.bits}, group_size={self.group_size}"


class RotatedNorm(nn.Module):
    """A rotated tied model's final norm (``rotation.py``): RMSNorm, its ``weight`` (ones: folded), then
    ``h ← h·rotation`` — ``rotation = Qᵀ·diag(w)·Q`` brings the folded weight back in the rotated basis."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)
        self.rotation = nn.Parameter(torch.eye(hidden), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return ((h * self.weight.float()) @ self.rotation.float()).to(x.dtype)


def rotate_final_norm(model: nn.Module) -> RotatedNorm:
    """Put a ``RotatedNorm`` in place of a causal LM's final norm (its tensors load by name); returns it."""
    old = model.model.norm
    eps = getattr(old, "variance_epsilon", None) or getattr(old, "eps", 1e-6)
    new = RotatedNorm(old.weight.shape[0], eps).to(old.weight.device)
    model.model.norm = new
    return new


class OnlineRotation(nn.Module):
    """``u ↦ u·T`` over the last dimension, ``T = diag(s)·(A ⊗ Sylvester_b)/√b`` (``rotation.fast_factors``): a
    fast Walsh–Hadamard transform on runs of ``b``, then the runs mixed by ``A`` — what the native runtime's
    ``hadamard_transform`` computes, differentiable (finetuning trains through it)."""

    def __init__(self, n: int, seed: int):
        super().__init__()
        signs, a = fast_factors(n, seed)
        self.n, self.m = n, a.shape[0]
        # Plain attributes, not buffers: derived from the seed, never in a checkpoint, and untouched by the
        # layer loop's to_empty/materialize (forward moves them where the input is)
        self.signs = torch.from_numpy(signs).float()
        self.a = torch.from_numpy(a).float() / math.sqrt(n // a.shape[0])

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        m, b = self.m, self.n // self.m
        v = (u.float() * self.signs.to(u.device)).reshape(-1, m, b)
        w = 1
        while w < b:  # the pass of width w pairs elements w apart: (x, y) -> (x + y, x - y)
            v = v.reshape(-1, m, b // (2 * w), 2, w)
            v = torch.stack((v[..., 0, :] + v[..., 1, :], v[..., 0, :] - v[..., 1, :]), dim=-2)
            w *= 2
        return torch.einsum("ji,njk->nik", self.a.to(u.device), v.reshape(-1, m, b)).reshape(u.shape).to(u.dtype)


@cache
def _rotated_mlp(cls: type) -> type:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.online_rotation(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))

    return type(f"Rotated{cls.__name__}", (cls,), {"forward": forward})


def rotate_mlps(model: nn.Module, rotation: Rotation | None) -> None:
    """``--rotate full``: every decoder layer's MLP rotates down_proj's input online (its weights hold the
    counterpart).  ``model``: a causal LM (or its meta-device skeleton); a no-op for other rotations."""
    if rotation is None or rotation.kind != "full":
        return
    layers = model.model.layers
    online = OnlineRotation(layers[0].mlp.down_proj.in_features, rotation.seed + 2)
    for layer in layers:
        layer.mlp.__class__ = _rotated_mlp(type(layer.mlp))
        layer.mlp.online_rotation = online


def rotate_modules(model: nn.Module, spec: dict[str, Any] | None) -> None:
    """The modules a checkpoint's ``quantization_config.rotation`` needs, in place (before its tensors load)."""
    rotation = rotation_from_spec(spec)
    if rotation is None:
        return
    if spec.get(NORM_MATRIX):
        rotate_final_norm(model)
    rotate_mlps(model, rotation)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
