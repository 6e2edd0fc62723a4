"""Calibration data: N samples × seqlen tokens drawn with a seed from a text file or dataset."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .eval import load_text, tokenize
from .utils import ElutqError


@dataclass(frozen=True)
class CalibConfig:
    n_samples: int = 128
    seqlen: int = 512
    seed: int = 0
    dataset: str | None = "wikitext2"  # default: WikiText-2 `valid` (never `test`)
    split: str = "valid"
    text: str | None = None  # a text file instead of a dataset

    def describe(self) -> dict:
        return asdict(self)


def calibration_ids(tokenizer, config: CalibConfig) -> tuple[torch.Tensor, str]:
    """``[n_samples, seqlen]`` token ids, random windows of the text; and where the text came from."""
    text, source = load_text(
        Path(config.text) if config.text else None, None if config.text else config.dataset, config.split
    )
    ids = tokenize(tokenizer, text)
    need = config.seqlen + 1
    if config.n_samples < 1 or config.seqlen < 1:
        raise ElutqError("calibration needs at least one sample of at least one token")
    if ids.numel() < need:
        raise ElutqError(
            f"calibration text {source} has {ids.numel()} tokens, fewer than one sample of {config.seqlen}; "
            "pass a longer text (--calib-text) or a smaller --calib-seqlen"
        )
    if ids.numel() < config.n_samples * config.seqlen:
        raise ElutqError(
            f"calibration text {source} has {ids.numel()} tokens, fewer than --calib-samples × --calib-seqlen = "
            f"{config.n_samples} × {config.seqlen}; pass a longer text or fewer/shorter samples"
        )
    g = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, ids.numel() - need + 1, (config.n_samples,), generator=g)
    return torch.stack([ids[s : s + config.seqlen] for s in starts.tolist()]), source
