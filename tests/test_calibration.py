"""Calibration data: one text as ever, mixes of parts dealt round-robin, chat and self-generated samples."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_tokenizer
from elutq.calibration import CalibConfig, calibration_ids
from elutq.cli import main
from elutq.eval import load_text, tokenize
from elutq.utils import ElutqError

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<eos>{% endfor %}"


def _is_window(row: torch.Tensor, ids: torch.Tensor) -> bool:
    """Whether ``row`` occurs in ``ids`` as a contiguous run."""
    starts = (ids[: ids.numel() - row.numel() + 1] == row[0]).nonzero().flatten().tolist()
    return any(torch.equal(ids[s : s + row.numel()], row) for s in starts)


def test_one_dataset_draws_seeded_windows_as_before():
    tok = tiny_tokenizer()
    ids, source = calibration_ids(tok, CalibConfig(n_samples=4, seqlen=16, seed=3, dataset="wikitext2"))
    text = tokenize(tok, load_text(dataset="wikitext2", split="valid")[0])
    g = torch.Generator().manual_seed(3)
    starts = torch.randint(0, text.numel() - 17 + 1, (4,), generator=g).tolist()
    assert torch.equal(ids, torch.stack([text[s : s + 16] for s in starts])) and "wikitext2/valid" in source


def test_mix_deals_samples_round_robin():
    tok = tiny_tokenizer()
    ids, source = calibration_ids(tok, CalibConfig(n_samples=5, seqlen=12, dataset="wikitext2+python-code"))
    wiki = tokenize(tok, load_text(dataset="wikitext2", split="valid")[0])
    code = tokenize(tok, load_text(dataset="python-code", split="valid")[0])
    assert ids.shape == (5, 12)
    assert all(_is_window(ids[i], wiki) for i in (0, 2, 4)) and all(_is_window(ids[i], code) for i in (1, 3))
    assert not _is_window(ids[1], wiki)
    assert source.startswith("mix wikitext2+python-code: 3 × wikitext2/valid, 2 × python-code/valid")


@pytest.mark.parametrize(("name", "match"), [("wikitext2+code", "unknown calibration part 'code'"),
                                            ("self+self", "names a part twice")])
def test_bad_mix_names_are_refused(name, match, capsys, tmp_path):
    with pytest.raises(ElutqError, match=match):
        calibration_ids(tiny_tokenizer(), CalibConfig(n_samples=2, seqlen=8, dataset=name))
    with pytest.raises(SystemExit) as e:  # at parse time, naming the option
        main(["quantize", "default", "-o", str(tmp_path / "q"), "--calib-dataset", name])
    assert e.value.code == 2 and "argument --calib-dataset" in capsys.readouterr().err


def test_chat_part_goes_through_the_template():
    tok = tiny_tokenizer()
    with pytest.raises(ElutqError, match="needs the model's chat template"):
        calibration_ids(tok, CalibConfig(n_samples=2, seqlen=8, dataset="chat"))
    tok.chat_template = TEMPLATE
    ids, source = calibration_ids(tok, CalibConfig(n_samples=3, seqlen=40, dataset="chat"))
    start = tok("<|user|>", add_special_tokens=False)["input_ids"]
    assert ids.shape == (3, 40) and all(ids[i, : len(start)].tolist() == start for i in range(3))
    assert "chat (wikitext2+python-code valid through the chat template)" in source
    again, _ = calibration_ids(tok, CalibConfig(n_samples=3, seqlen=40, dataset="chat"))
    assert torch.equal(ids, again)  # seeded


def test_self_part_samples_the_model_once_and_caches(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("ELUTQ_CACHE", str(tmp_path / "cache"))
    _, path = tiny_llama
    tok = tiny_tokenizer()
    cfg = CalibConfig(n_samples=3, seqlen=10, dataset="self")
    with pytest.raises(ElutqError, match="needs the unquantized model"):
        calibration_ids(tok, cfg)
    ids, source = calibration_ids(tok, cfg, model=path)
    assert ids.shape == (3, 10) and ids.min() >= 0 and ids.max() < 256 and "3 × self" in source
    assert len({tuple(r) for r in ids.tolist()}) == 3  # each sample its own seed
    cached = list((tmp_path / "cache" / "calib-self").glob("*.npy"))
    assert len(cached) == 1
    again, _ = calibration_ids(tok, cfg, model=path)
    assert torch.equal(ids, again)
    other, _ = calibration_ids(tok, CalibConfig(n_samples=3, seqlen=10, dataset="self", seed=1), model=path)
    assert not torch.equal(ids, other)


def test_quantize_records_the_mix(tiny_llama, tmp_path, monkeypatch):
    """GPTQ through the CLI on a mix with self-generated text: the checkpoint says what it was calibrated on."""
    from elutq.checkpoint import read_quantization_config

    monkeypatch.setenv("ELUTQ_CACHE", str(tmp_path / "cache"))
    _, path = tiny_llama
    out = tmp_path / "q"
    args = ["quantize", str(path), "-o", str(out), "--bits", "2", "--group-size", "32", "--lm-head-bits", "0",
            "--calib-dataset", "wikitext2+self", "--calib-samples", "4", "--calib-seqlen", "16"]  # fmt: skip
    assert main(args) == 0
    text = read_quantization_config(out)["calibration_text"]
    assert text.startswith("mix wikitext2+self: 2 × wikitext2/valid, 2 × self"), text


def test_cli_and_library_share_the_default():
    from elutq import calibration, cli

    assert cli.CALIB_DEFAULT == calibration.DEFAULT == CalibConfig().dataset
