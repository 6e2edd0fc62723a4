"""GPTQ for HLQ and uniform weights, in blocks of exactly one quantization group.

For a linear layer ``y = W x`` and calibration inputs ``X``, GPTQ quantizes W column by column and
spreads each column's error over the columns not yet quantized, using the inverse Hessian
``H⁻¹`` of the layer-wise loss (``H = 2·X Xᵀ / n``).  Per group we

1. fit the group's levels (HLQ: ALS; uniform: min-max) on the *error-compensated* weights,
2. quantize its columns one at a time, re-choosing each column's codes against those levels
   (``codes="per-column"``), or freeze all codes at fitting time (``codes="fixed"``),
3. propagate the group's error to the remaining columns.

Act-order (``act_order=True``) visits groups in order of decreasing Hessian mass and, inside a
group, columns by decreasing ``diag(H)``.  Groups stay contiguous in the original column order, so
the checkpoint layout and the kernels are unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from .hlq import (
    QuantConfig,
    QuantizedWeight,
    assign_nearest,
    fit_hlq_als,
    fit_uniform_minmax,
    levels,
    num_groups,
    uniform_codes,
)

CodesMode = Literal["per-column", "fixed"]


FP64_MAX_FEATURES = 4096


def hessian_dtype(n_features: int) -> torch.dtype:
    """fp64 for Hessians up to 4096 wide (cheap, and robust to ill-conditioning); wider ones in fp32,
    as the reference GPTQ does throughout: an 8192-wide fp64 Hessian alone is 0.5 GB, a quarter of
    the 2 GB a 3B model's quantization is meant to fit in."""
    return torch.float64 if n_features <= FP64_MAX_FEATURES else torch.float32


class Hessian:
    """Running ``H = 2/n · Σ x xᵀ`` over the rows ``x`` of every batch of layer inputs."""

    def __init__(self, n_features: int, device: torch.device | str | None = None):
        self.h = torch.zeros(n_features, n_features, dtype=hessian_dtype(n_features), device=device)
        self.n = 0

    def add(self, x: torch.Tensor, block: int = 1024) -> None:
        x = x.reshape(-1, x.shape[-1]).to(device=self.h.device, dtype=torch.float32)
        self.h.mul_(self.n / (self.n + x.shape[0]))
        self.n += x.shape[0]
        # One batch's XᵀX in fp32 (a few thousand rows: rounding stays ~1e-6 relative, and it is
        # several times faster than fp64), the running sum in H's dtype; a block of rows at a time, so
        # the temporary stays small next to a wide Hessian.
        for b in range(0, self.h.shape[0], block):
            self.h[b : b + block].add_(x[:, b : b + block].T @ x, alpha=2.0 / self.n)


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹ = UᵀU``, λ = damp · mean(diag H), in fp32.

    ``h`` (symmetric, fp64 or fp32: :func:`hessian_dtype`) is consumed.  On the CPU all three LAPACK
    steps run in place in ``h``'s memory, so a large Hessian needs no second copy; elsewhere torch's
    functions, which allocate their results.
    """
    lam = damp * h.diagonal().mean().clamp_min(1e-12).item()
    if h.device.type != "cpu":
        return _inverse_hessian_factor_torch(h, lam, damp)
    from scipy.linalg import lapack

    h = h.contiguous()
    diag = h.diagonal().clone()
    # h is symmetric, so its row-major buffer read column-major (a = hᵀ as numpy sees it) is the same
    # matrix, in the Fortran order LAPACK overwrites in place.  dpotrf(lower=1) writes only a's lower
    # triangle = h's upper one: h's strict lower triangle keeps the original values for a retry.
    a = h.numpy().T
    potrf, potri = lapack.get_lapack_funcs(("potrf", "potri"), (a,))
    for _ in range(5):
        h.diagonal().copy_(diag + lam)
        c, info = potrf(a, lower=1, clean=0, overwrite_a=1)
        if info == 0:
            break
        _restore_upper_from_lower(h)
        lam += diag.mean().item() * damp  # more damping
    else:
        raise RuntimeError("Hessian is not positive definite even after extra damping")
    c, info = potri(c, lower=1, overwrite_c=1)  # (H + λI)⁻¹, lower triangle
    if info != 0:
        raise RuntimeError(f"inverting the Hessian failed (LAPACK potri info={info})")
    # Its lower Cholesky factor L (inverse = L·Lᵀ), other triangle zeroed: read row-major, that is
    # Lᵀ = U, the upper factor with inverse = UᵀU — in the layout the column loop wants.
    c, info = potrf(c, lower=1, clean=1, overwrite_a=1)
    if info != 0:
        raise RuntimeError(f"the inverse Hessian is not positive definite (LAPACK potrf info={info})")
    if c.ctypes.data != a.ctypes.data:
        raise RuntimeError("LAPACK did not factor the Hessian in place")
    del a, c
    return h.float()  # no copy when h is fp32


def _restore_upper_from_lower(h: torch.Tensor, block: int = 512) -> None:
    """Copy ``h``'s strict lower triangle onto its upper one, a block of rows at a time."""
    n = h.shape[0]
    for b in range(0, n, block):
        e = min(n, b + block)
        h[b:e, e:] = h[e:, b:e].t()
        blk = h[b:e, b:e]
        blk.copy_(blk.tril(-1) + blk.tril(-1).t() + torch.diag(blk.diagonal()))


def _inverse_hessian_factor_torch(h: torch.Tensor, lam: float, damp: float) -> torch.Tensor:
    h.diagonal().add_(lam)
    for _ in range(5):
        chol, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            break
        h.diagonal().add_(h.diagonal().mean() * damp)  # more damping
    else:
        raise RuntimeError("Hessian is not positive definite even after extra damping")
    del h
    inv = torch.cholesky_inverse(chol)
    del chol
    u = torch.linalg.cholesky(inv, upper=True)
    del inv
    return u.float()


def _permute_symmetric_(h: torch.Tensor, perm: torch.Tensor, block: int = 512) -> None:
    """``h ← h[perm][:, perm]`` in place: rows along the permutation's cycles (one row of scratch),
    then columns a block of rows at a time."""
    order = perm.tolist()
    if order == list(range(len(order))):
        return  # no act-order: nothing moves
    seen = [False] * len(order)
    for i in range(len(order)):
        if seen[i] or order[i] == i:
            continue
        first, j = h[i].clone(), i
        while True:
            seen[j] = True
            k = order[j]
            if k == i:
                h[j] = first
                break
            h[j] = h[k]
            j = k
    for b in range(0, h.shape[0], block):
        h[b : b + block] = h[b : b + block].index_select(1, perm)


@contextlib.contextmanager
def _cpu_threads(n: int, device: torch.device) -> Iterator[None]:
    """Run the body with ``n`` intra-op CPU threads (restored afterwards).

    GPTQ's column loop is thousands of small ops; with several threads each op pays a barrier, and
    when the cores are shared that barrier can wait for a descheduled thread (measured 20x slower
    with 2 threads than with 1 on a busy 2-core machine).
    """
    before = torch.get_num_threads()
    if device.type != "cpu" or before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class GPTQPlan:
    """What GPTQ derives from one Hessian, shared by every linear reading the same input (q/k/v, gate/up)."""

    groups: list[torch.Tensor]  # column indices of each group, in visiting order
    perm: torch.Tensor  # all columns in visiting order
    u: torch.Tensor  # upper Cholesky factor of (H + λI)⁻¹ in visiting order, fp32
    importance: torch.Tensor  # diag(H) in visiting order, fp32
    dead: torch.Tensor  # inputs that are always zero


@torch.no_grad()
def gptq_plan(
    h: torch.Tensor,
    group_size: int,
    damp: float = 0.01,
    act_order: bool = False,
    device: torch.device | None = None,
    consume: bool = False,
) -> GPTQPlan:
    """Visiting order and inverse-Hessian factor for ``h [in, in]`` with groups of ``group_size``.

    ``consume=True`` lets it overwrite and free ``h`` (saves a copy of a large Hessian)."""
    given = h
    h = h.to(device=device or h.device, dtype=hessian_dtype(h.shape[0]))
    if not consume and h.data_ptr() == given.data_ptr():
        h = h.clone()  # (a conversion above already made a private copy)
    n = h.shape[0]
    dead = h.diagonal() == 0  # inputs that are always zero: their weights cannot matter
    h.diagonal()[dead] = 1.0
    # Column visiting order: groups (contiguous in the original order) by decreasing Hessian mass,
    # columns inside a group by decreasing diag(H).
    diag = h.diagonal().clone()
    groups = [
        torch.arange(j * group_size, min((j + 1) * group_size, n), device=h.device)
        for j in range(num_groups(n, group_size))
    ]
    if act_order:
        groups = sorted(groups, key=lambda cols: -diag[cols].sum().item())
        groups = [cols[torch.argsort(diag[cols], descending=True, stable=True)] for cols in groups]
    perm = torch.cat(groups)
    _permute_symmetric_(h, perm)
    u = _inverse_hessian_factor(h, damp)
    del h
    return GPTQPlan(groups, perm, u, diag[perm].float(), dead)


@torch.no_grad()
def gptq_quantize_weight(
    w: torch.Tensor,
    h: torch.Tensor | None,
    config: QuantConfig,
    damp: float = 0.01,
    act_order: bool = False,
    codes: CodesMode = "per-column",
    weighted_fit: bool = True,
    plan: GPTQPlan | None = None,
) -> QuantizedWeight:
    """GPTQ-quantize ``w [out, in]`` with Hessian ``h [in, in]`` (see the module docstring).

    ``weighted_fit`` fits each group's levels with ``diag(H)`` as per-column importance.  ``plan``
    (from :func:`gptq_plan` with the same group size; then ``h``, ``damp`` and ``act_order`` are not
    used) saves refactoring the Hessian for linears that share it.  The math runs on ``w``'s
    device; the result is returned on the CPU.
    """
    out, n = w.shape
    dev = w.device
    g = config.group_for(n)
    ng = num_groups(n, g)
    if plan is None:
        plan = gptq_plan(h, g, damp, act_order, dev)
    # Work on Wᵀ in visiting order: the column loop below then reads and updates contiguous rows.
    # (Permute before widening to fp32: one full-size copy fewer for a 16-bit lm_head.)
    wt = w.detach().t()[plan.perm].float()
    wt[plan.dead[plan.perm]] = 0.0
    u = plan.u

    scales = torch.zeros(out, ng, config.bits, device=dev)
    zeros = torch.zeros(out, ng, device=dev)
    q_codes = torch.zeros(n, out, dtype=torch.uint8, device=dev)  # transposed, like wt
    a = 0
    for cols in plan.groups:
        b = a + cols.numel()
        gi = int(cols.min().item()) // g  # index of this group in the stored layout
        with _cpu_threads(1, dev):
            err = _quantize_group(wt, u, a, b, q_codes, scales, zeros, gi, plan.importance, config, codes, weighted_fit)
        wt[b:] -= u[a:b, b:].t() @ err  # the group's error, fed to every later column (all threads)
        a = b
    del wt
    codes_out = q_codes.t()[:, torch.argsort(plan.perm)].cpu()  # back to [out, in], original column order
    return QuantizedWeight(codes_out, scales.half().cpu(), zeros.half().cpu(), g)


def _quantize_group(
    wt: torch.Tensor,
    u: torch.Tensor,
    a: int,
    b: int,
    q_codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    gi: int,
    importance: torch.Tensor,
    config: QuantConfig,
    codes: CodesMode,
    weighted_fit: bool,
) -> torch.Tensor:
    """Fit one group's levels on rows ``a:b`` of ``wt``, quantize them column by column with error
    feedback inside the group; fills ``q_codes``, ``scales``, ``zeros`` and returns the scaled errors."""
    out, dev = wt.shape[1], wt.device
    block = wt[a:b].t()  # [out, g] view of the error-compensated weights
    if config.format == "uniform":
        s, z = fit_uniform_minmax(block, config.bits)
    else:
        imp = importance[a:b].unsqueeze(0) if weighted_fit else torch.ones(1, b - a, device=dev)
        s, z = fit_hlq_als(block, config.bits, imp, iters=config.iters)
    s, z = s.half().float(), z.half().float()  # the stored precision defines the levels
    scales[:, gi], zeros[:, gi] = s, z
    lv = levels(s, z)
    if codes == "fixed":
        fixed = uniform_codes(block, s, z) if config.format == "uniform" else assign_nearest(block, s, z)
        fixed_t = fixed.t().contiguous()
        fixed_q = lv.gather(1, fixed.long()).t().contiguous()
    else:
        # Sorted levels and their midpoints, once per group: each column is then one comparison.
        sorted_lv, order = lv.sort(dim=1)
        mid = (sorted_lv[:, 1:] + sorted_lv[:, :-1]) * 0.5

    err = torch.empty(b - a, out, device=dev)
    for j in range(b - a):
        col = wt[a + j]
        if codes == "fixed":
            c, q = fixed_t[j], fixed_q[j]
        else:
            pos = (col.unsqueeze(1) > mid).sum(1, keepdim=True)  # index of the nearest sorted level
            c, q = order.gather(1, pos).squeeze(1), sorted_lv.gather(1, pos).squeeze(1)
        q_codes[a + j] = c
        e = (col - q) / u[a + j, a + j]
        wt[a + j + 1 : b] -= u[a + j, a + j + 1 : b].unsqueeze(1) * e.unsqueeze(0)
        err[j] = e
    return err
