"""Bit-serial LUT kernels for HLQ weights (native; see ``docs/KERNELS.md`` and ``csrc/lut.h``).

``LUTLinear`` computes ``y = W x`` straight from the packed bit-planes without dequantizing ``W``::

    lin = LUTLinear(quantize_weight(w, QuantConfig(bits=2, group_size=128)))
    y = lin(x)                      # x: [in] or [N, in], numpy or torch; y: same kind, float32
    y64 = lin.reference(x)          # float64 oracle decoding the same quantized parameters
    q, k, v = multi_linear([lq, lk, lv], x)   # one set of activation tables for all three

The kernel layout is produced from the checkpoint tensors by :func:`repack`; the file format never
depends on it.  The SIMD path is chosen at run time (``ELUTQ_KERNEL=scalar|avx2|avx512|neon`` forces
one); :func:`set_num_threads` sizes the persistent worker pool.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch

from elutq import _native
from elutq.hlq import QuantizedWeight

ArrayLike = Union[np.ndarray, torch.Tensor]  # noqa: UP007 (runtime alias)
KERNEL_GROUP_SIZES = (32, 64, 128)
ROW_BLOCK = 16  # rows per tile (csrc/lut.h: kRowBlock)


def available_paths() -> list[str]:
    """Kernel paths this CPU can run, e.g. ``['scalar', 'avx2', 'avx512']``."""
    return list(_native.available_paths())


def active_path() -> str:
    """The path used when none is given: ``$ELUTQ_KERNEL`` if set, else the best available."""
    return str(_native.default_path())


def cpu_features() -> dict[str, bool]:
    """SIMD features of this CPU as detected at run time, e.g. ``{'avx512bf16': True, ...}``."""
    return dict(_native.cpu_features())


def set_num_threads(n: int) -> None:
    """Number of threads (including the caller) the kernels split output rows over."""
    _native.set_num_threads(int(n))


def get_num_threads() -> int:
    return int(_native.get_num_threads())


def kernel_group_size(in_features: int, group_size: int) -> int:
    """Group size the kernel runs with: ``group_size`` itself, or 128 for per-channel scales
    (a single group per row, or any multiple of 128), whose parameters are then replicated."""
    if group_size in KERNEL_GROUP_SIZES:
        return group_size
    if group_size == -1 or group_size >= in_features or group_size % 128 == 0:
        return 128
    raise ValueError(f"group size {group_size} is not supported by the LUT kernels (use 32, 64, 128 or per-channel)")


def repack(
    qweight: torch.Tensor | np.ndarray,
    scales: torch.Tensor | np.ndarray,
    zeros: torch.Tensor | np.ndarray,
    in_features: int,
    group_size: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Checkpoint tensors → kernel layout ``(w, sz, kernel_group_size)`` (see ``csrc/lut.h``).

    ``qweight`` uint8 ``[bits, out, ceil(in/8)]``, ``scales`` fp16 ``[out, ng, bits]``, ``zeros`` fp16
    ``[out, ng]``.  Rows are padded to a multiple of 16 and columns to ``ng_k·g_k``; then

    - ``w`` uint8 ``[nrb, ng_k, bits, g_k/32, 64]``: chunk byte ``p = 4m + j`` holds, for row ``16rb+m``,
      the nibble of run ``k0 + j`` (low) and of run ``k0 + 4 + j`` (high), ``k0 = G·g_k/4 + 8L``, where
      the nibble of run ``k`` is columns ``4k..4k+3`` of the plane (bit t = column 4k+t);
    - ``sz`` uint16 (fp16 bits) ``[nrb, ng_k, bits + 1, 16]``: the 16 rows' plane scales, then zeros.
    """
    q = _to_numpy(qweight, np.uint8, "qweight")
    s = _to_numpy(scales, np.float16, "scales")
    z = _to_numpy(zeros, np.float16, "zeros")
    if q.ndim != 3:
        raise ValueError(f"qweight must be [bits, out, ceil(in/8)], got shape {q.shape}")
    bits, out, nbytes = q.shape
    if not 1 <= bits <= 4:
        raise ValueError(f"LUT kernels support 1-4 bits, got {bits}")
    if nbytes != math.ceil(in_features / 8):
        need = math.ceil(in_features / 8)
        raise ValueError(f"qweight has {nbytes} bytes per row, in_features={in_features} needs {need}")
    g = in_features if group_size == -1 else group_size
    ng = math.ceil(in_features / g)
    if s.shape != (out, ng, bits) or z.shape != (out, ng):
        raise ValueError(f"scales {s.shape} / zeros {z.shape} do not match [out={out}, ng={ng}, bits={bits}]")
    gk = kernel_group_size(in_features, g)
    ngk = math.ceil(in_features / gk)
    nl = gk // 32
    nrb = math.ceil(out / ROW_BLOCK)
    out_pad, in_pad = nrb * ROW_BLOCK, ngk * gk

    qp = np.zeros((bits, out_pad, in_pad // 8), dtype=np.uint8)
    qp[:, :out, :nbytes] = q
    nib = np.stack([qp & 15, qp >> 4], axis=-1).reshape(bits, nrb, ROW_BLOCK, ngk, nl, 2, 4)  # run k = 8L+4h+j
    t = nib.transpose(1, 3, 0, 4, 2, 6, 5)  # [nrb, ngk, bits, nl, m, j, h]
    w = np.ascontiguousarray(t[..., 0] | (t[..., 1] << 4)).reshape(-1)

    gmap = (np.arange(ngk) * gk) // g  # original group of each kernel group
    par = np.zeros((out_pad, ngk, bits + 1), dtype=np.float16)
    par[:out, :, :bits] = s[:, gmap, :]
    par[:out, :, bits] = z[:, gmap]
    sz = np.ascontiguousarray(par.reshape(nrb, ROW_BLOCK, ngk, bits + 1).transpose(0, 2, 3, 1)).view(np.uint16)
    return w, sz.reshape(-1), gk


class LUTLinear:
    """``y = W x`` for one HLQ-quantized ``[out, in]`` matrix, computed by the native LUT kernels.

    ``path`` pins a kernel path (``'scalar'``, ``'avx2'``, ``'avx512'``, ``'neon'``); default: the
    active path at construction time.
    """

    def __init__(self, qw: QuantizedWeight, path: str | None = None) -> None:
        self._init(qw.pack(), qw.scales, qw.zeros, qw.shape[1], qw.group_size, path)

    @classmethod
    def from_packed(
        cls,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        in_features: int,
        group_size: int,
        path: str | None = None,
    ) -> LUTLinear:
        """From checkpoint tensors (``qweight`` bit-planes, fp16 ``scales`` and ``zeros``)."""
        self = cls.__new__(cls)
        self._init(qweight, scales, zeros, in_features, group_size, path)
        return self

    def _init(
        self,
        qweight: ArrayLike,
        scales: ArrayLike,
        zeros: ArrayLike,
        in_features: int,
        group_size: int,
        path: str | None,
    ) -> None:
        w, sz, gk = repack(qweight, scales, zeros, in_features, group_size)
        self.bits = int(_to_numpy(qweight, np.uint8, "qweight").shape[0])
        self.in_features = int(in_features)
        self.out_features = int(_to_numpy(zeros, np.float16, "zeros").shape[0])
        self.group_size = int(in_features if group_size == -1 else group_size)
        self.path = path or active_path()
        if self.path not in available_paths():
            raise ValueError(f"kernel path {self.path!r} is not available here (available: {available_paths()})")
        # The avx2 path reads its own byte order (csrc/lut.h), applied when the matrix is copied in.
        self._packed = _native.PackedWeight(
            w, sz, self.out_features, self.in_features, self.bits, gk, avx2_order=self.path == "avx2"
        )
        # kept for the float64 reference
        self._qweight, self._scales, self._zeros = qweight, scales, zeros

    @property
    def nbytes(self) -> int:
        """Bytes of packed weights and scales the kernel streams per call."""
        return int(self._packed.nbytes)

    def __repr__(self) -> str:
        return (
            f"LUTLinear(in={self.in_features}, out={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, path={self.path!r})"
        )

    def __call__(self, x: ArrayLike, *, float_tables: bool = False, residual_tables: bool = False) -> ArrayLike:
        """``x`` [in] or [N, in] (numpy or torch, real floating) → float32 [out] or [N, out], same kind.

        ``float_tables=True`` uses unquantized float tables (scalar; for accuracy checks);
        ``residual_tables=True`` also looks up int8 tables of the tables' rounding error at the same
        indices (~250× less table error, twice the lookups; one pass over the weights on AVX2/AVX-512)."""
        return multi_linear([self], x, float_tables=float_tables, residual_tables=residual_tables)[0]

    def dequantize(self) -> np.ndarray:
        """The decoded weight ``[out, in]`` in float64 (``z + Σ_i s_i·b_i`` per group)."""
        q = _to_numpy(self._qweight, np.uint8, "qweight")
        s = _to_numpy(self._scales, np.float16, "scales").astype(np.float64)
        z = _to_numpy(self._zeros, np.float16, "zeros").astype(np.float64)
        cols = np.arange(self.in_features)
        bit = (q[:, :, cols // 8] >> (cols % 8).astype(np.uint8)) & 1  # [bits, out, in]
        grp = cols // self.group_size
        w = z[:, grp].copy()
        for i in range(self.bits):
            w += s[:, grp, i] * bit[i]
        return w

    def reference(self, x: ArrayLike) -> ArrayLike:
        """Float64 oracle: decode the same quantized parameters and multiply in float64."""
        xn, is_torch, vec = _check_input(x, self.in_features)
        y = xn.astype(np.float64) @ self.dequantize().T
        y = y[0] if vec else y
        return torch.from_numpy(y) if is_torch else y


def multi_linear(
    layers: Sequence[LUTLinear], x: ArrayLike, *, float_tables: bool = False, residual_tables: bool = False
) -> list[ArrayLike]:
    """Apply several matrices reading the same input (q/k/v, gate/up), building its tables once.

    All layers need the same ``in_features``, group size and path."""
    if not layers:
        raise ValueError("multi_linear needs at least one layer")
    first = layers[0]
    for lay in layers[1:]:
        if (lay.in_features, lay.group_size, lay.path) != (first.in_features, first.group_size, first.path):
            raise ValueError("layers sharing tables need equal in_features, group size and kernel path")
    xn, is_torch, vec = _check_input(x, first.in_features)
    xn = np.ascontiguousarray(xn, dtype=np.float32)
    outs = [np.empty((xn.shape[0], lay.out_features), dtype=np.float32) for lay in layers]
    _native.matmul([lay._packed for lay in layers], xn, outs, first.path, float_tables, 0, residual_tables)
    res: list[ArrayLike] = [o[0] if vec else o for o in outs]
    return [torch.from_numpy(r) for r in res] if is_torch else res


def decode_planes(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int, group_size: int
) -> torch.Tensor:
    """The float32 weight ``[out, in]`` from packed bit-planes ``qweight [bits, out, ⌈in/8⌉]``, ``scales
    [out, ng, bits]`` and ``zeros [out, ng]``: ``hlq.dequantize``'s values, bit for bit, without unpacking
    the codes (``csrc/decode.h``; CPU tensors)."""
    w = torch.empty(qweight.shape[1], in_features, dtype=torch.float32)
    _native.hlq_decode(qweight.contiguous().numpy(), scales.detach().float().contiguous().numpy(),
                       zeros.detach().float().contiguous().numpy(), in_features, group_size, w.numpy())
    return w


def decode_planes_grad(qweight: torch.Tensor, grad: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``w = decode(qweight, s, z)`` and ``grad = ∂L/∂w [out, in]``: ``(∂L/∂s [out, ng, bits], ∂L/∂z
    [out, ng])``, summed in float64 per group (``csrc/decode.h``; CPU tensors)."""
    bits, out, _ = qweight.shape
    ng = -(-grad.shape[1] // group_size)
    gs = torch.empty(out, ng, bits, dtype=torch.float32)
    gz = torch.empty(out, ng, dtype=torch.float32)
    _native.hlq_decode_grad(qweight.contiguous().numpy(), grad.detach().float().contiguous().numpy(), group_size,
                            gs.numpy(), gz.numpy())
    return gs, gz


# ----------------------------------------------------------------------------- helpers


def _to_numpy(a: ArrayLike, dtype: type, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        if a.dtype == torch.bfloat16:
            a = a.float()
        a = a.numpy()
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype}")
    return a


def _check_input(x: ArrayLike, in_features: int) -> tuple[np.ndarray, bool, bool]:
    """→ (2-D float32 numpy array, input was torch, input was a vector)."""
    is_torch = isinstance(x, torch.Tensor)
    if is_torch:
        t = x.detach().cpu()
        if not t.is_floating_point():
            raise TypeError(f"activations must be a floating tensor, got {t.dtype}")
        xn = t.float().numpy()
    elif isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"activations must be a floating array, got {x.dtype}")
        xn = x.astype(np.float32, copy=False)
    else:
        raise TypeError(f"activations must be a numpy array or torch tensor, got {type(x).__name__}")
    if xn.ndim not in (1, 2) or xn.shape[-1] != in_features:
        raise ValueError(f"activations must have shape [{in_features}] or [N, {in_features}], got {tuple(xn.shape)}")
    vec = xn.ndim == 1
    return (xn[None, :] if vec else xn), is_torch, vec


__all__ = [
    "LUTLinear",
    "active_path",
    "available_paths",
    "decode_planes",
    "decode_planes_grad",
    "get_num_threads",
    "kernel_group_size",
    "multi_linear",
    "repack",
    "set_num_threads",
]
