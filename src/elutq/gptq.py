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


class Hessian:
    """Running ``H = 2/n · Σ x xᵀ`` over the rows ``x`` of every batch of layer inputs."""

    def __init__(self, n_features: int):
        self.h = torch.zeros(n_features, n_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.h.mul_(self.n / (self.n + x.shape[0]))
        self.n += x.shape[0]
        self.h.addmm_(x.T, x, alpha=2.0 / self.n)


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``, λ = damp · mean(diag H)."""
    h = h.clone()
    h += torch.eye(h.shape[0], dtype=h.dtype) * (damp * h.diagonal().mean().clamp_min(1e-12))
    for _ in range(5):
        chol, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            break
        h += torch.eye(h.shape[0], dtype=h.dtype) * h.diagonal().mean() * damp  # more damping
    else:
        raise RuntimeError("Hessian is not positive definite even after extra damping")
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True).float()


@torch.no_grad()
def gptq_quantize_weight(
    w: torch.Tensor,
    h: torch.Tensor,
    config: QuantConfig,
    damp: float = 0.01,
    act_order: bool = False,
    codes: CodesMode = "per-column",
    weighted_fit: bool = True,
) -> QuantizedWeight:
    """GPTQ-quantize ``w [out, in]`` with Hessian ``h [in, in]`` (see the module docstring).

    ``weighted_fit`` fits each group's levels with ``diag(H)`` as per-column importance.
    """
    out, n = w.shape
    g = config.group_for(n)
    ng = num_groups(n, g)
    w = w.detach().float().clone()
    h = h.to(torch.float64).clone()
    dead = h.diagonal() == 0  # inputs that are always zero: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    # Column visiting order: groups (contiguous in the original order) by decreasing Hessian mass,
    # columns inside a group by decreasing diag(H).
    diag = h.diagonal()
    groups = [torch.arange(j * g, min((j + 1) * g, n)) for j in range(ng)]
    if act_order:
        groups = sorted(groups, key=lambda cols: -diag[cols].sum().item())
        groups = [cols[torch.argsort(diag[cols], descending=True, stable=True)] for cols in groups]
    perm = torch.cat(groups)
    w, h = w[:, perm], h[perm][:, perm]
    u = _inverse_hessian_factor(h, damp)

    scales = torch.zeros(out, ng, config.bits)
    zeros = torch.zeros(out, ng)
    q_codes = torch.zeros(out, n, dtype=torch.uint8)
    a = 0
    for cols in groups:
        b = a + cols.numel()
        gi = cols.min().item() // g  # index of this group in the stored layout
        block = w[:, a:b].clone()
        if config.format == "uniform":
            s, z = fit_uniform_minmax(block, config.bits)
        else:
            imp = diag[perm[a:b]].float().unsqueeze(0) if weighted_fit else torch.ones(1, b - a)
            s, z = fit_hlq_als(block, config.bits, imp, iters=config.iters)
        s, z = s.half().float(), z.half().float()  # the stored precision defines the levels
        scales[:, gi], zeros[:, gi] = s, z
        fixed = uniform_codes(block, s, z) if config.format == "uniform" else assign_nearest(block, s, z)
        # Sorted levels and their midpoints, once per group: each column is then one searchsorted.
        lv = levels(s, z)
        sorted_lv, order = lv.sort(dim=1)
        mid = (sorted_lv[:, 1:] + sorted_lv[:, :-1]) * 0.5

        err = torch.zeros(out, b - a)
        for j in range(b - a):
            col = w[:, a + j]
            if codes == "fixed":
                c = fixed[:, j : j + 1].long()
                q = lv.gather(1, c).squeeze(1)
            else:
                pos = (col.unsqueeze(1) > mid).sum(1, keepdim=True)  # index of the nearest sorted level
                c, q = order.gather(1, pos), sorted_lv.gather(1, pos).squeeze(1)
            q_codes[:, perm[a + j]] = c.squeeze(1).to(torch.uint8)
            e = (col - q) / u[a + j, a + j]
            w[:, a + j + 1 : b] -= e.unsqueeze(1) * u[a + j, a + j + 1 : b].unsqueeze(0)
            err[:, j] = e
        w[:, b:] -= err @ u[a:b, b:]
        a = b
    return QuantizedWeight(q_codes, scales.half(), zeros.half(), g)
