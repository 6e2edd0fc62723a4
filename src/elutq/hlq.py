"""The HLQ weight format: per (row, group) ``w ≈ z + Σ_i s_i·b_i`` with ``b_i ∈ {0, 1}``.

One fp16 scale per bit-plane (``s_i``) and one fp16 offset (``z``) per row × group.  Uniform
asymmetric INT-q is the special case ``s_i = 2^i·Δ``, so both formats share one representation,
one checkpoint layout and one kernel.

Shapes (W is ``[out, in]``, ``g`` the group size, ``ng = ceil(in / g)``):

- ``codes``   uint8 ``[out, in]``, values in ``[0, 2^bits)``; bit ``i`` of a code is ``b_i``.
- ``scales``  fp16 ``[out, ng, bits]``.
- ``zeros``   fp16 ``[out, ng]``.
- ``qweight`` uint8 ``[bits, out, ceil(in / 8)]``: plane ``i``, row ``r``, byte ``k`` holds ``b_i``
  of columns ``8k .. 8k+7``, column ``8k + j`` in bit ``j`` (LSB first).  Columns past ``in`` are 0.

When ``g`` does not divide ``in`` the last group is shorter.  Fitting pads it to ``g`` columns
with weight 0, so padding never changes the fitted parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Format = Literal["hlq", "uniform"]
FORMATS = ("hlq", "uniform")
GROUP_SIZES = (32, 64, 128)
# Elements processed per chunk while fitting: bounds temporary memory to a few hundred MB.
_CHUNK_ELEMS = 1 << 22


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize one linear layer.  ``group_size=-1`` means one group per row."""

    bits: int = 2
    group_size: int = 128
    format: Format = "hlq"
    iters: int = 20  # ALS iterations (HLQ only)

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 4:
            raise ValueError(f"bits must be 1, 2, 3 or 4 (got {self.bits!r}); pass e.g. --bits 2")
        if self.group_size not in (*GROUP_SIZES, -1):
            raise ValueError(
                f"group size must be one of {GROUP_SIZES} or -1 for per-channel "
                f"(got {self.group_size!r}); pass e.g. --group-size 128"
            )
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS} (got {self.format!r})")
        if self.iters < 0:
            raise ValueError(f"iters must be >= 0 (got {self.iters})")

    def group_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def num_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def bits_per_weight(bits: int, group_size: int) -> float:
    """Nominal storage cost: q code bits plus (q + 1) fp16 parameters shared by g weights."""
    return bits + 16 * (bits + 1) / group_size


@dataclass
class QuantizedWeight:
    """A quantized ``[out, in]`` matrix in HLQ form (see the module docstring for shapes)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int

    @property
    def bits(self) -> int:
        return self.scales.shape[-1]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.zeros, self.group_size).to(dtype)

    def pack(self) -> torch.Tensor:
        return pack_bitplanes(self.codes, self.bits)

    @classmethod
    def unpack(
        cls, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int, group_size: int
    ) -> QuantizedWeight:
        return cls(unpack_bitplanes(qweight, in_features), scales, zeros, group_size)

    def storage_bits(self) -> int:
        out, in_features = self.shape
        return self.bits * out * math.ceil(in_features / 8) * 8 + 16 * (self.scales.numel() + self.zeros.numel())


# ----------------------------------------------------------------------------- packing


def pack_bitplanes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` uint8 ``[out, in]`` → ``qweight`` uint8 ``[bits, out, ceil(in/8)]`` (LSB first)."""
    out, n = codes.shape
    pad = (-n) % 8
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, pad)).view(out, -1, 8)
    # uint8 all the way: temporaries stay the size of the codes (an lm_head has ~10^8 of them).
    planes = torch.zeros(bits, out, c.shape[1], dtype=torch.uint8, device=codes.device)
    for i in range(bits):
        for k in range(8):
            planes[i] |= ((c[:, :, k] >> i) & 1) << k
    return planes


def unpack_bitplanes(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitplanes`: ``[bits, out, ceil(in/8)]`` → codes ``[out, in]``."""
    bits, out, nbytes = qweight.shape
    shifts = torch.arange(8, dtype=torch.uint8, device=qweight.device).view(1, 1, 1, 8)
    b = (qweight.unsqueeze(-1) >> shifts) & 1  # [bits, out, nbytes, 8]
    b = b.reshape(bits, out, nbytes * 8)[:, :, :in_features]
    codes = torch.zeros(out, in_features, dtype=torch.uint8, device=qweight.device)
    for i in range(bits):
        codes |= b[i] << i
    return codes


# ----------------------------------------------------------------------------- levels & codes


def plane_bits(bits: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """``[2^bits, bits]`` matrix whose row k holds the bit-planes of code k."""
    k = torch.arange(1 << bits, device=device)
    return ((k.unsqueeze(1) >> torch.arange(bits, device=device)) & 1).to(dtype)


def levels(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """All ``2^bits`` reconstruction levels: ``[..., bits]``, ``[...]`` → ``[..., 2^bits]``.

    Summed plane by plane in order, then the offset added (not a matmul, whose order a BLAS picks), so the
    native decode (``csrc/decode.cpp``) computes the same floats."""
    pb = plane_bits(scales.shape[-1], scales.dtype, scales.device)  # [2^bits, bits]
    acc = torch.zeros(*scales.shape[:-1], pb.shape[0], dtype=scales.dtype, device=scales.device)
    for i in range(pb.shape[1]):
        acc = acc + scales[..., i, None] * pb[:, i]
    return zeros.unsqueeze(-1) + acc


def assign_nearest(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Code of the nearest level for each weight.  ``w [N, g]``, ``scales [N, q]``, ``zeros [N]`` (on the CPU in
    native code, ``csrc/fit.cpp``; :func:`assign_nearest_reference` is the torch version)."""
    if w.device.type == "cpu" and 1 <= scales.shape[-1] <= 4 and w.shape[0] > 0:
        from . import _native

        codes = torch.empty(w.shape, dtype=torch.uint8)
        _native.hlq_assign(_f32(w), _f32(scales), _f32(zeros), codes.numpy())
        return codes
    return assign_nearest_reference(w, scales, zeros)


def _f32(t: torch.Tensor):
    return t.detach().to(torch.float32).contiguous().numpy()


def assign_nearest_reference(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """:func:`assign_nearest` in torch (any device)."""
    lv = levels(scales, zeros)
    sorted_lv, order = lv.sort(dim=-1)
    mid = (sorted_lv[:, 1:] + sorted_lv[:, :-1]) * 0.5
    pos = torch.searchsorted(mid.contiguous(), w.contiguous())
    return order.gather(1, pos).to(torch.uint8)


def decode(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Grouped codes ``[N, g]`` → values, with ``scales [N, q]`` and ``zeros [N]``."""
    return levels(scales, zeros).gather(1, codes.long())


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, rows: int = 1024
) -> torch.Tensor:
    """Float32 ``[out, in]`` from codes ``[out, in]``, scales ``[out, ng, q]``, zeros ``[out, ng]``."""
    out, n = codes.shape
    ng = scales.shape[1]
    g = group_size
    w = torch.empty(out, n, dtype=torch.float32, device=codes.device)
    grad = torch.is_grad_enabled() and (scales.requires_grad or zeros.requires_grad)  # autograd: the torch code
    native = codes.device.type == "cpu" and codes.dtype == torch.uint8 and 1 <= scales.shape[-1] <= 4 and out > 0
    if native and not grad:
        from . import _native  # the same floats as below (csrc/fit.cpp), without gather's int64 index

        _native.hlq_dequantize(codes.contiguous().numpy(), _f32(scales), _f32(zeros), g, w.numpy())
        return w
    # A block of rows at a time: gather's int64 index is 8 bytes per weight (0.2 GB for one
    # 8192 × 3072 matrix), and the quantizer's peak RSS is made of such temporaries.
    for r in range(0, out, rows):
        c = torch.nn.functional.pad(codes[r : r + rows], (0, ng * g - n)).view(-1, g)
        blk = decode(c, scales[r : r + rows].float().reshape(c.shape[0], -1), zeros[r : r + rows].float().reshape(-1))
        w[r : r + rows] = blk.view(-1, ng * g)[:, :n]
    return w


# ----------------------------------------------------------------------------- fitting
# All fitters take groups as rows: w [N, g] and an element weight h [N, g] or [1, g] (0 = padding).


def fit_uniform_minmax(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max INT-q as HLQ parameters: ``s_i = 2^i·Δ``, ``z = min``."""
    # Padding repeats a real column, so it never moves the min or max.
    lo, hi = w.amin(1), w.amax(1)
    delta = (hi - lo) / ((1 << bits) - 1)
    scales = delta.unsqueeze(1) * (2.0 ** torch.arange(bits, dtype=w.dtype, device=w.device))
    return scales, lo


def uniform_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest on the uniform grid (``scales[:, 0]`` is Δ)."""
    delta = scales[:, :1]
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    q = torch.round((w - zeros.unsqueeze(1)) / safe)
    return q.clamp(0, (1 << scales.shape[1]) - 1).to(torch.uint8)


def weighted_sq_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-group ``Σ h·(w − ŵ)²``."""
    return ((w - wq) ** 2 * h).sum(1)


def solve_scales(w: torch.Tensor, codes: torch.Tensor, bits: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form weighted least squares for ``[s; z]`` with the codes fixed (batched over groups).

    A tiny ridge keeps all-0/all-1 planes solvable; callers keep the old solution wherever the new
    one is not better, so the ridge can never raise the error.
    """
    # Gram and right-hand side depend only on per-code sums, so accumulate those first:
    # mass[n, k] = Σ h over weights with code k, moment[n, k] = Σ h·w over them.
    n_codes = 1 << bits
    idx = codes.long()
    hw = h.expand_as(w).to(torch.float64)
    mass = torch.zeros(w.shape[0], n_codes, dtype=torch.float64, device=w.device).scatter_add_(1, idx, hw)
    moment = torch.zeros_like(mass).scatter_add_(1, idx, hw * w.to(torch.float64))
    p = torch.cat([plane_bits(bits, torch.float64, w.device), mass.new_ones(n_codes, 1)], 1)
    gram = torch.einsum("ki,nk,kj->nij", p, mass, p)
    rhs = moment @ p
    ridge = 1e-9 * gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)
    gram = gram + ridge.view(-1, 1, 1) * torch.eye(bits + 1, dtype=torch.float64, device=w.device)
    x = torch.linalg.solve(gram, rhs.unsqueeze(-1)).squeeze(-1).to(w.dtype)
    return x[:, :bits], x[:, bits]


def fit_hlq_als(
    w: torch.Tensor, bits: int, h: torch.Tensor, iters: int = 10, history: list[float] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternating least squares from the min-max uniform start.

    Each iteration (a) assigns every weight its nearest level and (b) re-solves ``[s; z]`` in closed
    form for those codes.  Both steps are optimal given the other, and a group only takes a new
    solution when it lowers its error, so the error never increases.  ``history`` (if given)
    receives the total weighted squared error after init and after each iteration.

    On the CPU this runs in native code (``csrc/fit.cpp``: the same steps group by group, 3-10× faster,
    ``benchmarks/bench_fit.py``); :func:`fit_hlq_als_reference` is the torch version it is tested against,
    used on other devices and for ``history``.
    """
    if history is None and w.device.type == "cpu" and h.device.type == "cpu" and h.shape[0] in (1, w.shape[0]) \
            and w.shape[0] > 0:
        from . import _native

        scales = torch.empty(w.shape[0], bits)
        zeros = torch.empty(w.shape[0])
        _native.hlq_fit_als(_f32(w), _f32(h), bits, iters, scales.numpy(), zeros.numpy())
        return scales.to(w.dtype), zeros.to(w.dtype)
    return fit_hlq_als_reference(w, bits, h, iters, history)


def fit_hlq_als_reference(
    w: torch.Tensor, bits: int, h: torch.Tensor, iters: int = 10, history: list[float] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fit_hlq_als` in torch (any device): groups advanced together, an active set for those still
    improving."""
    scales, zeros = fit_uniform_minmax(w, bits)
    codes = uniform_codes(w, scales, zeros)
    err = weighted_sq_error(w, decode(codes, scales, zeros), h)
    if history is not None:
        history.append(err.sum().item())
    # A group whose step did not lower its error keeps its parameters, so every later step would
    # recompute exactly the same thing: only groups that improved stay active (an exact shortcut).
    active: torch.Tensor | None = None  # None: all groups
    for _ in range(iters):
        if active is None:
            wa, ha, sa, za, ea = w, h, scales, zeros, err
        else:
            wa, sa, za, ea = w[active], scales[active], zeros[active], err[active]
            ha = h if h.shape[0] == 1 else h[active]
        codes = assign_nearest(wa, sa, za)
        new_s, new_z = solve_scales(wa, codes, bits, ha)
        new_err = weighted_sq_error(wa, decode(codes, new_s, new_z), ha)
        better = new_err < ea
        sa = torch.where(better.unsqueeze(1), new_s, sa)
        za = torch.where(better, new_z, za)
        ea = torch.minimum(new_err, ea)
        if active is None:
            scales, zeros, err = sa, za, ea
            active = torch.nonzero(better).squeeze(1)
        else:
            scales[active], zeros[active], err[active] = sa, za, ea
            active = active[better]
        if history is not None:
            history.append(err.sum().item())
        if active.numel() == 0:
            if history is not None:  # keep one entry per iteration
                history.extend([history[-1]] * (iters - len(history) + 1))
            break
    return scales, zeros


def fit_hlq_adam(
    w: torch.Tensor, bits: int, h: torch.Tensor, steps: int = 200, lr: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient variant: Adam on ``[s; z]`` with codes re-assigned to the nearest level each step.

    Starts from min-max uniform and returns, per group, the best parameters seen.  Useful as a
    template for objectives without a closed form; for plain MSE, ALS is faster and as good.
    """
    s0, z0 = fit_uniform_minmax(w, bits)
    span = (s0.sum(1, keepdim=True).abs() + 1e-12).detach()
    # Optimise in units of the group's range so one learning rate suits every group.
    s = (s0 / span).clone().requires_grad_(True)
    z = (z0 / span.squeeze(1)).clone().requires_grad_(True)
    wn = w / span
    opt = torch.optim.Adam([s, z], lr=lr)
    best_s, best_z = s0.clone(), z0.clone()
    best_err = weighted_sq_error(w, decode(uniform_codes(w, s0, z0), s0, z0), h)
    for _ in range(steps):
        with torch.no_grad():
            codes = assign_nearest(wn, s, z)
        err = weighted_sq_error(wn, decode(codes, s, z), h)
        with torch.no_grad():
            real_err = err * span.squeeze(1) ** 2
            better = real_err < best_err
            best_err = torch.where(better, real_err, best_err)
            best_s = torch.where(better.unsqueeze(1), s * span, best_s)
            best_z = torch.where(better, z * span.squeeze(1), best_z)
        opt.zero_grad()
        err.sum().backward()
        opt.step()
    return best_s.detach(), best_z.detach()


def _group_rows(w: torch.Tensor, g: int) -> torch.Tensor:
    """``[out, in]`` → ``[out·ng, g]``, the short last group padded by repeating its last column."""
    out, n = w.shape
    ng = num_groups(n, g)
    pad = ng * g - n
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out, pad)], dim=1)
    return w.reshape(out * ng, g)


def nearest_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Codes ``[out, in]`` of the level nearest each weight of ``w [out, in]`` under the groups'
    ``scales [out, ng, q]`` and ``zeros [out, ng]``."""
    out, n = w.shape
    ng = scales.shape[1]
    c = assign_nearest(_group_rows(w.float(), group_size), scales.reshape(out * ng, -1), zeros.reshape(-1))
    return c.view(out, ng * group_size)[:, :n]


def _group_weights(importance: torch.Tensor | None, n: int, g: int) -> torch.Tensor:
    """Per-column element weights in grouped form ``[ng, g]`` (padding columns get 0)."""
    ng = num_groups(n, g)
    h = torch.ones(n) if importance is None else importance.float().reshape(n)
    if (h < 0).any() or not torch.isfinite(h).all():
        raise ValueError("importance weights must be finite and >= 0")
    return torch.nn.functional.pad(h, (0, ng * g - n)).view(ng, g)


def quantize_weight(
    w: torch.Tensor,
    config: QuantConfig,
    importance: torch.Tensor | None = None,
    fitter: Literal["als", "adam"] = "als",
) -> QuantizedWeight:
    """Quantize a ``[out, in]`` matrix.  ``importance`` is an optional per-input-column weight
    (e.g. the Hessian diagonal) for the error being minimised."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight matrix, got shape {tuple(w.shape)}")
    w = w.detach().float().cpu()
    if not torch.isfinite(w).all():
        raise ValueError("weight matrix contains NaN or inf; check the source checkpoint")
    out, n = w.shape
    g = config.group_for(n)
    ng = num_groups(n, g)
    hg = _group_weights(importance, n, g)  # [ng, g]
    rows = _group_rows(w, g)  # [out*ng, g]
    scales = torch.empty(out * ng, config.bits)
    zeros = torch.empty(out * ng)
    codes = torch.empty(out * ng, g, dtype=torch.uint8)
    step = max(ng, (_CHUNK_ELEMS // g) // ng * ng)  # whole rows per chunk, so weights line up
    for a in range(0, out * ng, step):
        wc = rows[a : a + step]
        hc = hg.repeat(wc.shape[0] // ng, 1)
        if config.format == "uniform":
            s, z = fit_uniform_minmax(wc, config.bits)
        elif fitter == "adam":
            s, z = fit_hlq_adam(wc, config.bits, hc)
        else:
            s, z = fit_hlq_als(wc, config.bits, hc, iters=config.iters)
        # Stored precision is fp16: round first, then choose codes against the stored levels.
        s, z = s.half().float(), z.half().float()
        c = uniform_codes(wc, s, z) if config.format == "uniform" else assign_nearest(wc, s, z)
        scales[a : a + step], zeros[a : a + step], codes[a : a + step] = s, z, c
    return QuantizedWeight(
        codes=codes.view(out, ng * g)[:, :n].contiguous(),
        scales=scales.view(out, ng, config.bits).half(),
        zeros=zeros.view(out, ng).half(),
        group_size=g,
    )
