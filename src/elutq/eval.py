"""Perplexity over a text file or a named dataset (``wikitext2``), in fixed windows.

Non-overlapping windows (``stride == seqlen``, the default, as in GPTQ-style evaluation) score
every token of a window except its first; sliding windows (``stride < seqlen``) give every scored
token at least ``seqlen - stride`` tokens of context.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .utils import ElutqError

DATASETS = {"wikitext2": "wikitext-2"}
SPLITS = ("test", "valid")


def data_dirs() -> list[Path]:
    """Where named datasets are looked for: $ELUTQ_DATA, then ../shared/data near cwd or the source tree."""
    dirs = []
    if os.environ.get("ELUTQ_DATA"):
        dirs.append(Path(os.environ["ELUTQ_DATA"]))
    dirs.append(Path.cwd().parent / "shared" / "data")
    dirs.append(Path(__file__).resolve().parents[3] / "shared" / "data")  # src/elutq/eval.py → beside the repo
    return dirs


def dataset_file(name: str, split: str = "test") -> Path:
    if name not in DATASETS:
        raise ElutqError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)} or pass --text FILE")
    if split not in SPLITS:
        raise ElutqError(f"unknown split {split!r}; choose one of {SPLITS}")
    for d in data_dirs():
        f = d / DATASETS[name] / f"{split}.txt"
        if f.is_file():
            return f
    raise ElutqError(
        f"{name} ({split}) not found in {', '.join(str(d) for d in data_dirs())}; set ELUTQ_DATA to a directory "
        f"holding {DATASETS[name]}/{split}.txt, or pass --text FILE"
    )


def load_text(text: str | Path | None = None, dataset: str | None = None, split: str = "test") -> tuple[str, str]:
    """Returns ``(text, description)``."""
    if (text is None) == (dataset is None):
        raise ElutqError("pass exactly one of --text FILE or --dataset NAME")
    path = Path(text) if text is not None else dataset_file(dataset, split)
    if not path.is_file():
        raise ElutqError(f"text file {path} does not exist; pass a readable UTF-8 text file")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ElutqError(f"{path} is not UTF-8 text ({e}); convert it or pass another file") from e
    return content, (f"{dataset}/{split} ({path})" if dataset else str(path))


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens_scored: int
    tokens_total: int
    windows: int
    seqlen: int
    stride: int
    seconds: float

    def summary(self) -> str:
        return (
            f"ppl {self.ppl:.4f}  (tokens scored {self.tokens_scored} of {self.tokens_total}, "
            f"{self.windows} windows, seqlen {self.seqlen}, stride {self.stride}, {self.seconds:.1f}s)"
        )


def context_length(model) -> int:
    n = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    return min(n, int(getattr(model, "max_ctx", n)))  # a runtime model may be loaded with a shorter context


def window_logits(model, window: torch.Tensor) -> torch.Tensor:
    """Logits ``[T, vocab]`` of one window: a torch causal LM, or any object with ``logits(ids)``
    (``elutq.runtime.Model``, or another engine behind that method)."""
    if isinstance(model, nn.Module):
        return model(window.unsqueeze(0)).logits[0]
    return model.logits(window)


@torch.no_grad()
def perplexity(
    model,
    input_ids: torch.Tensor,
    seqlen: int = 2048,
    stride: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` (a torch causal LM or a runtime model, see :func:`window_logits`) on the
    1-D token sequence ``input_ids``."""
    seqlen = min(seqlen, context_length(model))
    stride = stride or seqlen
    if not 0 < stride <= seqlen:
        raise ElutqError(f"stride must be in 1..seqlen ({seqlen}), got {stride}")
    ids = input_ids.reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ElutqError("the text has fewer than 2 tokens; pass a longer text")
    # Windows start every `stride` tokens until one reaches the end of the text.
    n = ids.numel()
    starts = [b for b in range(0, n - 1, stride) if b == 0 or b - stride + seqlen < n]
    nll, scored, done = 0.0, 0, 0  # done: tokens already scored (sliding windows skip them)
    t0 = time.perf_counter()
    for b in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
        window = ids[b : b + seqlen]
        logits = window_logits(model, window)[:-1].float()
        targets = window[1:]
        first = max(done - b - 1, 0)  # skip positions a previous window already scored
        loss = F.cross_entropy(logits[first:], targets[first:], reduction="sum")
        nll += loss.item()
        scored += targets.numel() - first
        done = b + window.numel()
    return PerplexityResult(
        ppl=math.exp(nll / scored),
        nll=nll / scored,
        tokens_scored=scored,
        tokens_total=ids.numel(),
        windows=len(starts),
        seqlen=seqlen,
        stride=stride,
        seconds=time.perf_counter() - t0,
    )


def tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
