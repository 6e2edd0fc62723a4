"""Incoherence rotations (issue 30): the Hadamard constructions, the rotated network's exactness (fp32), rotated
checkpoints through every reader (torch, native runtime, transformers, finetuning), bad input, and the point
of it all — lower quantization error on real weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import elutq.rotation as rotation_module
from conftest import save_tiny_llama, save_tiny_model
from elutq.checkpoint import SafetensorsDir, load_quantized, read_quantization_config, read_tensors
from elutq.hlq import QuantConfig, quantize_weight
from elutq.modules import rotate_final_norm, rotate_mlps
from elutq.pipeline import PipelineConfig, quantize_streaming
from elutq.rotation import NORM_ROTATION, RotatedSource, Rotation, hadamard, orthogonal
from elutq.utils import ElutqError


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 96, 160, 576, 960, 1536, 8960])
def test_hadamard_constructions(n):
    h = hadamard(n)
    assert h is not None and set(np.unique(h)) <= {-1.0, 1.0}
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))


def test_no_hadamard_is_a_clear_error():
    assert hadamard(6) is None and hadamard(18) is None  # no Hadamard matrix of order 2 mod 4 beyond 2
    with pytest.raises(ElutqError, match="--rotation-matrix block"):
        orthogonal(18, "hadamard", 0)


@pytest.mark.parametrize("matrix", ["hadamard", "block", "random"])
def test_orthogonal(matrix):
    q = orthogonal(96, matrix, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(96, dtype=torch.float64), atol=1e-12, rtol=0)
    assert not torch.equal(q, orthogonal(96, matrix, seed=4))  # seeded


def _rotated_model(path, rotation: Rotation):
    """The fp32 model built from the rotated source's tensors (what a rotated checkpoint holds, unquantized)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    src = RotatedSource(SafetensorsDir(path), config, rotation)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if config.tie_word_embeddings:
        rotate_final_norm(model)
    rotate_mlps(model, rotation)
    result = model.load_state_dict({k: src.get(k) for k in model.state_dict() if k in src}, strict=False)
    assert result.missing_keys == (["lm_head.weight"] if config.tie_word_embeddings else [])
    model.tie_weights()
    return model


@pytest.mark.parametrize("arch", ["llama", "llama-untied", "qwen2", "qwen3"])
def test_rotated_model_computes_the_same_logits(tmp_path, arch, monkeypatch):
    monkeypatch.setattr(rotation_module, "ROTATE_ROWS", 100)  # the 256-row vocabulary in 3 blocks, the last short
    ref = save_tiny_model(tmp_path / arch, arch, dtype=torch.float32)  # random norm weights and biases
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        for rotation in (Rotation(), Rotation(matrix="block"), Rotation(matrix="random"), Rotation("full")):
            got = _rotated_model(tmp_path / arch, rotation)(ids).logits
            torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_rotation_lowers_2bit_error_on_real_weights():
    """SmolLM2's q/k/v and gate/up weights (the norm's weight folded in, as the rotation does) quantize to 2 bits
    with a lower error once rotated; an orthogonal Q keeps the Frobenius norm, so the errors compare directly."""
    from elutq.models import resolve_source_dir

    src = SafetensorsDir(resolve_source_dir("default"))
    q = orthogonal(576, "hadamard", 0).float()
    cfg = QuantConfig(2, 128)
    ratios = []
    for name, norm in (("self_attn.q_proj", "input_layernorm"), ("mlp.up_proj", "post_attention_layernorm")):
        for layer in (0, 15, 29):
            p = f"model.layers.{layer}."
            w = src.get(f"{p}{name}.weight").float() * src.get(f"{p}{norm}.weight").float()
            plain = (quantize_weight(w, cfg).dequantize() - w).pow(2).sum()
            rotated = (quantize_weight(w @ q, cfg).dequantize() - w @ q).pow(2).sum()
            ratios.append((rotated / plain).item())
    assert max(ratios) < 0.95 and sum(ratios) / len(ratios) < 0.85, ratios  # measured: 0.66-0.90, mean 0.78


def _rotated_ckpt(tmp_path, kind: str):
    """A tied 3-layer llama (hidden 96 = Paley 12 x 8, intermediate 160 = Paley 20 x 8) and its GPTQ w4g32
    checkpoint, rotated."""
    from elutq.calibration import CalibConfig

    src = tmp_path / "src"
    save_tiny_llama(src, seed=1, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                    max_position_embeddings=64, tie_word_embeddings=True)  # fmt: skip
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. A lazy dog sleeps. " * 60)
    calib = CalibConfig(n_samples=16, seqlen=32, dataset=None, text=str(text))
    q4 = QuantConfig(4, 32)
    cfg = PipelineConfig(quant=q4, method="gptq", lm_head=q4, embed=q4, calib=calib, rotation=Rotation(kind))
    quantize_streaming(str(src), tmp_path / "q", cfg, progress=False)
    return src, tmp_path / "q", calib


@pytest.fixture()
def rotated_ckpt(tmp_path):
    return _rotated_ckpt(tmp_path, "full")


@pytest.mark.parametrize("kind", ["residual", "full"])
def test_rotated_checkpoint_through_every_reader(tmp_path, kind, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("ELUTQ_HF_KERNELS", "off")  # transformers' reader on the dequantized weights: bit-identical

    import elutq

    src, ckpt, _ = _rotated_ckpt(tmp_path, kind)
    qc = read_quantization_config(ckpt)
    assert qc["version"] == 2 and qc["rotation"] == {**Rotation(kind).spec(), "norm_matrix": True}
    assert NORM_ROTATION in SafetensorsDir(ckpt)
    model, _, _ = load_quantized(ckpt)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]])
    with torch.no_grad():
        got = model(ids).logits[0]
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits[0]
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9  # 4 bits: close to the unrotated source
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits[0], got, atol=0, rtol=0)
    native = elutq.load(str(ckpt), threads=1, residual_tables=True).logits(ids[0])
    torch.testing.assert_close(native, got, atol=2e-3 * got.abs().max().item(), rtol=0)
    hf.save_pretrained(tmp_path / "saved")  # transformers writes back the rotated checkpoint elutq reads
    assert read_tensors(tmp_path / "saved").keys() == read_tensors(ckpt).keys()
    again, _, qc2 = load_quantized(tmp_path / "saved")
    assert qc2["rotation"] == qc["rotation"]
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits[0], got, atol=0, rtol=0)


def test_unrotated_checkpoint_is_version_1(tiny_llama, tmp_path):
    _, src = tiny_llama
    quantize_streaming(str(src), tmp_path / "q", PipelineConfig(quant=QuantConfig(2, 32), method="rtn"), progress=False)
    qc = read_quantization_config(tmp_path / "q")
    assert qc["version"] == 1 and "rotation" not in qc


def _edit_config(ckpt, fn) -> None:
    cfg_file = ckpt / "config.json"
    cfg = json.loads(cfg_file.read_text())
    fn(cfg["quantization_config"])
    cfg_file.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda qc: qc["rotation"].update(kind="spin"), "cannot apply"),  # a rotation this elutq does not know
        (lambda qc: qc["rotation"].update(norm_matrix=False), NORM_ROTATION),  # tensor and config disagree
        (lambda qc: qc.pop("rotation"), NORM_ROTATION),  # never run unrotated
        (lambda qc: qc.update(version=3), "newer than this elutq"),
    ],
)
def test_rotation_records_that_do_not_fit_are_refused(rotated_ckpt, edit, match):
    import elutq

    _, ckpt, _ = rotated_ckpt
    _edit_config(ckpt, edit)
    with pytest.raises(ElutqError, match=match):
        load_quantized(ckpt)
    with pytest.raises(ElutqError, match=match):
        elutq.load(str(ckpt))


def test_finetune_a_rotated_checkpoint(rotated_ckpt, tmp_path):
    """Block reconstruction trains against the rotated source's layers, end-to-end against the (same) logits."""
    from elutq.finetune import FinetuneConfig, finetune_block, finetune_e2e

    src, ckpt, calib = rotated_ckpt
    cfg = FinetuneConfig(calib=calib, batch_size=2, epochs=2, lr=1e-3)
    block = finetune_block(ckpt, str(src), tmp_path / "block", cfg, progress=False)
    assert all(r["best_val"] <= r["start_val"] for r in block.layers)
    assert all(r["start_val"] < 0.05 for r in block.layers)  # against the unrotated layers it would be ~1
    e2e = finetune_e2e(tmp_path / "block", str(src), tmp_path / "e2e", FinetuneConfig(calib=calib, stage="e2e",
                       batch_size=2, epochs=2, lr=1e-3), progress=False)  # fmt: skip
    assert e2e.e2e["start_val"] < 0.05  # the teacher is the same function: KL starts small
    assert read_quantization_config(tmp_path / "e2e")["rotation"]["norm_matrix"]


@pytest.mark.parametrize("n", [96, 128, 1536, 8960, 24])
def test_online_rotation_equals_the_dense_matrix(n):
    """The fast transform, torch and native (each kernel path), against ``u @ T`` with T the dense matrix it stands
    for."""
    from elutq import _native
    from elutq.modules import OnlineRotation
    from elutq.rotation import fast_factors, fast_matrix

    t = fast_matrix(n, seed=5)
    torch.testing.assert_close(t @ t.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    u = torch.randn(3, n, dtype=torch.float64)
    want = u @ t
    torch.testing.assert_close(OnlineRotation(n, seed=5)(u.float()).double(), want, atol=1e-4, rtol=0)
    signs, a = fast_factors(n, seed=5)
    factors = signs.astype(np.float32), np.ascontiguousarray(a, dtype=np.float32)
    scalar = u.float().numpy().copy()
    _native.hadamard(scalar, *factors, path="scalar")
    np.testing.assert_allclose(scalar, want.numpy(), atol=1e-4, rtol=0)
    for path in _native.available_paths():  # the SIMD passes: the same sums as the plain loops, exactly
        x = u.float().numpy().copy()
        _native.hadamard(x, *factors, path=path)
        np.testing.assert_array_equal(x, scalar)


def test_cli_rotate_with_target_bpw(tiny_llama, tmp_path, monkeypatch, capsys):
    """Mixed precision of a rotated model: the measurement is of the rotated network (a measurement of its own,
    the stored norm matrix counted), the file lands on the target, and it runs."""
    import elutq
    from elutq.cli import main

    monkeypatch.setenv("ELUTQ_CACHE", str(tmp_path / "cache"))
    model, path = tiny_llama  # tied, hidden 160 = Paley 20 x 8
    base = ["quantize", str(path), "--method", "rtn", "--group-size", "128", "--target-bpw", "3.5"]
    assert main([*base, "-o", str(tmp_path / "a"), "--rotate", "full"]) == 0
    achieved = float(capsys.readouterr().out.split("target 3.5 bits per weight -> ")[1].split()[0])
    n_params = sum(p.numel() for p in model.parameters())
    file_bpw = 8 * sum(f.stat().st_size for f in (tmp_path / "a").glob("*.safetensors")) / n_params
    assert 3.3 < achieved <= 3.5 and achieved <= file_bpw < achieved + 0.12  # the norm matrix counted
    measurements = list((tmp_path / "cache" / "measurements").glob("*.json"))
    assert len(measurements) == 1 and json.loads(measurements[0].read_text())["extra_bits"] == 16 * 160 * 160
    assert main([*base, "-o", str(tmp_path / "b")]) == 0  # unrotated: measured anew
    assert len(list((tmp_path / "cache" / "measurements").glob("*.json"))) == 2
    assert read_quantization_config(tmp_path / "a")["rotation"]["kind"] == "full"
    assert elutq.load(str(tmp_path / "a"), threads=1).generate("the cat", max_new_tokens=4).token_ids


def test_cli_rotate_auto(tiny_llama, tmp_path, capsys):
    """``--rotate auto`` (the default): full at 2 bits, none at 3, none with --target-bpw, none where the model's
    sizes have no Hadamard construction; ``--rotate none`` keeps the plain network."""
    from elutq.cli import main

    _, path = tiny_llama
    base = ["quantize", str(path), "--method", "rtn", "--group-size", "32"]

    def rotation(name: str, *extra: str):
        assert main([*base, "-o", str(tmp_path / name), *extra]) == 0
        return read_quantization_config(tmp_path / name).get("rotation")

    assert rotation("w2", "--bits", "2")["kind"] == "full"
    assert rotation("w3", "--bits", "3") is None
    assert rotation("w2-none", "--bits", "2", "--rotate", "none") is None
    assert rotation("w2-res", "--bits", "2", "--rotate", "residual")["kind"] == "residual"
    odd = tmp_path / "odd"  # head_dim 6: no Hadamard matrix of order 6
    save_tiny_llama(odd, hidden_size=24, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)
    assert main(["quantize", str(odd), "--method", "rtn", "--group-size", "32", "--bits", "2", "-o",
                 str(tmp_path / "odd-q")]) == 0  # fmt: skip
    assert read_quantization_config(tmp_path / "odd-q").get("rotation") is None


def test_auto_rotation_follows_the_measurements():
    """``--rotate auto``: full at 2 bits and for targets up to 3 bits per weight, none from 3 bits up and above
    that, none where the model's sizes have no Hadamard construction."""
    from types import SimpleNamespace

    from elutq.rotation import auto_rotation

    cfg = SimpleNamespace(hidden_size=64, num_attention_heads=4)
    assert auto_rotation(cfg, 2).kind == "full" and auto_rotation(cfg, 3) is None and auto_rotation(cfg, 4) is None
    assert auto_rotation(cfg, 4, target_bpw=2.5).kind == "full" and auto_rotation(cfg, 4, target_bpw=3.0).kind == "full"
    assert auto_rotation(cfg, 2, target_bpw=3.5) is None
    odd = SimpleNamespace(hidden_size=42, num_attention_heads=2)  # 42 = 2·21: no Hadamard matrix of that order
    assert auto_rotation(odd, 2) is None and auto_rotation(odd, 4, target_bpw=2.5) is None
