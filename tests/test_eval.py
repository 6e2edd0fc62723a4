"""Perplexity windows against a direct computation, and dataset lookup errors."""

from __future__ import annotations

import gzip
import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

from elutq.eval import PACKAGE_DATA, dataset_file, load_text, perplexity
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


@pytest.mark.parametrize("name", ["wikitext2", "python-code"])
def test_shipped_datasets_match_their_published_checksums(monkeypatch, name):
    """The package's own copies are found without $ELUTQ_DATA or ../shared, and are the published files."""
    monkeypatch.delenv("ELUTQ_DATA", raising=False)
    sums = {
        ("wikitext2", "test"): "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        ("wikitext2", "valid"): "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        ("python-code", "test"): "7ebb7a012516f536636717542a0e1f1f7de8d2d3e4d26c1c6e9ccd9a5fe352b8",
        ("python-code", "valid"): "48ea9373c44c4f9594a98fd37edcc12abdbf5bcac4a4f313cf0fcb17f1e6f318",
    }
    for split in ("test", "valid"):
        f = dataset_file(name, split)
        assert f.parent.parent == PACKAGE_DATA and f.name == f"{split}.txt.gz"
        text, _ = load_text(dataset=name, split=split)
        assert hashlib.sha256(text.encode()).hexdigest() == sums[name, split]


def test_elutq_data_overrides_the_shipped_copies(monkeypatch, tmp_path):
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "test.txt").write_text("own text\n")
    monkeypatch.setenv("ELUTQ_DATA", str(tmp_path))
    assert load_text(dataset="wikitext2", split="test")[0] == "own text\n"
    assert dataset_file("wikitext2", "valid").parent.parent == PACKAGE_DATA  # not in ELUTQ_DATA: shipped copy


def test_missing_dataset_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr("elutq.eval.data_dirs", lambda: [tmp_path])
    with pytest.raises(ElutqError, match="set ELUTQ_DATA"):
        dataset_file("wikitext2")
    with pytest.raises(ElutqError, match="unknown dataset"):
        dataset_file("c5")


def test_hub_dataset_without_the_library_or_network_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *a, **kw):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ElutqError, match="pip install datasets"):
        load_text(dataset="c4", split="valid")


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    import sys
    import types

    def offline(*a, **kw):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(ElutqError, match="cannot load 'wikitext2-raw'.*check the network"):
        load_text(dataset="wikitext2-raw", split="test")


def test_gzip_text_files_and_damaged_ones(tmp_path):
    f = tmp_path / "t.txt.gz"
    f.write_bytes(gzip.compress("héllo".encode()))
    assert load_text(f)[0] == "héllo"
    f.write_bytes(gzip.compress("héllo".encode())[:-6])
    with pytest.raises(ElutqError, match="damaged"):
        load_text(f)


def test_bad_text_files(tmp_path):
    with pytest.raises(ElutqError, match="does not exist"):
        load_text(tmp_path / "nope.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ElutqError, match="not UTF-8"):
        load_text(tmp_path / "bin.txt")
