"""Damaged inputs are detected (issue 27): recorded shard checksums, header/config/tensor checks,
non-finite values, a kernel cache keyed by content and checked per file, clear errors for broken
tokenizer/JSON/GGUF files.  Never a confident wrong answer, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

import elutq
from conftest import save_tiny_model
from elutq.checkpoint import load_quantized, save_quantized
from elutq.cli import main
from elutq.hlq import QuantConfig
from elutq.quantize import quantize
from elutq.runtime import KERNEL_CACHE_DIR, Session
from elutq.utils import ElutqError

IDS = [1, 5, 9, 17, 33, 2]
LIN = "model.layers.0.self_attn.q_proj"


def _logits(path: Path) -> np.ndarray:
    m = elutq.load(path, max_ctx=32, float_tables=True)
    return m.forward(Session(m), IDS)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Two checkpoints of the same shape (different weights) and a reference copy of the first."""
    tmp = tmp_path_factory.mktemp("integrity")
    out = []
    for seed in (0, 1):
        model = save_tiny_model(tmp / f"src{seed}", "llama-untied", seed=seed)
        quantize(model, QuantConfig(3, 32), progress=False)
        tok = AutoTokenizer.from_pretrained(tmp / f"src{seed}")
        out.append(save_quantized(model, tok, tmp / f"q{seed}", {"method": "rtn"}))
    ref = _logits(out[0])
    shutil.rmtree(out[0] / KERNEL_CACHE_DIR)
    return out[0], out[1], ref


@pytest.fixture()
def ckpt(made, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(made[0], dst)
    return dst


def both_refuse(path: Path, match: str) -> None:
    with pytest.raises(ElutqError, match=match):
        elutq.load(path, max_ctx=32)
    with pytest.raises(ElutqError, match=match):
        load_quantized(path)


def _config(path: Path, edit) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _drop_checksums(path: Path) -> None:  # as an older elutq (or another tool) would leave it
    _config(path, lambda c: c["quantization_config"].pop("shards"))


def _retensor(path: Path, edit) -> None:
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def _edit_header(path: Path, edit) -> None:
    """Edit the JSON header of model.safetensors in place, keeping its length (padded with spaces)."""
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= n
    data[8 : 8 + n] = raw + b" " * (n - len(raw))
    f.write_bytes(bytes(data))


def test_checkpoint_records_shard_checksums_and_info_verify(ckpt, capsys):
    shards = json.loads((ckpt / "config.json").read_text())["quantization_config"]["shards"]
    assert set(shards) == {"model.safetensors"} and len(shards["model.safetensors"]["sha256"]) == 64
    assert main(["info", str(ckpt), "--verify"]) == 0
    assert "matches the recorded sha256" in capsys.readouterr().out


def test_flipped_bytes_in_a_weight_are_detected(ckpt, made, capsys):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    st = f.stat()
    data[-100] ^= 0xFF  # a bit flip inside the tensor data; the size and timestamps are kept
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    both_refuse(ckpt, "does not match the checksum")
    assert main(["info", str(ckpt), "--verify"]) == 2
    assert "model.safetensors does not match the checksum" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s[f"{LIN}.scales"].view(-1).__setitem__(3, float("nan")), f"{LIN}.scales holds NaN"),
        (lambda s: s[f"{LIN}.zeros"].view(-1).__setitem__(0, float("inf")), f"{LIN}.zeros holds NaN or inf"),
        (lambda s: s["model.norm.weight"].view(-1).__setitem__(0, float("inf")), "model.norm.weight holds NaN"),
        (lambda s: s["model.layers.1.input_layernorm.weight"].view(-1).__setitem__(0, float("nan")), "holds NaN"),
    ],
    ids=["nan-scale", "inf-offset", "inf-norm", "nan-layer-norm"],
)
def test_non_finite_values_are_refused_even_without_checksums(ckpt, edit, match):
    _retensor(ckpt, edit)
    _drop_checksums(ckpt)
    both_refuse(ckpt, match)


def test_header_dtype_changed_is_a_clear_error(ckpt, capsys):
    _drop_checksums(ckpt)
    _edit_header(ckpt, lambda h: h["model.norm.weight"].update(dtype="I16"))  # same size: the offsets still fit
    both_refuse(ckpt, "model.norm.weight is I16; 16-bit tensors must be F16, BF16 or F32")
    _edit_header(ckpt, lambda h: h["model.norm.weight"].update(dtype="F16") or h[f"{LIN}.qweight"].update(dtype="I8"))
    both_refuse(ckpt, f"{LIN}.qweight is I8")


def test_header_size_lies_are_clear_errors(ckpt, capsys):
    _drop_checksums(ckpt)
    _edit_header(ckpt, lambda h: h["model.norm.weight"].update(dtype="F32"))  # twice the bytes its offsets span
    both_refuse(ckpt, "not a valid safetensors file.*model.norm.weight")
    assert main(["info", str(ckpt)]) == 2
    assert "not a valid safetensors file" in capsys.readouterr().err


def test_truncated_shard_under_info_and_load(ckpt, capsys):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    assert main(["info", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and "Traceback" not in err
    both_refuse(ckpt, "corrupt or truncated")


def test_config_layer_count_and_bits_are_checked_against_the_tensors(ckpt):
    _config(ckpt, lambda c: c.update(num_hidden_layers=1))
    both_refuse(ckpt, "belongs to no layer of the 1")
    _config(ckpt, lambda c: c.update(num_hidden_layers=2))

    def three_to_four(c):
        c["quantization_config"]["modules"][LIN]["bits"] = 4

    _config(ckpt, three_to_four)  # 3-bit tensors, config says 4: refused by eval's and generate's loaders alike
    both_refuse(ckpt, f"tensor {LIN}.qweight is torch.uint8 .*expected torch.uint8 .*config.json: 4-bit")


def test_kernel_cache_is_checked_per_file_and_rebuilt(ckpt, made):
    ref = made[2]
    np.testing.assert_array_equal(_logits(ckpt), ref)  # builds the cache
    (cache,) = [d for d in (ckpt / KERNEL_CACHE_DIR).iterdir() if d.is_dir()]
    w0, w1 = cache / f"{LIN}.w.npy", cache / "model.layers.0.self_attn.k_proj.w.npy"
    sz = cache / "model.layers.1.mlp.down_proj.sz.npy"
    w2 = cache / "model.layers.1.mlp.up_proj.w.npy"

    def keep_times(f: Path, write) -> None:
        st = f.stat()
        write()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))

    keep_times(w2, lambda: w2.write_bytes(b""))  # zero-length
    a = np.load(sz)
    a.reshape(-1).view(np.uint8)[:16] = 0xFF  # all-ones: NaN as fp16 or fp32
    keep_times(sz, lambda: np.save(sz, a))  # a valid .npy with NaNs, timestamps restored
    rnd = np.random.default_rng(0).integers(0, 256, w0.stat().st_size, dtype=np.uint8).tobytes()
    keep_times(w0, lambda: w0.write_bytes(rnd))  # random bytes
    np.testing.assert_array_equal(_logits(ckpt), ref)
    # swapped matrices of two linears of one shape
    tmp = cache / "swap"
    w0.rename(tmp)
    w1.rename(w0)
    tmp.rename(w1)
    np.testing.assert_array_equal(_logits(ckpt), ref)


def test_rewritten_weights_with_restored_timestamp_miss_the_cache(ckpt, made):
    other = made[1]
    _logits(ckpt)  # cache built for the first weights
    f = ckpt / "model.safetensors"
    st = f.stat()
    shutil.copyfile(other / "model.safetensors", f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    both_refuse(ckpt, "does not match the checksum")  # recorded checksums: refused
    _drop_checksums(ckpt)  # without them, the content-keyed cache still is not reused
    np.testing.assert_array_equal(_logits(ckpt), _logits(other))


def test_missing_tokenizer_files(ckpt):
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (ckpt / f).unlink(missing_ok=True)
    with pytest.raises(ElutqError, match="no tokenizer files"):
        elutq.load(ckpt, max_ctx=32)


def test_damaged_tokenizer_file(ckpt):
    (ckpt / "tokenizer.json").write_text("{not json")
    with pytest.raises(ElutqError, match="cannot load the tokenizer"):
        elutq.load(ckpt, max_ctx=32)


def test_invalid_config_and_index_json_name_the_file(ckpt, capsys):
    good = (ckpt / "config.json").read_text()
    (ckpt / "config.json").write_text(good[:-20])
    for argv in (["info", str(ckpt)], ["generate", str(ckpt), "-p", "x"]):
        assert main(argv) == 2
        assert f"{ckpt / 'config.json'} is not valid JSON" in capsys.readouterr().err
    (ckpt / "config.json").write_text(good)
    (ckpt / "model.safetensors.index.json").write_text('{"weight_map": ')
    assert main(["info", str(ckpt)]) == 2
    assert "model.safetensors.index.json is not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("size", [0, 10, 1024], ids=["empty", "10B", "1KB"])
def test_truncated_gguf_is_a_clear_error(tmp_path, size, capsys, monkeypatch):
    monkeypatch.setenv("ELUTQ_CACHE", str(tmp_path / "cache"))
    g = tmp_path / "m.gguf"
    header = b"GGUF" + (3).to_bytes(4, "little") + (10).to_bytes(8, "little") + (30).to_bytes(8, "little")
    g.write_bytes((header + bytes(range(256)) * 8)[:size])
    assert main(["quantize", str(g), "-o", str(tmp_path / "q"), "--method", "rtn"]) == 2
    err = capsys.readouterr().err
    assert "GGUF" in err and "Traceback" not in err


def test_partial_real_gguf_is_a_clear_error(tmp_path, capsys, monkeypatch):
    from elutq.models import _default_gguf

    try:
        src = _default_gguf()
    except ElutqError:
        pytest.skip("the default model's package is not installed")
    monkeypatch.setenv("ELUTQ_CACHE", str(tmp_path / "cache"))
    g = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        g.write_bytes(f.read(3 * 2**20))
    assert main(["quantize", str(g), "-o", str(tmp_path / "q"), "--method", "rtn"]) == 2
    err = capsys.readouterr().err
    assert "cut.gguf" in err and "GGUF" in err, err


def test_load_refuses_a_tensor_with_a_wrong_shape(ckpt):
    _drop_checksums(ckpt)
    _retensor(ckpt, lambda s: s.update({"model.norm.weight": torch.ones(7, dtype=torch.float16)}))
    both_refuse(ckpt, "model.norm.weight has shape")
