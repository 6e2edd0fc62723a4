"""Named models split across PyPI packages (fetch, check, assemble) and architecture detection, without
the real download: fake parts are tiny modules on sys.path."""

from __future__ import annotations

import hashlib
import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from elutq import models
from elutq.cli import main
from elutq.models import SplitGGUF, assemble_gguf, check_architecture, fetch_named, named_gguf, named_model
from elutq.utils import ElutqError

CHUNKS = [b"GGUF" + bytes(range(60)), bytes(range(200, 256)) * 3, b"tail"]


def fake_model(tmp_path: Path, monkeypatch, chunks: list[bytes] = CHUNKS, install: list[int] | None = None,
               sha_of: list[bytes] = CHUNKS) -> SplitGGUF:
    """A named model of ``len(chunks)`` parts, modules ``fakepart_<tag>{i}``; only the parts in ``install``
    (1-based; default all) are importable.  Size and sha256 are those of ``sha_of`` concatenated."""
    tag = tmp_path.name.replace("-", "_") + "_p"
    site = tmp_path / "site"
    for i, data in enumerate(chunks, 1):
        if install is not None and i not in install:
            continue
        pkg = site / f"fakepart_{tag}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
        (pkg / "__init__.py").write_text(
            "import os\n"
            "def get_part_path():\n"
            f"    return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'part{i:02d}.bin')\n"
        )
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    whole = b"".join(sha_of)
    m = SplitGGUF(
        name="fake-model", title="Fake-Model", file="fake.gguf", package=f"fakepart-{tag}", module=f"fakepart_{tag}",
        version="0.1.0", parts=len(chunks), size=len(whole), sha256=hashlib.sha256(whole).hexdigest(),
    )
    monkeypatch.setitem(models.NAMED_MODELS, m.name, m)
    monkeypatch.setenv("ELUTQ_CACHE", str(tmp_path / "cache"))
    return m


def test_parts_assemble_into_the_checked_file(tmp_path, monkeypatch):
    m = fake_model(tmp_path, monkeypatch)
    path = named_gguf(m)
    assert path == tmp_path / "cache" / "gguf" / "fake.gguf"
    assert path.read_bytes() == b"".join(CHUNKS)
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # no temporary file left behind
    assert named_model("fake-model") is m and named_model("nope") is None


def test_missing_part_names_the_fix(tmp_path, monkeypatch):
    m = fake_model(tmp_path, monkeypatch, install=[1, 3])
    missing = rf"1 of its 3 parts are not installed \({m.package}2\).*elutq fetch fake-model"
    with pytest.raises(ElutqError, match=missing):
        named_gguf(m)
    assert not (tmp_path / "cache" / "gguf" / "fake.gguf").exists()


def test_size_mismatch_is_refused(tmp_path, monkeypatch):
    m = fake_model(tmp_path, monkeypatch, chunks=[CHUNKS[0], CHUNKS[1][:-1], CHUNKS[2]])
    with pytest.raises(ElutqError, match=r"hold 235 bytes, not 236.*--force-reinstall"):
        named_gguf(m)
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
    corrupt = [CHUNKS[0], bytes([1]) + CHUNKS[1][1:], CHUNKS[2]]  # same size, one byte differs
    m = fake_model(tmp_path, monkeypatch, chunks=corrupt)
    with pytest.raises(ElutqError, match=r"sha256 is [0-9a-f]{64}, not [0-9a-f]{64} \(a corrupt part\)"):
        assemble_gguf(m, tmp_path / "cache" / "gguf" / m.file)
    assert not any((tmp_path / "cache" / "gguf").iterdir())  # the temporary file is removed


def test_truncated_cached_file_is_refused(tmp_path, monkeypatch):
    m = fake_model(tmp_path, monkeypatch)
    path = named_gguf(m)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ElutqError, match="elutq fetch fake-model"):
        named_gguf(m)


def test_fetch_replaces_a_corrupt_cached_file(tmp_path, monkeypatch, capsys):
    """`elutq fetch --no-install` re-checks the sha256 of the cached file and reassembles a corrupt one
    (the conversion to safetensors is stubbed: the fake parts are not a real GGUF)."""
    m = fake_model(tmp_path, monkeypatch)
    monkeypatch.setattr(models, "named_model_dir", lambda m: tmp_path / "converted")
    path = tmp_path / "cache" / "gguf" / m.file
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x" * m.size)  # right size, wrong bytes
    assert main(["fetch", "fake-model", "--no-install"]) == 0
    assert path.read_bytes() == b"".join(CHUNKS)
    assert fetch_named("fake-model", install=False) == path
    assert "sha256 matches" in capsys.readouterr().out


def test_fetch_errors(tmp_path, monkeypatch, capsys):
    fake_model(tmp_path, monkeypatch, install=[2])
    assert main(["fetch", "fake-model", "--no-install"]) == 2
    assert "2 of its 3 parts are not installed" in capsys.readouterr().err
    assert main(["fetch", "no-such-model"]) == 2
    assert "unknown model name 'no-such-model'; `elutq fetch` knows" in capsys.readouterr().err


def test_named_model_not_fetched_is_a_clear_error(tmp_path, monkeypatch, capsys):
    fake_model(tmp_path, monkeypatch, install=[])
    assert main(["eval", "fake-model", "--text", __file__]) == 2
    assert "3 of its 3 parts are not installed" in capsys.readouterr().err


def test_gguf_configs_have_only_a_model_type():
    """A config read from a GGUF has ``architectures`` None and the GGUF's architecture as model_type
    (`elutq eval file.gguf` of a qwen2 GGUF failed on it)."""
    for t in ("llama", "qwen2", "qwen3", "mistral"):
        check_architecture(SimpleNamespace(architectures=None, model_type=t))
    with pytest.raises(ElutqError, match="architecture 'gpt2' is not supported"):
        check_architecture(SimpleNamespace(architectures=None, model_type="gpt2"))
    with pytest.raises(ElutqError, match="GPT2LMHeadModel"):
        check_architecture(SimpleNamespace(architectures=["GPT2LMHeadModel"], model_type="gpt2"))


def test_real_parts_are_not_needed_for_the_suite():
    """The registry entry describes the real 22-part model; nothing here imports its parts."""
    m = named_model("qwen2.5-coder-1.5b")
    assert m is not None and m.parts == 22 and m.size == 1_117_320_768 and len(m.sha256) == 64
    assert not any(name.startswith(m.module) for name in sys.modules)


@pytest.mark.parametrize("arch", ["llama", "llama3-rope", "qwen2", "qwen3", "mistral", "yarn", "linear"])
def test_rope_frequencies_equal_the_model_classes_own(arch):
    """The runtime's RoPE frequencies, computed without importing the modeling code, equal what each model
    family's rotary class computes (default, llama3, yarn and linear scaling; head_dim != hidden / heads)."""
    import torch
    import transformers

    from conftest import TINY_ARCHS
    from elutq.models import rope_frequencies, rotary_embedding

    scaled = {"yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
              "linear": {"rope_type": "linear", "factor": 2.0}}
    cls_name, extra = TINY_ARCHS.get(arch, ("Qwen2Config", {"rope_scaling": scaled.get(arch)}))
    sizes = dict(vocab_size=256, hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128)
    config = getattr(transformers, cls_name)(**sizes, **extra)
    inv_freq, scaling = rope_frequencies(config)
    rotary = rotary_embedding(config)
    assert torch.equal(inv_freq, rotary.inv_freq)
    assert scaling == float(getattr(rotary, "attention_scaling", 1.0))


def test_concurrent_conversions_take_turns(tmp_path, monkeypatch):
    """Two callers converting the same GGUF at once (say `elutq fetch` and a benchmark started beside it):
    the second waits on the lock and reuses the first's directory instead of converting it again."""
    import threading
    import time

    started, calls = threading.Event(), []

    def slow_load(path):
        calls.append(path)
        started.set()
        time.sleep(0.3)
        return SimpleNamespace(), SimpleNamespace()

    monkeypatch.setattr(models, "_load_gguf", slow_load)
    monkeypatch.setattr(models, "save_hf_dir", lambda model, tok, path: (path / "config.json").write_text("{}"))
    monkeypatch.setenv("ELUTQ_CACHE", str(tmp_path / "cache"))
    gguf, dest = tmp_path / "m.gguf", tmp_path / "cache" / "models" / "M"
    first = threading.Thread(target=models._convert_gguf, args=(gguf, dest))
    first.start()
    assert started.wait(5)
    assert models._convert_gguf(gguf, dest) == dest  # blocks until the first has finished
    first.join()
    assert calls == [gguf]
    assert (dest / "config.json").read_text() == "{}"
    assert [p.name for p in (tmp_path / "cache" / "locks").iterdir()] == ["models-M.lock"]


def test_a_failed_conversion_leaves_the_lock_free(tmp_path, monkeypatch):
    def broken(path):
        raise ElutqError("broken GGUF")

    monkeypatch.setattr(models, "_load_gguf", broken)
    monkeypatch.setenv("ELUTQ_CACHE", str(tmp_path / "cache"))
    dest = tmp_path / "cache" / "models" / "M"
    for _ in range(2):  # the second attempt would hang if the first kept the lock
        with pytest.raises(ElutqError, match="broken GGUF"):
            models._convert_gguf(tmp_path / "m.gguf", dest)
    assert not dest.exists()
