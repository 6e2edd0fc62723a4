"""Perplexity over a text file or a named dataset (``wikitext2``), in fixed windows.

Non-overlapping windows (``stride == seqlen``, the default, as in GPTQ-style evaluation) score
every token of a window except its first; sliding windows (``stride < seqlen``) give every scored
token at least ``seqlen - stride`` tokens of context.
"""

from __future__ import annotations

import gzip
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .utils import ElutqError

# Named datasets shipped in elutq/data (gzip, see its README for sources and licences).
DATASETS = {"wikitext2": "wikitext-2", "python-code": "python-code"}
# Hub datasets (the `datasets` library, online): name → (path, config, {split: hub split or data file}, field).
HUB_DATASETS = {
    "wikitext2-raw": ("wikitext", "wikitext-2-raw-v1", {"valid": "validation", "test": "test"}, "text"),
    # C4 has no test split: two shards of its validation set, one to calibrate on, one to report on.
    "c4": ("allenai/c4", None, {"valid": "en/c4-validation.00000-of-00008.json.gz",
                                "test": "en/c4-validation.00001-of-00008.json.gz"}, "text"),
}
HUB_MAX_CHARS = 4_000_000  # a C4 shard is ~40 MB of text: keep the first 4 MB (documents in file order)
SPLITS = ("test", "valid")
PACKAGE_DATA = Path(__file__).resolve().parent / "data"


def data_dirs() -> list[Path]:
    """Where named datasets are looked for: ``$ELUTQ_DATA`` (``NAME/SPLIT.txt`` or ``.txt.gz``), then the
    copies shipped inside the package."""
    env = os.environ.get("ELUTQ_DATA")
    return ([Path(env)] if env else []) + [PACKAGE_DATA]


def dataset_names() -> list[str]:
    return sorted(DATASETS) + sorted(HUB_DATASETS)


def dataset_file(name: str, split: str = "test") -> Path:
    """The file holding a shipped dataset's split (plain or gzip-compressed text)."""
    if name not in DATASETS:
        raise ElutqError(f"unknown dataset {name!r}; choose one of {dataset_names()} or pass --text FILE")
    if split not in SPLITS:
        raise ElutqError(f"unknown split {split!r}; choose one of {SPLITS}")
    for d in data_dirs():
        for f in (d / DATASETS[name] / f"{split}.txt", d / DATASETS[name] / f"{split}.txt.gz"):
            if f.is_file():
                return f
    raise ElutqError(
        f"{name} ({split}) not found in {', '.join(str(d) for d in data_dirs())}; the package's data folder is "
        f"incomplete (reinstall elutq), or set ELUTQ_DATA to a directory holding {DATASETS[name]}/{split}.txt"
    )


def _hub_text(name: str, split: str) -> str:
    """A hub dataset's split as one text (documents joined by blank lines), via the `datasets` library."""
    if split not in SPLITS:
        raise ElutqError(f"unknown split {split!r}; choose one of {SPLITS}")
    path, config, splits, field = HUB_DATASETS[name]
    try:
        import datasets
    except ImportError as e:
        raise ElutqError(
            f"dataset {name!r} comes from the Hugging Face hub and needs the `datasets` library: "
            f"`pip install datasets` (and a network connection), or use a shipped one: {sorted(DATASETS)}"
        ) from e
    try:
        if path == "allenai/c4":
            ds = datasets.load_dataset(path, data_files={"x": splits[split]}, split="x")
        else:
            ds = datasets.load_dataset(path, config, split=splits[split])
    except Exception as e:  # offline, hub down, renamed: the library's own error types vary by version
        raise ElutqError(
            f"cannot load {name!r} ({path}) from the hub: {type(e).__name__}: {e}; check the network "
            f"(HF_HUB_OFFLINE must be unset), or use a shipped dataset: {sorted(DATASETS)}"
        ) from e
    parts, size = [], 0
    for doc in ds[field]:
        parts.append(doc)
        size += len(doc)
        if size >= HUB_MAX_CHARS:
            break
    return "\n\n".join(parts) if path == "allenai/c4" else "".join(parts)


def read_text_file(path: Path) -> str:
    """A UTF-8 text file, gzip-compressed when its name ends in .gz."""
    if not path.is_file():
        raise ElutqError(f"text file {path} does not exist; pass a readable UTF-8 text file")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ElutqError(f"{path} is not UTF-8 text ({e}); convert it or pass another file") from e
    except (OSError, EOFError) as e:
        raise ElutqError(f"cannot read {path}: {e}; the file is damaged: replace it") from e


def load_text(text: str | Path | None = None, dataset: str | None = None, split: str = "test") -> tuple[str, str]:
    """Returns ``(text, description)``: a text file, a shipped dataset, or a hub dataset."""
    if (text is None) == (dataset is None):
        raise ElutqError("pass exactly one of --text FILE or --dataset NAME")
    if dataset in HUB_DATASETS:
        return _hub_text(dataset, split), f"{dataset}/{split} (hub: {HUB_DATASETS[dataset][0]})"
    path = Path(text) if text is not None else dataset_file(dataset, split)
    return read_text_file(path), (f"{dataset}/{split} ({path})" if dataset else str(path))


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


def window_logprobs(model, window: torch.Tensor) -> torch.Tensor:
    """``log p(window[t+1] | window[:t+1])``, ``[T-1]``: a torch causal LM, or any object with
    ``token_logprobs(ids)`` (``elutq.runtime.Model``, the native runtime, or another engine behind it)."""
    if isinstance(model, nn.Module):
        logits = model(window.unsqueeze(0)).logits[0, :-1].float()
        return torch.log_softmax(logits, dim=-1).gather(1, window[1:, None])[:, 0]
    return model.token_logprobs(window)


@torch.no_grad()
def perplexity(
    model,
    input_ids: torch.Tensor,
    seqlen: int = 2048,
    stride: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` (a torch causal LM or a runtime model, see :func:`window_logprobs`) on the
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
        logprobs = window_logprobs(model, window)
        first = max(done - b - 1, 0)  # skip positions a previous window already scored
        nll -= logprobs[first:].double().sum().item()
        scored += logprobs.numel() - first
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
