"""Perplexity windows against a direct computation, and dataset lookup errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from elutq.eval import dataset_file, load_text, perplexity
from elutq.utils import ElutqError


def direct_nll(model, ids: torch.Tensor, context: int) -> list[float]:
    """NLL of each token i >= 1 given up to `context` previous tokens, one forward per token."""
    out = []
    for i in range(1, ids.numel()):
        window = ids[max(0, i - context) : i + 1]
        logits = model(window.unsqueeze(0)).logits[0, -2]
        out.append(F.cross_entropy(logits, window[-1]).item())
    return out


@torch.no_grad()
def test_single_window_equals_direct_computation(tiny_llama):
    model, _ = tiny_llama
    ids = torch.randint(0, 256, (40,))
    res = perplexity(model, ids, seqlen=64, progress=False)
    expected = direct_nll(model, ids, 64)
    assert res.windows == 1 and res.tokens_scored == 39
    assert math.isclose(res.nll, sum(expected) / len(expected), rel_tol=1e-5)


@torch.no_grad()
def test_non_overlapping_windows_skip_each_windows_first_token(tiny_llama):
    model, _ = tiny_llama
    ids = torch.randint(0, 256, (50,))
    res = perplexity(model, ids, seqlen=16, progress=False)
    assert res.windows == 4 and res.tokens_scored == 15 + 15 + 15 + 1
    per_window = [perplexity(model, ids[b : b + 16], seqlen=16, progress=False) for b in (0, 16, 32, 48)]
    total = sum(r.nll * r.tokens_scored for r in per_window)
    assert math.isclose(res.nll, total / res.tokens_scored, rel_tol=1e-5)


@torch.no_grad()
def test_sliding_windows_score_every_token_once_with_enough_context(tiny_llama):
    model, _ = tiny_llama
    ids = torch.randint(0, 256, (30,))
    res = perplexity(model, ids, seqlen=12, stride=4, progress=False)
    assert res.tokens_scored == 29
    # Token i is scored in the first window that contains it; reproduce that context directly.
    expected = []
    for i in range(1, 30):
        b = 0 if i < 12 else ((i - 12) // 4 + 1) * 4
        window = ids[b : i + 1]
        expected.append(F.cross_entropy(model(window.unsqueeze(0)).logits[0, -2], window[-1]).item())
    assert math.isclose(res.nll, sum(expected) / len(expected), rel_tol=1e-5)


def test_seqlen_is_capped_by_context(tiny_llama):
    model, _ = tiny_llama  # max_position_embeddings = 128
    res = perplexity(model, torch.randint(0, 256, (300,)), seqlen=2048, progress=False)
    assert res.seqlen == 128


def test_wikitext2_is_found():
    assert dataset_file("wikitext2", "test").name == "test.txt"


def test_missing_dataset_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr("elutq.eval.data_dirs", lambda: [tmp_path])
    with pytest.raises(ElutqError, match="set ELUTQ_DATA"):
        dataset_file("wikitext2")
    with pytest.raises(ElutqError, match="unknown dataset"):
        dataset_file("c4")


def test_bad_text_files(tmp_path):
    with pytest.raises(ElutqError, match="does not exist"):
        load_text(tmp_path / "nope.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ElutqError, match="not UTF-8"):
        load_text(tmp_path / "bin.txt")
