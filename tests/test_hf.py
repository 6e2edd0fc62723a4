"""transformers loads elutq checkpoints after ``import elutq`` (issue 33): the same logits and greedy text as
elutq's own torch model, a tied head/embedding tensor loaded as one, and ``pipeline("text-generation")``."""

from __future__ import annotations

import subprocess
import sys

import torch

from elutq.checkpoint import load_quantized, save_quantized
from elutq.hlq import QuantConfig
from elutq.quantize import quantize


def _checkpoint(tiny_llama, tmp_path):
    model, _ = tiny_llama
    from conftest import tiny_tokenizer

    quantize(model, QuantConfig(2, 32), lm_head=QuantConfig(4, 32), embed=QuantConfig(4, 32), progress=False)
    return save_quantized(model, tiny_tokenizer(), tmp_path / "q", {"method": "rtn", "format": "hlq"})


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).pow(2).mean().sqrt() / ref.double().pow(2).mean().sqrt()).item()


def test_auto_model_runs_the_lut_kernels(tiny_llama, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from elutq.hf import use_kernels
    from elutq.utils import ElutqError

    out = _checkpoint(tiny_llama, tmp_path)
    ref, _, _ = load_quantized(out)  # elutq's torch reference: dequantized weights
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]])
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # default: the int8-table kernels
    q = hf.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        want = ref(ids).logits
        got = hf(ids).logits
        assert q.kernels == "lut" and q._lut is not None and q._cache is None  # no dequantized copy made
        assert 0 < _rel_err(got, want) < 2e-2
        use_kernels(hf, "float")  # exact tables: float rounding only
        assert _rel_err(hf(ids).logits, want) < 1e-5
    monkeypatch.setenv("ELUTQ_HF_KERNELS", "bogus")
    try:
        AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        raise AssertionError("a bad kernel mode was accepted")
    except ElutqError as e:
        assert "ELUTQ_HF_KERNELS" in str(e)


def test_auto_model_matches_elutq(tiny_llama, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, pipeline

    import elutq  # noqa: F401 (registers the "hlq" quantizer with transformers)

    out = _checkpoint(tiny_llama, tmp_path)
    monkeypatch.setenv("ELUTQ_HF_KERNELS", "off")  # the dequantizing modules: equal to elutq's own bit for bit
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # as load_quantized
    ref, tok, _ = load_quantized(out)
    assert type(hf.lm_head).__name__ == "HLQLinear"
    assert hf.model.embed_tokens.qweight is hf.lm_head.qweight  # the shared tensor, one copy
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ref(ids).logits, rtol=0, atol=0)
        a = hf.generate(ids, max_new_tokens=8, do_sample=False)
        b = ref.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)
    text = pipeline("text-generation", model=hf, tokenizer=tok)("The lazy", max_new_tokens=4, do_sample=False)
    assert text[0]["generated_text"].startswith("The lazy")


def test_registered_when_transformers_is_imported_after_elutq(tiny_llama, tmp_path):
    out = _checkpoint(tiny_llama, tmp_path)
    code = ("import elutq, sys; assert 'transformers' not in sys.modules; "
            "from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); print(type(m.lm_head).__name__)")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("HLQLinear"), r.stderr[-2000:]


def test_importing_elutq_hf_first_registers_it(tiny_llama, tmp_path):
    """`from elutq.hf import ...` before transformers is loaded (the import hook then fires while elutq.hf is
    half-initialized) works and registers the quantizer."""
    out = _checkpoint(tiny_llama, tmp_path)
    code = ("import sys; from elutq.hf import use_kernels; assert 'transformers' in sys.modules; "
            "from transformers import AutoModelForCausalLM; "
            f"m = use_kernels(AutoModelForCausalLM.from_pretrained({str(out)!r}), 'off'); "
            "print(m.lm_head.kernels)")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("off"), r.stderr[-2000:]


def test_save_pretrained_writes_a_checkpoint_elutq_reads(tiny_llama, tmp_path):
    """from_pretrained → save_pretrained gives back the same tensors (the shared head/embedding once), which
    elutq's own loaders and the native runtime read, with the same logits; `elutq info --verify` says no
    checksums were recorded rather than calling the new files corrupt."""
    from transformers import AutoModelForCausalLM

    import elutq
    from elutq.checkpoint import read_tensors
    from test_pipeline import run_cli

    out = _checkpoint(tiny_llama, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    _, tok, _ = load_quantized(out)
    hf.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
    a, b = read_tensors(out), read_tensors(tmp_path / "saved")
    assert a.keys() == b.keys() and not any(k.startswith("model.embed_tokens.") for k in b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    want = elutq.load(str(out), threads=1).logits(ids)
    torch.testing.assert_close(elutq.load(str(tmp_path / "saved"), threads=1).logits(ids), want, atol=0, rtol=0)
    r = run_cli(["info", str(tmp_path / "saved"), "--verify"])
    assert r.returncode == 0 and "records no checksums" in r.stdout, r.stdout + r.stderr
