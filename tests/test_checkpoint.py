"""Checkpoints: bit-exact round trip, atomic writes, and a clear error for each bad input."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from elutq import checkpoint
from elutq.checkpoint import load_quantized, save_quantized
from elutq.cli import main
from elutq.hlq import QuantConfig
from elutq.models import load_config, load_model
from elutq.modules import HLQEmbedding, HLQLinear
from elutq.quantize import quantize
from elutq.utils import ElutqError

INFO = {"method": "rtn", "format": "hlq", "bits": 2, "group_size": 64}


@pytest.fixture()
def quantized(tiny_llama, tmp_path):
    model, _ = tiny_llama
    quantize(model, QuantConfig(2, 64), progress=False)
    out = save_quantized(model, None, tmp_path / "q", INFO)
    return model, out


def test_round_trip_is_bit_exact(quantized):
    model, out = quantized
    loaded, _, qc = load_quantized(out)
    assert qc["quant_method"] == "hlq" and len(qc["modules"]) == 14
    for name, m in model.named_modules():
        if isinstance(m, HLQLinear):
            other = loaded.get_submodule(name)
            for t in ("qweight", "scales", "zeros"):
                assert torch.equal(getattr(m, t), getattr(other, t)), (name, t)
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        a, b = model(ids).logits, loaded(ids).logits
    # Unquantized tensors are stored in fp16, so logits agree closely but not bit for bit.
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied


def test_a_tensor_neither_stored_nor_computed_is_an_error(quantized, monkeypatch):
    """The model is built on the meta device; a tensor nothing fills (here: the rotary buffers, left on meta)
    is refused by name, never run."""
    _, out = quantized
    monkeypatch.setattr(checkpoint, "rotary_embedding", lambda config, model: model.model.rotary_emb)
    with pytest.raises(ElutqError, match=r"inv_freq.*neither in the checkpoint nor computed"):
        load_quantized(out)


def test_quantized_lm_head_round_trip(tiny_llama, tmp_path):
    model, _ = tiny_llama
    quantize(model, QuantConfig(2, 64), lm_head=QuantConfig(4, 32), progress=False)
    out = save_quantized(model, None, tmp_path / "q", INFO)
    loaded, _, qc = load_quantized(out)
    assert qc["modules"]["lm_head"] == {"bits": 4, "group_size": 32}
    assert torch.equal(loaded.lm_head.qweight, model.lm_head.qweight)


def test_quantized_embedding_round_trip(tiny_llama, tmp_path):
    """Quantized embeddings untie a tied lm_head (kept 16-bit here), look up exactly the dequantized rows,
    and load back bit for bit; the checkpoint no longer holds a 16-bit embedding."""
    model, _ = tiny_llama
    emb_fp = model.model.embed_tokens.weight.detach().float().clone()
    report = quantize(model, QuantConfig(2, 64), progress=False, embed=QuantConfig(4, 64))
    emb = model.model.embed_tokens
    assert isinstance(emb, HLQEmbedding) and not model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight.float(), emb_fp)  # the head keeps the float embedding
    full = emb.quantized().dequantize()
    assert 0 < report.mse["model.embed_tokens"] == pytest.approx((full - emb_fp).pow(2).mean().item())
    ids = torch.tensor([[3, 0, 255, 3], [17, 17, 1, 200]])
    assert torch.equal(emb(ids), full[ids])
    out = save_quantized(model, None, tmp_path / "q", INFO)
    stored = load_file(out / "model.safetensors")
    assert "model.embed_tokens.weight" not in stored and "model.embed_tokens.qweight" in stored
    loaded, _, qc = load_quantized(out)
    assert qc["modules"]["model.embed_tokens"] == {"bits": 4, "group_size": 64}
    for t in ("qweight", "scales", "zeros"):
        assert torch.equal(getattr(loaded.model.embed_tokens, t), getattr(emb, t))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-2, atol=1e-2)


def test_tied_head_and_embedding_quantized_alike_share_one_tensor(tiny_llama, tmp_path):
    """A tied model whose head and embeddings get the same setting keeps one quantized tensor, as its float
    model kept one: in memory, in the file (only lm_head's, ``shared_with`` in the config) and after loading;
    the file is smaller by the copy it no longer holds, and the model computes the same."""
    model, _ = tiny_llama
    assert model.config.tie_word_embeddings
    separate = copy.deepcopy(model)
    quantize(model, QuantConfig(2, 64), lm_head=QuantConfig(4, 32), embed=QuantConfig(4, 32), progress=False)
    quantize(separate, QuantConfig(2, 64), lm_head=QuantConfig(4, 32), embed=QuantConfig(4, 64), progress=False)
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, HLQEmbedding) and emb.qweight is head.qweight and emb.scales is head.scales
    ids = torch.tensor([[3, 0, 255, 3]])
    assert torch.equal(emb(ids)[0], head.quantized().dequantize()[ids[0]])
    out = save_quantized(model, None, tmp_path / "q", INFO)
    stored = load_file(out / "model.safetensors")
    assert not any(k.startswith("model.embed_tokens.") for k in stored) and "lm_head.qweight" in stored
    loaded, _, qc = load_quantized(out)
    assert qc["modules"]["model.embed_tokens"] == {"bits": 4, "group_size": 32, "shared_with": "lm_head"}
    assert loaded.model.embed_tokens.qweight is loaded.lm_head.qweight
    assert torch.equal(loaded.lm_head.scales, head.scales)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-2, atol=1e-2)
    other = save_quantized(separate, None, tmp_path / "sep", INFO)
    emb_copy = sum(t.numel() * t.element_size() for k, t in load_file(other / "model.safetensors").items()
                   if k.startswith("model.embed_tokens."))  # fmt: skip
    saved = (other / "model.safetensors").stat().st_size - (out / "model.safetensors").stat().st_size
    assert emb_copy > 0 and abs(saved - emb_copy) < 1024  # (headers differ a little)


def test_shared_embedding_must_match_its_head(tiny_llama, tmp_path):
    model, _ = tiny_llama
    quantize(model, QuantConfig(2, 64), lm_head=QuantConfig(4, 32), embed=QuantConfig(4, 32), progress=False)
    out = save_quantized(model, None, tmp_path / "q", INFO)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["modules"]["model.embed_tokens"]["bits"] = 3
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ElutqError, match="shared with 'lm_head'.*same bits"):
        load_quantized(out)


def test_tied_head_with_quantized_embedding_is_refused(tiny_llama, tmp_path):
    model, _ = tiny_llama
    quantize(model, QuantConfig(2, 64), progress=False, embed=QuantConfig(4, 64))
    out = save_quantized(model, None, tmp_path / "q", INFO)
    cfg = json.loads((out / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    cfg["quantization_config"].pop("shards")  # (the weights are rewritten below)
    (out / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(out / "model.safetensors")
    del tensors["lm_head.weight"]  # as a tied checkpoint would be saved
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(ElutqError, match="ties lm_head to quantized embeddings.*re-run"):
        load_quantized(out)
    import elutq

    with pytest.raises(ElutqError, match="ties lm_head to quantized embeddings.*re-run"):
        elutq.load(out)


def test_existing_checkpoint_is_not_overwritten(quantized):
    model, out = quantized
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ElutqError, match="already holds a checkpoint.*--overwrite"):
        save_quantized(model, None, out, INFO)
    assert (out / "model.safetensors").read_bytes() == before
    save_quantized(model, None, out, INFO, overwrite=True)  # allowed when asked


def test_failed_save_leaves_nothing_that_looks_complete(tiny_llama, tmp_path, monkeypatch):
    model, _ = tiny_llama
    quantize(model, QuantConfig(2, 64), progress=False)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(OSError):
        save_quantized(model, None, tmp_path / "q", INFO)
    assert list(tmp_path.iterdir()) == [tmp_path / "tiny-llama"]  # no q/, no temp dir


def _rewrite(out: Path, fn) -> None:
    """Edit the tensors as another tool would, dropping the recorded checksums (else those catch it first)."""
    state = load_file(str(out / "model.safetensors"))
    fn(state)
    save_file(state, str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"].pop("shards", None)
    (out / "config.json").write_text(json.dumps(cfg))


NAME = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop(f"{NAME}.scales"), "missing tensor model.layers.0.self_attn.q_proj.scales"),
        (lambda s: s.update({f"{NAME}.zeros": s[f"{NAME}.zeros"][:, :1].contiguous()}), "expected torch.float16"),
        (lambda s: s.update({f"{NAME}.scales": s[f"{NAME}.scales"].float()}), "is torch.float32"),
        (lambda s: s.pop("model.norm.weight"), "missing tensors"),
        (lambda s: s.update({"extra.weight": torch.zeros(2)}), "unexpected tensors"),
    ],
)
def test_corrupt_checkpoint_is_named(quantized, edit, message):
    _, out = quantized
    _rewrite(out, edit)
    with pytest.raises(ElutqError, match=message):
        load_quantized(out)


def test_truncated_weights_file(quantized):
    _, out = quantized
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ElutqError, match="corrupt or truncated"):
        load_quantized(out)


def test_foreign_quant_method(quantized):
    _, out = quantized
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "gptq"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ElutqError, match="quant_method 'gptq', not 'hlq'"):
        load_quantized(out)


def test_plain_model_dir_is_not_a_checkpoint(tiny_llama):
    _, path = tiny_llama
    with pytest.raises(ElutqError, match="not a quantized checkpoint"):
        load_quantized(path)
    with pytest.raises(ElutqError, match="no config.json"):
        load_quantized(path.parent)


def test_unknown_model_path():
    with pytest.raises(ElutqError, match="does not exist"):
        load_config("./no/such/model")


def test_unsupported_architecture(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "bert"
    )
    with pytest.raises(ElutqError, match="not supported.*llama family"):
        load_model(str(tmp_path / "bert"))


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--bits", "5", "--bits: must be 1, 2, 3 or 4"), ("--group-size", "100", "--group-size: must be 32, 64, 128")],
)
def test_cli_rejects_out_of_range_settings(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:  # refused while parsing (exit 2, as every user error)
        main(["quantize", "./no/such/model", "-o", str(tmp_path / "q"), flag, value])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_reports_unknown_model(tmp_path, capsys):
    assert main(["quantize", "./no/such/model", "-o", str(tmp_path / "q")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_refuses_existing_output(quantized, capsys):
    _, out = quantized
    assert main(["quantize", "default", "-o", str(out)]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_cli_quantize_eval_info_on_tiny_model(tiny_llama, tmp_path, capsys):
    """The whole CLI path on a tiny model: quantize → info → eval on a text file."""
    _, path = tiny_llama
    out = tmp_path / "q"
    args = ["--method", "rtn", "--lm-head-bits", "0", "--format", "uniform", "--bits", "3", "--group-size", "32"]
    assert main(["quantize", str(path), "-o", str(out), *args]) == 0
    assert "bits per weight" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "format: uniform" in text and "bits: 3" in text and "quantized linears: 14" in text
    (tmp_path / "t.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    assert main(["eval", str(out), "--text", str(tmp_path / "t.txt"), "--seqlen", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-2])
    assert result["format"] == "uniform" and result["seqlen"] == 64 and result["ppl"] > 1


def test_cli_quantized_embeddings(tiny_llama, tmp_path, capsys):
    """``--embed-bits``: smaller checkpoint, reported by quantize and info, and a clear error for bad bits;
    by default it follows ``--lm-head-bits`` (and its group size)."""
    model, path = tiny_llama
    base = ["--method", "rtn", "--bits", "2", "--group-size", "32", "--lm-head-group-size", "32"]
    assert main(["quantize", str(path), "-o", str(tmp_path / "fp16"), *base, "--embed-bits", "0"]) == 0
    assert "embeddings: 16-bit" in capsys.readouterr().out
    assert main(["quantize", str(path), "-o", str(tmp_path / "follow"), *base]) == 0
    assert "embeddings: w4g32" in capsys.readouterr().out  # --lm-head-bits 4 (its default), group 32
    assert main(["quantize", str(path), "-o", str(tmp_path / "head16"), *base, "--lm-head-bits", "0"]) == 0
    assert "lm_head: 16-bit, embeddings: 16-bit" in capsys.readouterr().out
    embed = ["--embed-bits", "4", "--embed-group-size", "32"]
    assert main(["quantize", str(path), "-o", str(tmp_path / "q"), *base, *embed]) == 0
    out = capsys.readouterr().out
    assert "embeddings: w4g32" in out and "bits per weight (quantized linears and embeddings)" in out
    assert main(["info", str(tmp_path / "q")]) == 0
    text = capsys.readouterr().out
    assert "quantized linears: 15" in text  # 14 + lm_head
    assert "embeddings: w4g32 (one tensor with lm_head" in text  # tied, quantized alike: stored once
    size = {k: sum(f.stat().st_size for f in (tmp_path / k).glob("*.safetensors")) for k in ("fp16", "q")}
    whole = re.search(r"whole checkpoint: weights files x 8 / ([\d.]+)M parameters\): ([\d.]+)", text)
    n_params = sum(p.numel() for p in model.parameters())  # the tied table once, as the source holds it
    assert float(whole.group(1)) == pytest.approx(n_params / 1e6, abs=0.05)
    assert float(whole.group(2)) == pytest.approx(8 * size["q"] / n_params, rel=1e-3)
    # the 16-bit table (256 × 160 × 2 = 80 KiB) is gone, and the head's w4g32 tensor serves as the embedding
    assert size["fp16"] - size["q"] > 0.98 * 256 * 160 * 2
    with pytest.raises(SystemExit) as e:  # refused while parsing, naming the option
        main(["quantize", str(path), "-o", str(tmp_path / "bad"), *base, "--embed-bits", "5"])
    assert e.value.code == 2 and "argument --embed-bits" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "config.json").exists()
