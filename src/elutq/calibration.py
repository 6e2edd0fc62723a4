"""Calibration data: N samples × seqlen tokens drawn with a seed from a text file, a dataset, or a mix.

A mix is parts joined by ``+`` (``wikitext2+python-code+self``); the samples are dealt round-robin to the
parts, so each gets ``N / parts`` (the first ones one more when it does not divide).  A part is

- a named dataset (its ``valid`` split, never ``test``): random windows of its text;
- ``self``: text the unquantized model writes itself, sampled from its first token on (seeded, temperature
  1, top-p 0.95), the data-free calibration of LLM-QAT: whatever the model knows, not one corpus;
  generated once in the native runtime and cached under ``$ELUTQ_CACHE/calib-self``;
- ``chat``: WikiText-2 and python-code ``valid`` passages as user/assistant turns through the model's own
  chat template (what an instruct model sees when it serves), from the start of a conversation.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .eval import dataset_names, load_text, tokenize
from .utils import ElutqError

SELF, CHAT = "self", "chat"
# GPTQ's, mixed precision's and finetuning's calibration unless told otherwise: Wikipedia and code.  On
# WikiText-2 alone a 2-bit model loses 70x on code against 5.4x on WikiText-2; on both, 8.8x and 6.1x
# (docs/RESULTS.md, benchmarks/bench_calibration.py).
DEFAULT = "wikitext2+python-code"
CHAT_TEXTS = ("wikitext2", "python-code")  # the passages chat samples are made of


@dataclass(frozen=True)
class CalibConfig:
    n_samples: int = 128
    seqlen: int = 512
    seed: int = 0
    dataset: str | None = DEFAULT  # a dataset or a mix (parts joined by "+"); always its `valid` split
    split: str = "valid"
    text: str | None = None  # a text file instead of a dataset

    def describe(self) -> dict:
        return asdict(self)


def mix_parts(name: str) -> list[str]:
    """The parts of a dataset or mix name, each checked; an unknown one is an error that lists the choices."""
    parts = name.split("+")
    for p in parts:
        if p not in dataset_names() and p not in (SELF, CHAT):
            raise ElutqError(
                f"unknown calibration part {p!r} in {name!r}; a mix joins any of {[*dataset_names(), SELF, CHAT]} "
                "with '+' (e.g. wikitext2+python-code+self), or pass --calib-text FILE"
            )
    if len(set(parts)) != len(parts):
        raise ElutqError(f"calibration mix {name!r} names a part twice; name each once")
    return parts


def calibration_ids(tokenizer, config: CalibConfig, model: str | Path | None = None) -> tuple[torch.Tensor, str]:
    """``[n_samples, seqlen]`` token ids, and where they came from.  ``model``: the unquantized model
    (a path or name ``elutq quantize`` accepts), needed by the ``self`` part."""
    if config.n_samples < 1 or config.seqlen < 1:
        raise ElutqError("calibration needs at least one sample of at least one token")
    name = config.dataset
    if config.text or name is None or ("+" not in name and name not in (SELF, CHAT)):  # one text, as ever
        text, source = load_text(
            Path(config.text) if config.text else None, None if config.text else config.dataset, config.split
        )
        return _windows(tokenize(tokenizer, text), config.n_samples, config.seqlen, config.seed, source), source
    parts = mix_parts(name)
    counts = [len(range(k, config.n_samples, len(parts))) for k in range(len(parts))]
    blocks, described = [], []
    for k, (part, n) in enumerate(zip(parts, counts, strict=True)):
        if n == 0:
            continue
        seed = config.seed + 1009 * k  # each part its own seeded stream
        if part == SELF:
            blocks.append(self_samples(model, tokenizer, n, config.seqlen, seed))
            described.append(f"{n} × self (sampled from the model, seed {seed})")
        elif part == CHAT:
            blocks.append(chat_samples(tokenizer, n, config.seqlen, seed, config.split))
            described.append(f"{n} × chat ({'+'.join(CHAT_TEXTS)} {config.split} through the chat template)")
        else:
            text, source = load_text(None, part, config.split)
            blocks.append(_windows(tokenize(tokenizer, text), n, config.seqlen, seed, source))
            described.append(f"{n} × {part}/{config.split}")
    ids = torch.cat(blocks)
    order = torch.tensor([i for r in range(max(counts)) for i in _round(counts, r)])  # interleave the parts
    return ids[order], f"mix {name}: " + ", ".join(described)


def _round(counts: list[int], r: int) -> list[int]:
    """Rows of ``cat(blocks)`` holding round ``r``'s sample of each part that has one."""
    starts = np.cumsum([0, *counts[:-1]])
    return [int(s) + r for s, c in zip(starts, counts, strict=True) if r < c]


def _windows(ids: torch.Tensor, n: int, seqlen: int, seed: int, source: str) -> torch.Tensor:
    """``n`` random windows of ``seqlen`` tokens of ``ids`` (seeded)."""
    need = seqlen + 1
    if ids.numel() < need:
        raise ElutqError(
            f"calibration text {source} has {ids.numel()} tokens, fewer than one sample of {seqlen}; "
            "pass a longer text (--calib-text) or a smaller --calib-seqlen"
        )
    if ids.numel() < n * seqlen:
        raise ElutqError(
            f"calibration text {source} has {ids.numel()} tokens, fewer than --calib-samples × --calib-seqlen = "
            f"{n} × {seqlen}; pass a longer text or fewer/shorter samples"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - need + 1, (n,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def chat_samples(tokenizer, n: int, seqlen: int, seed: int, split: str = "valid") -> torch.Tensor:
    """``n`` conversations of ``seqlen`` tokens through the tokenizer's chat template: user/assistant turns
    whose contents are consecutive passages of the shipped texts (alternating by sample), from a random start."""
    if not getattr(tokenizer, "chat_template", None):
        raise ElutqError(
            "the 'chat' calibration part needs the model's chat template, and this tokenizer has none (a base "
            "model?); drop 'chat' from --calib-dataset"
        )
    texts = [load_text(None, t, split)[0] for t in CHAT_TEXTS]
    rng = np.random.default_rng(seed)
    chars = 2 * seqlen  # ~2 passages per turn pair at >= ~2 characters per token; more are added until it fills
    out = []
    for i in range(n):
        text = texts[i % len(texts)]
        pos = int(rng.integers(0, max(1, len(text) - 8 * chars)))
        messages: list[dict] = []
        ids: list[int] = []
        while len(ids) < seqlen:
            if pos >= len(text):
                raise ElutqError(f"the chat calibration text ran out at sample {i}; lower --calib-seqlen")
            role = "user" if len(messages) % 2 == 0 else "assistant"
            messages.append({"role": role, "content": text[pos : pos + chars]})
            pos += chars
            enc = tokenizer.apply_chat_template(messages, tokenize=True)
            ids = list(enc["input_ids"] if hasattr(enc, "keys") else enc)
        out.append(torch.tensor(ids[:seqlen], dtype=torch.long))
    return torch.stack(out)


def self_samples(model: str | Path | None, tokenizer, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """``n`` sequences of ``seqlen`` tokens the model samples itself from its first token on, all ``n`` in
    one batched decode through the native runtime (dense 16-bit weights); cached per model and settings."""
    from . import __version__
    from .checkpoint import SafetensorsDir
    from .models import cache_dir, resolve_source_dir

    if model is None:
        raise ElutqError("the 'self' calibration part needs the unquantized model; pass it (or drop 'self')")
    src = resolve_source_dir(str(model))
    key = hashlib.sha256(
        json.dumps([SafetensorsDir(src).fingerprint(), n, seqlen, seed, __version__]).encode()
    ).hexdigest()[:20]
    cache = cache_dir() / "calib-self" / f"{key}.npy"
    if cache.is_file():
        try:
            ids = np.load(cache)
            if ids.shape == (n, seqlen):
                return torch.from_numpy(ids.astype(np.int64))
        except (OSError, ValueError, EOFError):
            pass  # a damaged cache file: sample again (and replace it)
    ids = _sample_from(src, tokenizer, n, seqlen, seed)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, ids.astype(np.int32))
    os.replace(tmp, cache)
    return torch.from_numpy(ids.astype(np.int64))


def _sample_from(src: Path, tokenizer, n: int, seqlen: int, seed: int) -> np.ndarray:
    from tqdm import tqdm

    from . import runtime
    from .generation import Sampler

    m = runtime.load(src, max_ctx=seqlen + 1)
    if m.max_ctx < seqlen + 1:
        raise ElutqError(
            f"the 'self' calibration part samples {seqlen} tokens after a start token, beyond the model's "
            f"{m.max_ctx}-token context; pass a smaller --calib-seqlen"
        )
    first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if first is None:
        raise ElutqError("the 'self' calibration part needs a BOS or EOS token to start from; drop 'self'")
    samplers = [Sampler(temperature=1.0, top_p=0.95, seed=seed * 100_003 + i) for i in range(n)]
    sessions = [runtime.Session(m, max_ctx=seqlen + 1) for _ in range(n)]
    seqs = [[int(first)] for _ in range(n)]
    for _ in tqdm(range(seqlen), desc="calibration: sampling from the model", unit="tok", leave=False):
        logits = m.forward_batch(sessions, [[s[-1]] for s in seqs])
        for i, s in enumerate(seqs):
            s.append(samplers[i](logits[i], s))
    # The samples start after the first token (BOS: the model's input at position 0, not a sample of it).
    return np.asarray([s[1:] for s in seqs], dtype=np.int64)
