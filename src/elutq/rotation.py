"""Incoherence rotations (``--rotate residual``): the same network, rotated so its weights quantize better.

At 2 bits a few outlier input channels set every group's levels.  An orthogonal ``Q`` spreads them over
all channels, so each group's weights look Gaussian — the shape HLQ's non-uniform levels fit best
(QuaRot, QuIP#).  The rotation is fused into the weights offline; the network computes the same function:

- **Residual stream** (computational invariance): the stream is carried rotated, ``x' = x·Q``.  RMSNorm
  without its weight commutes with ``Q`` (``‖xQ‖ = ‖x‖``), so each norm's weight moves into the linears
  that read it and the norms keep only their normalisation (weights of ones):
  embeddings ``E·Q``; q/k/v, gate/up ``W·diag(w)·Q``; o_proj, down_proj ``Qᵀ·W`` (bias ``b·Q``);
  an untied lm_head ``W·diag(w)·Q``.  A tied head is the rotated embedding itself, so the final norm's
  weight cannot move into it: the checkpoint keeps ``M = Qᵀ·diag(w)·Q`` (``model.norm.rotation``,
  hidden × hidden, applied after the final norm: ``h ← h·M``; 0.16–0.25 % of a step's multiply-adds).
- **Per head, V and O**: each KV head's values are rotated by an orthogonal ``Hd`` (head_dim), which the
  attention's weighted sum carries through to o_proj's input: v_proj rows ``Hdᵀ·W`` per head (bias
  ``b·Hd``), o_proj columns ``W·Hd`` per query head.

``Q`` is a randomized Hadamard matrix ``diag(±1)·H/√n`` (seeded): Sylvester for powers of two, Paley I/II
times Sylvester for sizes such as 576 = 36·16 or 1536 = 12·128 (``hadamard``).  ``RotatedSource`` presents
a source model's tensors rotated, so every stage that reads the source (GPTQ, RTN, mixed-precision
measurement, block finetuning) works on the rotated network unchanged.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any, Literal

import numpy as np
import torch

from .utils import ElutqError

NORM_ROTATION = "model.norm.rotation"  # M = Qᵀ·diag(w)·Q of a tied model's final norm
NORM_MATRIX = "norm_matrix"  # quantization_config.rotation: whether the checkpoint holds NORM_ROTATION
MATRICES = ("hadamard", "block", "random")
KINDS = ("residual", "full")


@dataclass(frozen=True)
class Rotation:
    """What ``--rotate`` chose: ``kind`` (``residual``: residual stream + per-head V/O, all fused offline),
    the construction of ``Q`` (``hadamard``; ``block``: block-diagonal Hadamard of the largest power of
    two dividing the size; ``random``: a random orthogonal matrix) and the seed of its signs."""

    kind: Literal["residual", "full"] = "residual"
    matrix: Literal["hadamard", "block", "random"] = "hadamard"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"rotation kind must be one of {KINDS} (got {self.kind!r})")
        if self.matrix not in MATRICES:
            raise ValueError(f"rotation matrix must be one of {MATRICES} (got {self.matrix!r})")

    def spec(self) -> dict[str, Any]:
        return asdict(self)


def supported(config, matrix: str = "hadamard") -> bool:
    """Whether ``orthogonal`` has a ``matrix`` construction for the model's hidden size and head size."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    if matrix != "hadamard":
        return True
    return hadamard(hidden) is not None and (_is_pow2(head_dim) or hadamard(head_dim) is not None)


def auto_rotation(config, bits: int, target_bpw: float | None = None) -> Rotation | None:
    """``--rotate auto`` (the default), as measured on the default model (docs/RESULTS.md, Rotations and Mixed
    precision): ``full`` for 2-bit (and 1-bit) settings, where it lowered GPTQ-HLQ w2g128's perplexity by a
    third, and for ``--target-bpw`` up to 3 (many linears end at 2 bits: mixed 2.5 and 3.0 lost 47% and 35%
    of their WikiText-2 perplexity); none from 3 bits up (it cost 1–5% there) and for larger targets (not
    measured); none where no Hadamard matrix of the model's sizes is known."""
    low = bits <= 2 if target_bpw is None else target_bpw <= 3.0
    return Rotation("full") if low and supported(config) else None


def rotation_from_spec(spec: Any) -> Rotation | None:
    """A checkpoint's ``quantization_config.rotation`` (absent: ``None``), validated."""
    if spec is None:
        return None
    try:
        return Rotation(**{k: v for k, v in spec.items() if k != NORM_MATRIX})
    except (AttributeError, TypeError, ValueError) as e:
        raise ElutqError(f"quantization_config.rotation is {spec!r}, which this elutq cannot apply ({e}); "
                         "upgrade elutq or re-run `elutq quantize`") from None


# ----------------------------------------------------------------------------- Hadamard matrices


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """``Q[i, j] = χ(j − i)``, χ the quadratic character mod the prime ``q``."""
    chi = -np.ones(q)
    chi[0] = 0
    chi[[(x * x) % q for x in range(1, q)]] = 1
    return chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]


def _paley(n: int) -> np.ndarray | None:
    """A Hadamard matrix of order ``n`` by Paley's constructions (I: n = q + 1, q ≡ 3 mod 4; II: n = 2(q + 1),
    q ≡ 1 mod 4; q prime), or None."""
    q = n - 1
    if _is_prime(q) and q % 4 == 3:
        s = np.zeros((n, n))
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return s + np.eye(n)
    q = n // 2 - 1
    if n % 2 == 0 and _is_prime(q) and q % 4 == 1:
        s = np.zeros((q + 1, q + 1))
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, 1, _jacobsthal(q)
        return np.kron(s, np.array([[1, -1], [-1, -1]])) + np.kron(np.eye(q + 1), np.array([[1, 1], [1, -1]]))
    return None


@cache
def hadamard_factor(n: int) -> np.ndarray | None:
    """``A`` of the smallest order ``m`` (Paley; ``[1]`` for a power of two) such that ``A ⊗ Sylvester(n/m)``
    is a Hadamard matrix of order ``n``, or None where no such factorisation exists."""
    for m in range(1, n + 1):
        if n % m or not _is_pow2(n // m):
            continue
        base = np.ones((1, 1)) if m == 1 else _paley(m)
        if base is not None:
            return base
    return None


def hadamard(n: int) -> np.ndarray | None:
    """A Hadamard matrix of order ``n`` (±1 entries, ``H·Hᵀ = n·I``), ``hadamard_factor(n) ⊗ Sylvester``."""
    a = hadamard_factor(n)
    return None if a is None else np.kron(a, _sylvester(n // a.shape[0]))


MAX_MIX = 32  # the online transform mixes runs by a Paley factor of at most this order (m multiply-adds per element)


def fast_factors(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(signs, A)`` of the online rotation ``T = diag(signs)·(A ⊗ Sylvester_b)/√b`` (``--rotate full``,
    down_proj's input; ``A`` orthonormal): Paley/√m ⊗ Sylvester where the Paley factor's order is at most
    ``MAX_MIX`` (1536 = 12·128), else block-diagonal (``A = I``: the largest power-of-two blocks, 8960 = 35·256,
    whose Paley factor would be 140 — 140 multiply-adds per element, a fifth of a 2-bit decode step); what
    the native transform (csrc/hadamard.h) and ``OnlineRotation`` compute."""
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=n)
    a = hadamard_factor(n)
    return signs, np.eye(n // (n & -n)) if a is None or a.shape[0] > MAX_MIX else a / np.sqrt(a.shape[0])


def fast_matrix(n: int, seed: int) -> torch.Tensor:
    """``T`` of ``fast_factors`` as a dense float64 matrix."""
    signs, a = fast_factors(n, seed)
    b = n // a.shape[0]
    return torch.from_numpy(signs[:, None] * np.kron(a, _sylvester(b)) / np.sqrt(b))


def orthogonal(n: int, matrix: str, seed: int) -> torch.Tensor:
    """The rotation ``Q`` (float64, ``n × n``, orthogonal): ``diag(±1)·H/√n`` with seeded signs."""
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=n)
    if matrix == "random":
        q, r = np.linalg.qr(rng.standard_normal((n, n)))
        return torch.from_numpy(q * np.sign(np.diag(r)))
    if matrix == "hadamard":
        h = hadamard(n)
        if h is None:
            raise ElutqError(f"no Hadamard construction of order {n} is known to elutq; use --rotation-matrix "
                             "block (block-diagonal Hadamard) or random")
    else:
        b = n & -n  # the largest power of two dividing n
        h = np.kron(np.eye(n // b), _sylvester(b))
        n = b
    return torch.from_numpy(signs[:, None] * h / np.sqrt(n))


# ----------------------------------------------------------------------------- the rotated source


ROTATE_ROWS = 4096  # rows of a vocabulary-sized tensor rotated at a time (float64 temporaries of that size)


class RotatedSource:
    """A source model's tensors (``.get(name)``, ``in``, ``.fingerprint()``: what ``SafetensorsDir`` offers)
    with ``rotation`` fused in, in float32; see the module docstring for each tensor's rule."""

    def __init__(self, source, config, rotation: Rotation):
        self.source, self.rotation = source, rotation
        self.dir, self.weight_map = source.dir, source.weight_map  # the files: sizes, headers, tokenizer
        self.hidden = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.n_heads
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.q = orthogonal(self.hidden, rotation.matrix, rotation.seed)
        self.t = fast_matrix(config.intermediate_size, rotation.seed + 2) if rotation.kind == "full" else None
        self.hd = orthogonal(self.head_dim, "hadamard" if _is_pow2(self.head_dim) else rotation.matrix,
                             rotation.seed + 1)
        self._embed: torch.Tensor | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.source or (name == NORM_ROTATION and self.tied)

    def shape(self, name: str) -> tuple[int, ...]:
        return (self.hidden, self.hidden) if name == NORM_ROTATION else self.source.shape(name)

    def release(self) -> None:
        """Drop the rotated embedding kept for a second read (a 151,936-row table is 0.9 GB)."""
        self._embed = None

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([self.source.fingerprint(), self.rotation.spec()]).encode()).hexdigest()

    def _f64(self, name: str) -> torch.Tensor:
        return self.source.get(name).to(torch.float64)

    def _rows_rotated(self, name: str, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``(W·diag(scale)) @ Q`` for a vocabulary-sized ``W``, in float64 a block of rows at a time and
        written over W's own float32 copy: a whole-table float64 product would need 4× the table."""
        w = self.source.get(name).float()  # a fresh tensor (SafetensorsDir reads a copy), so ours to overwrite
        for r in range(0, w.shape[0], ROTATE_ROWS):
            blk = w[r : r + ROTATE_ROWS].double()
            w[r : r + ROTATE_ROWS] = ((blk if scale is None else blk * scale) @ self.q).float()
        return w

    def _heads(self, w: torch.Tensor, dim: int) -> torch.Tensor:
        """``w`` with its head slices along ``dim`` (head_dim each) multiplied by ``Hd`` from the right."""
        w = w.movedim(dim, -1)
        shape = w.shape
        w = (w.reshape(*shape[:-1], -1, self.head_dim) @ self.hd).reshape(shape)
        return w.movedim(-1, dim)

    def get(self, name: str) -> torch.Tensor:
        if name == NORM_ROTATION and self.tied:
            w = self._f64("model.norm.weight")
            return (self.q.T * w) @ self.q
        if name.endswith(("layernorm.weight", "model.norm.weight")):
            return torch.ones(self.hidden)
        prefix, _, leaf = name.rpartition(".")
        lin = prefix.rpartition(".")[2]
        q = self.q
        if name == "model.embed_tokens.weight":
            if self._embed is None:  # read twice (calibration, head): kept once
                self._embed = self._rows_rotated(name)
            return self._embed
        if name == "lm_head.weight":
            return self._rows_rotated(name, self._f64("model.norm.weight"))
        if lin in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            if leaf != "weight":
                t = self._f64(name)
                return (self._heads(t, 0) if lin == "v_proj" else t).float()
            layer = prefix.rpartition(".")[0].rpartition(".")[0]
            norm = "input_layernorm" if "self_attn" in prefix else "post_attention_layernorm"
            w = self._f64(name) * self._f64(f"{layer}.{norm}.weight") @ q
            return (self._heads(w.T, 1).T if lin == "v_proj" else w).float()
        if lin in ("o_proj", "down_proj"):
            t = self._f64(name)
            if leaf == "bias":
                return (t @ q).float()
            if lin == "o_proj":
                t = self._heads(t, 1)
            elif self.t is not None:  # --rotate full: down_proj's input arrives rotated online (u·T)
                t = t @ self.t
            return (q.T @ t).float()
        return self.source.get(name)
