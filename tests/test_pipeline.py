"""GPTQ and the streaming pipeline: oracles, resume after a kill, offload, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from elutq import gptq as gptq_mod
from elutq.calibration import CalibConfig
from elutq.checkpoint import load_quantized, read_tensors
from elutq.gptq import Hessian, gptq_quantize_weight
from elutq.hlq import QuantConfig, QuantizedWeight, quantize_weight
from elutq.models import load_model
from elutq.modules import HLQLinear
from elutq.pipeline import PipelineConfig, quantize_streaming
from elutq.quantize import quantize
from elutq.utils import ElutqError

CALIB = CalibConfig(n_samples=8, seqlen=32)  # WikiText-2 valid


def gptq_cfg(**kw) -> PipelineConfig:
    return PipelineConfig(**{"quant": QuantConfig(2, 32), "calib": CALIB, "batch_size": 3, **kw})


# ----------------------------------------------------------------------------- GPTQ itself


@pytest.mark.parametrize("fmt", ["hlq", "uniform"])
def test_gptq_with_identity_hessian_is_rtn(minilm_weights, fmt):
    """With uncorrelated inputs there is no error to feed back: GPTQ must reduce to RTN exactly."""
    w = minilm_weights["encoder.layer.1.attention.output.dense.weight"]
    cfg = QuantConfig(3, 64, fmt)
    rtn = quantize_weight(w, cfg)
    gptq = gptq_quantize_weight(w, torch.eye(w.shape[1]), cfg, act_order=False)
    assert torch.equal(gptq.codes, rtn.codes)
    assert torch.equal(gptq.scales, rtn.scales) and torch.equal(gptq.zeros, rtn.zeros)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_in_place_inverse_hessian_factor_matches_torch(dtype):
    """The CPU path factors in place with LAPACK (bounded memory); torch's allocating functions
    (the GPU path) are the reference.  The Hessian is rank-deficient, as with short calibration."""
    x = correlated_inputs(300, n=200).double()
    h = (x.T @ x / 200).to(dtype)
    lam = 0.01 * h.diagonal().mean().item()
    ref = gptq_mod._inverse_hessian_factor_torch(h.clone(), lam, 0.01)
    got = gptq_mod._inverse_hessian_factor(h.clone(), 0.01)
    assert got.dtype == torch.float32 and got.is_contiguous() and torch.equal(got, got.triu())
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert (got - ref).abs().max() <= tol * ref.abs().max()
    # UᵀU is the damped inverse: (UᵀU)⁻¹ = H + λI
    u = got.double()
    damped = h.double() + lam * torch.eye(300, dtype=torch.float64)
    assert torch.allclose(torch.linalg.inv(u.T @ u), damped, rtol=0, atol=1e-3 * h.diagonal().mean().item())


def test_in_place_inverse_hessian_factor_retries_with_more_damping():
    """An indefinite matrix fails the first factorization; the retry must start from the original
    values (kept in the triangle LAPACK did not touch) and add damping until it succeeds."""
    n = 600  # wider than the restore's block of 512 rows, so both of its branches run
    h = torch.eye(n, dtype=torch.float64)
    h[0, 1] = h[1, 0] = 1.025  # eigenvalue -0.025: needs λ > 0.025, the first try has 0.01
    h[5:9, 5:9] += 0.3
    h[3, 550] = h[550, 3] = 0.2  # an entry across the blocks
    u = gptq_mod._inverse_hessian_factor(h.clone(), 0.01).double()
    d = torch.linalg.inv(u.T @ u) - h  # = λ·I for the λ that succeeded
    lam = d.diagonal().mean().item()
    assert 0.025 < lam < 0.06
    assert torch.allclose(d, lam * torch.eye(n, dtype=torch.float64), atol=1e-5)


def test_permute_symmetric_in_place():
    h = correlated_inputs(96, n=300).T.double().cov()
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(1))
    got = h.clone()
    gptq_mod._permute_symmetric_(got, perm, block=10)
    assert torch.equal(got, h[perm][:, perm])


def correlated_inputs(n_features: int, n: int = 4096) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(n_features // 8, n_features, generator=g)
    scale = torch.rand(n_features, generator=g) * 3  # uneven channel magnitudes, as in LLMs
    return (
        torch.randn(n, n_features // 8, generator=g) @ basis + 0.3 * torch.randn(n, n_features, generator=g)
    ) * scale


@pytest.mark.parametrize("bits", [2, 3])
def test_gptq_beats_rtn_on_output_error(minilm_weights, bits):
    w = minilm_weights["encoder.layer.2.intermediate.dense.weight"]
    x = correlated_inputs(w.shape[1])
    fit, held_out = x[:2048], x[2048:]
    h = Hessian(w.shape[1])
    h.add(fit)

    def out_err(qw) -> float:
        return (held_out @ (qw.dequantize() - w).T).pow(2).mean().item()

    errs = {}
    for fmt in ("uniform", "hlq"):
        cfg = QuantConfig(bits, 128, fmt)
        errs[f"{fmt}-rtn"] = out_err(quantize_weight(w, cfg))
        errs[f"{fmt}-gptq"] = out_err(gptq_quantize_weight(w, h.h, cfg))
        errs[f"{fmt}-gptq-fixed"] = out_err(gptq_quantize_weight(w, h.h, cfg, codes="fixed"))
    assert errs["uniform-gptq"] < 0.8 * errs["uniform-rtn"], errs
    assert errs["hlq-gptq"] < 0.8 * errs["hlq-rtn"], errs
    assert errs["hlq-gptq"] < errs["uniform-gptq"], errs
    assert errs["hlq-gptq"] <= errs["hlq-gptq-fixed"], errs  # re-choosing codes per column helps


def test_act_order_keeps_groups_contiguous(minilm_weights):
    w = minilm_weights["encoder.layer.0.attention.self.key.weight"]
    h = Hessian(w.shape[1])
    h.add(correlated_inputs(w.shape[1], 1024))
    qw = gptq_quantize_weight(w, h.h, QuantConfig(2, 64), act_order=True)
    # Every stored value must be one of its own group's levels.
    levels = (
        qw.zeros.float().unsqueeze(-1)
        + qw.scales.float() @ torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=torch.float32).T
    )
    deq = qw.dequantize().view(w.shape[0], -1, 64)
    assert all(torch.isin(deq[r, j], levels[r, j]).all() for r in range(0, w.shape[0], 37) for j in range(6))


# ----------------------------------------------------------------------------- the pipeline


def test_streaming_rtn_equals_in_memory_rtn(tiny_llama, tmp_path):
    model, path = tiny_llama
    quantize_streaming(
        str(path), tmp_path / "q", PipelineConfig(quant=QuantConfig(2, 32), method="rtn", lm_head=None), progress=False
    )
    quantize(model, QuantConfig(2, 32), progress=False)
    loaded, _, qc = load_quantized(tmp_path / "q")
    assert qc["method"] == "rtn" and "lm_head" not in qc["modules"]
    for name, m in model.named_modules():
        if isinstance(m, HLQLinear):
            assert torch.equal(m.qweight, loaded.get_submodule(name).qweight), name
            assert torch.equal(m.scales, loaded.get_submodule(name).scales), name


def test_streaming_quantized_embeddings_and_per_channel_groups(tiny_llama, tmp_path, monkeypatch):
    """``embed``: the pipeline writes the embeddings as HLQ (RTN, in row slices, like the in-memory
    quantizer's), unties the head and keeps it 16-bit; per-channel groups (-1) load in torch and in the
    runtime."""
    import elutq
    import elutq.pipeline as pipeline

    model, path = tiny_llama
    monkeypatch.setattr(pipeline, "HEAD_ROWS", 37)
    cfg = PipelineConfig(quant=QuantConfig(2, -1), method="rtn", lm_head=None, embed=QuantConfig(3, 64))
    report = quantize_streaming(str(path), tmp_path / "q", cfg, progress=False)
    in_memory = quantize(model, QuantConfig(2, -1), progress=False, embed=QuantConfig(3, 64))
    loaded, _, qc = load_quantized(tmp_path / "q", fp16_kv=True)
    assert qc["modules"]["model.embed_tokens"] == {"bits": 3, "group_size": 64}
    assert not loaded.config.tie_word_embeddings and "model.embed_tokens.weight" not in read_tensors(tmp_path / "q")
    for t in ("qweight", "scales", "zeros"):
        assert torch.equal(getattr(loaded.model.embed_tokens, t), getattr(model.model.embed_tokens, t)), t
    assert torch.equal(loaded.lm_head.weight.half(), model.lm_head.weight.half())
    assert (report.n_params, report.storage_bits) == (in_memory.n_params, in_memory.storage_bits)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    with torch.no_grad():
        ref = loaded(torch.tensor([ids])).logits[0]
    got = elutq.load(tmp_path / "q", float_tables=True).logits(ids)
    # float rounding and the fp16 KV cache (test_runtime.py); a wrong embedding row costs ~10 %
    assert ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item() < 2e-4


def test_streaming_shared_head_and_embedding_match_in_memory(tiny_llama, tmp_path):
    """A tied model with head and embeddings quantized alike: the pipeline stores one tensor (the head's), the
    same one the in-memory quantizer shares, and counts its bits once."""
    model, path = tiny_llama
    cfg = PipelineConfig(quant=QuantConfig(2, 32), method="rtn", lm_head=QuantConfig(3, 64), embed=QuantConfig(3, 64))
    report = quantize_streaming(str(path), tmp_path / "q", cfg, progress=False)
    in_memory = quantize(model, QuantConfig(2, 32), lm_head=cfg.lm_head, progress=False, embed=cfg.embed)
    stored = read_tensors(tmp_path / "q")
    assert not any(k.startswith("model.embed_tokens.") for k in stored)
    loaded, _, qc = load_quantized(tmp_path / "q")
    assert qc["modules"]["model.embed_tokens"]["shared_with"] == "lm_head"
    for t in ("qweight", "scales", "zeros"):
        assert torch.equal(stored[f"lm_head.{t}"], getattr(model.lm_head, t)), t
    assert loaded.model.embed_tokens.qweight is loaded.lm_head.qweight
    assert (report.n_params, report.storage_bits) == (in_memory.n_params, in_memory.storage_bits)


def test_gptq_calibrates_on_the_quantized_embeddings(tiny_llama, tmp_path, monkeypatch):
    """With quantized embeddings, GPTQ's first layer sees the rows the checkpoint stores (dequantized),
    not the float ones."""
    import elutq.pipeline as pipeline
    from elutq.calibration import calibration_ids

    _, path = tiny_llama
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    calib = CalibConfig(n_samples=4, seqlen=16, dataset=None, text=str(text))
    seen = []
    real = pipeline.quantize_layer_gptq

    def spy(layer, acts, pos, cfg, prefix=""):
        if not seen:
            seen.append(torch.cat(list(acts)))
        return real(layer, acts, pos, cfg, prefix)

    monkeypatch.setattr(pipeline, "quantize_layer_gptq", spy)
    cfg = PipelineConfig(quant=QuantConfig(2, 32), method="gptq", calib=calib, lm_head=None, embed=QuantConfig(2, 32))
    quantize_streaming(str(path), tmp_path / "q", cfg, progress=False)
    loaded, tokenizer, _ = load_quantized(tmp_path / "q")
    ids, _ = calibration_ids(tokenizer, calib)
    with torch.no_grad():
        stored = loaded.model.embed_tokens(ids).float()
    assert torch.equal(seen[0], stored)
    float_rows = load_model(str(path))[0].model.embed_tokens(ids).float()
    assert not torch.equal(seen[0], float_rows)  # the quantized rows differ from the float ones


def test_streaming_gptq_checkpoint_loads_and_beats_rtn(tiny_llama, tmp_path):
    _, path = tiny_llama
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    calib = CalibConfig(n_samples=8, seqlen=32, dataset=None, text=str(text))
    ref, tokenizer = load_model(str(path))
    ids = tokenizer("The lazy dog jumps over the quick brown fox. " * 6, return_tensors="pt").input_ids
    with torch.no_grad():
        ref_logits = ref(ids).logits
    errs = {}
    for method in ("rtn", "gptq"):
        cfg = PipelineConfig(quant=QuantConfig(2, 32), method=method, calib=calib, lm_head=QuantConfig(4, 32))
        report = quantize_streaming(str(path), tmp_path / method, cfg, progress=False)
        # w2g32 linears cost 2 + 48/32 = 3.5 bits, the w4g32 lm_head 4 + 80/32 = 6.5
        assert len(report.layer_errors) == 2 and 3.5 < report.bits_per_weight < 4.0
        model, _, qc = load_quantized(tmp_path / method)
        assert isinstance(model.lm_head, HLQLinear) and not model.config.tie_word_embeddings
        with torch.no_grad():
            errs[method] = (model(ids).logits - ref_logits).pow(2).mean().item()
    assert qc["calibration_text"] == str(text)
    assert errs["gptq"] < errs["rtn"], errs


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_lm_head_quantized_in_row_slices_equals_whole(tiny_llama, tmp_path, monkeypatch, method):
    """The lm_head is quantized HEAD_ROWS rows at a time (bounded memory); rows are independent, so
    slicing changes nothing."""
    import elutq.pipeline as pipeline

    _, path = tiny_llama
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    calib = CalibConfig(n_samples=4, seqlen=32, dataset=None, text=str(text))
    cfg = PipelineConfig(quant=QuantConfig(2, 32), method=method, calib=calib, lm_head=QuantConfig(3, 32))
    quantize_streaming(str(path), tmp_path / "whole", cfg, progress=False)
    monkeypatch.setattr(pipeline, "HEAD_ROWS", 37)  # not a divisor of the vocabulary: a short last slice
    quantize_streaming(str(path), tmp_path / "sliced", cfg, progress=False)
    whole, sliced = read_tensors(tmp_path / "whole"), read_tensors(tmp_path / "sliced")
    for k in ("lm_head.qweight", "lm_head.scales", "lm_head.zeros"):
        assert whole[k].shape == sliced[k].shape, k
        if method == "rtn":
            assert torch.equal(whole[k], sliced[k]), k
    if method == "gptq":  # same algorithm per row; BLAS may round differently for other matrix heights
        a, b = (QuantizedWeight.unpack(t["lm_head.qweight"], t["lm_head.scales"], t["lm_head.zeros"], 160, 32)
                for t in (whole, sliced))  # fmt: skip
        assert (a.codes == b.codes).float().mean() > 0.99
        assert torch.allclose(a.dequantize(), b.dequantize(), atol=1e-2)


def test_safetensors_source_reads_what_safe_open_reads(tmp_path):
    from safetensors.torch import save_file

    from elutq.checkpoint import SafetensorsDir

    ts = {
        "a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(7).half(), "c": torch.randn(2, 2, 2),
        "d": torch.arange(6, dtype=torch.int64).reshape(2, 3), "e": torch.empty(0, 4), "f": torch.tensor([True, False]),
    }  # fmt: skip
    save_file(ts, str(tmp_path / "model.safetensors"))
    src = SafetensorsDir(tmp_path)
    for k, t in ts.items():
        got = src.get(k)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), k


def test_layer_by_layer_pass_matches_the_full_model(tiny_llama):
    """The pipeline's generic walker (embed → layers with explicit RoPE, no mask) equals model()."""
    from elutq.layerloop import run_layer

    model, _ = tiny_llama
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states[-2]  # input of the final norm... of last layer
        x = model.model.embed_tokens(ids)
        pos = model.model.rotary_emb(x, torch.arange(24).unsqueeze(0))
        for layer in model.model.layers[:-1]:
            x = run_layer(layer, x, pos)
    torch.testing.assert_close(x, expected)


def run_cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "elutq", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def quant_args(path: Path, out: Path, *extra: str) -> list[str]:
    return [
        "quantize",
        str(path),
        "-o",
        str(out),
        "--bits",
        "2",
        "--group-size",
        "32",
        "--calib-samples",
        "8",
        "--calib-seqlen",
        "32",
        "--lm-head-bits",
        "4",
        "--lm-head-group-size",
        "32",
        *extra,
    ]


@pytest.fixture()
def deeper_llama(tmp_path):
    from conftest import save_tiny_llama

    path = tmp_path / "deeper"
    save_tiny_llama(
        path, seed=1, hidden_size=96, intermediate_size=160, num_hidden_layers=5, max_position_embeddings=64
    )
    (path / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 100)
    return path


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = read_tensors(a), read_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


@pytest.mark.parametrize("offload", ["never", "always"])
def test_crash_then_resume_gives_the_same_checkpoint(deeper_llama, tmp_path, offload):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert run_cli(quant_args(deeper_llama, full, "--offload", offload)).returncode == 0
    crashed = run_cli(
        quant_args(deeper_llama, resumed, "--offload", offload), env={"ELUTQ_TEST_CRASH_AFTER_LAYER": "2"}
    )
    assert crashed.returncode == 17 and not resumed.exists()
    assert json.loads((tmp_path / "resumed.partial" / "progress.json").read_text())["layers_done"] == 3
    again = run_cli(quant_args(deeper_llama, resumed, "--offload", offload))
    assert again.returncode == 2 and "--resume" in again.stderr  # refuses to silently restart
    done = run_cli(quant_args(deeper_llama, resumed, "--offload", offload, "--resume"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed after layer 2" in done.stdout
    assert not (tmp_path / "resumed.partial").exists()
    assert_same_checkpoint(full, resumed)


def test_sigkill_mid_run_then_resume(deeper_llama, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert run_cli(quant_args(deeper_llama, full)).returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "elutq", *quant_args(deeper_llama, resumed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    progress = tmp_path / "resumed.partial" / "progress.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and json.loads(progress.read_text())["layers_done"] >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not resumed.exists()
    done = run_cli(quant_args(deeper_llama, resumed, "--resume"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_checkpoint(full, resumed)


def test_resume_with_other_settings_is_refused(deeper_llama, tmp_path):
    out = tmp_path / "q"
    run_cli(quant_args(deeper_llama, out), env={"ELUTQ_TEST_CRASH_AFTER_LAYER": "0"})
    res = run_cli(quant_args(deeper_llama, out, "--resume", "--damp", "0.05"))
    assert res.returncode == 2 and "other settings" in res.stderr


def test_calibration_text_too_short(tiny_llama, tmp_path):
    _, path = tiny_llama
    (tmp_path / "short.txt").write_text("too short")
    cfg = gptq_cfg(calib=CalibConfig(n_samples=8, seqlen=32, dataset=None, text=str(tmp_path / "short.txt")))
    with pytest.raises(ElutqError, match="fewer than"):
        quantize_streaming(str(path), tmp_path / "q", cfg, progress=False)
    assert not (tmp_path / "q").exists()
    # Nothing was finished, so the fixed command simply runs (no --resume/--overwrite needed).
    (tmp_path / "short.txt").write_text("The quick brown fox jumps over the lazy dog. " * 100)
    quantize_streaming(str(path), tmp_path / "q", cfg, progress=False)
    assert (tmp_path / "q" / "config.json").is_file()


def test_unwritable_offload_dir(tiny_llama, tmp_path):
    _, path = tiny_llama
    (tmp_path / "afile").write_text("x")
    cfg = PipelineConfig(
        quant=QuantConfig(2, 32), calib=CALIB, offload="always", offload_dir=str(tmp_path / "afile" / "acts")
    )
    with pytest.raises(ElutqError, match="cannot write to the offload directory"):
        quantize_streaming(str(path), tmp_path / "q", cfg, progress=False)


def test_offload_dir_without_space(tiny_llama, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    _, path = tiny_llama
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 0))
    cfg = PipelineConfig(quant=QuantConfig(2, 32), calib=CALIB, offload="always", offload_dir=str(tmp_path / "a"))
    with pytest.raises(ElutqError, match="GiB free"):
        quantize_streaming(str(path), tmp_path / "q", cfg, progress=False)


def test_index_pointing_at_missing_shard(tiny_llama, tmp_path):
    _, path = tiny_llama
    weights = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "model-00002-of-00002.safetensors" for k in weights}})
    )
    with pytest.raises(ElutqError, match="model-00002-of-00002.safetensors, which is missing"):
        quantize_streaming(str(path), tmp_path / "q", gptq_cfg(), progress=False)


def test_layers_that_cannot_be_walked(tiny_llama, tmp_path):
    from safetensors.torch import save_file

    _, path = tiny_llama
    weights = load_file(str(path / "model.safetensors"))
    save_file(
        {k.replace("model.layers.", "transformer.h."): v for k, v in weights.items()}, str(path / "model.safetensors")
    )
    with pytest.raises(ElutqError, match="cannot be walked"):
        quantize_streaming(str(path), tmp_path / "q", gptq_cfg(), progress=False)


def test_disk_full_mid_run_then_resume(deeper_llama, tmp_path, monkeypatch):
    """A write that fails half-way (ENOSPC while offloading layer 2's outputs) is a clear error, and
    --resume afterwards gives the same checkpoint as an uninterrupted run."""
    import errno

    import elutq.layerloop as layerloop

    cfg = gptq_cfg(
        calib=CalibConfig(n_samples=8, seqlen=32, dataset=None, text=str(deeper_llama / "calib.txt")),
        offload="always",
        offload_dir=str(tmp_path / "acts"),
    )
    quantize_streaming(str(deeper_llama), tmp_path / "full", cfg, progress=False)

    real_save = layerloop.save_file

    def full_disk(tensors, path, *args, **kwargs):
        if "layer-00002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(layerloop, "save_file", full_disk)
    with pytest.raises(ElutqError, match=r"No space left on device.*--resume"):
        quantize_streaming(str(deeper_llama), tmp_path / "q", cfg, progress=False)
    assert not (tmp_path / "q").exists()
    assert json.loads((tmp_path / "q.partial" / "progress.json").read_text())["layers_done"] == 1
    monkeypatch.setattr(layerloop, "save_file", real_save)
    report = quantize_streaming(str(deeper_llama), tmp_path / "q", cfg, resume=True, progress=False)
    assert report.resumed_from == 1
    assert_same_checkpoint(tmp_path / "full", tmp_path / "q")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(tiny_llama, tmp_path, capsys):
    from elutq.cli import main

    _, path = tiny_llama
    with pytest.raises(ElutqError, match=r"sees no CUDA GPU.*--device cpu"):
        quantize_streaming(str(path), tmp_path / "q", gptq_cfg(device="cuda"), progress=False)
    assert main(quant_args(path, tmp_path / "q", "--device", "cuda")) == 2
    assert "sees no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_device_names():
    from elutq.pipeline import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "gpu0", "mps"):
        with pytest.raises(ElutqError, match="--device"):
            resolve_device(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gptq_on_cuda_matches_cpu(minilm_weights):
    """Same algorithm on the GPU: the codes may differ only where fp noise flips a near-tie."""
    w = minilm_weights["encoder.layer.2.intermediate.dense.weight"]
    h = Hessian(w.shape[1])
    h.add(correlated_inputs(w.shape[1], 2048))
    for fmt in ("hlq", "uniform"):
        cfg = QuantConfig(2, 128, fmt)
        cpu = gptq_quantize_weight(w, h.h, cfg, act_order=True)
        gpu = gptq_quantize_weight(w.cuda(), h.h.cuda(), cfg, act_order=True)
        assert (cpu.codes == gpu.codes).float().mean() > 0.99
        x = correlated_inputs(w.shape[1], 512)
        e_cpu = (x @ (cpu.dequantize() - w).T).pow(2).mean()
        e_gpu = (x @ (gpu.dequantize() - w).T).pow(2).mean()
        assert abs(e_cpu - e_gpu) < 0.02 * e_cpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_streaming_gptq_on_cuda_matches_cpu(deeper_llama, tmp_path):
    calib = CalibConfig(n_samples=8, seqlen=32, dataset=None, text=str(deeper_llama / "calib.txt"))
    models = {}
    for dev in ("cpu", "cuda"):
        quantize_streaming(str(deeper_llama), tmp_path / dev, gptq_cfg(calib=calib, device=dev), progress=False)
        models[dev] = load_quantized(tmp_path / dev)[0]
    ref = load_model(str(deeper_llama))[0]
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        errs = {d: (m(ids).logits - ref(ids).logits).pow(2).mean().item() for d, m in models.items()}
    assert abs(errs["cuda"] - errs["cpu"]) < 0.05 * errs["cpu"], errs
