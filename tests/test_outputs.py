"""Where `quantize` / `finetune` write (issue 27): --overwrite only ever replaces an elutq checkpoint,
never the working directory, a file or someone's folder; bad outputs are refused before any work;
--resume keeps the finished layers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from elutq import pipeline
from elutq.cli import main


def rtn(src: Path, out: Path | str, *extra: str) -> list[str]:
    return ["quantize", str(src), "-o", str(out), "--method", "rtn", "--bits", "2", "--group-size", "32",
            "--lm-head-bits", "0", *extra]


@pytest.fixture()
def work_refused(monkeypatch):
    """Fails the test if quantization work starts (the refusal must come first)."""
    def no_work(*a, **kw):
        raise AssertionError("quantization started before the output was checked")

    monkeypatch.setattr(pipeline, "SafetensorsDir", no_work)


def test_overwrite_never_deletes_a_directory_that_is_not_a_checkpoint(tiny_llama, tmp_path, capsys, work_refused):
    _, src = tiny_llama
    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert main(rtn(src, mine, "--overwrite")) == 2
    assert "not an elutq checkpoint" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert main(rtn(src, mine)) == 2  # without --overwrite too, before the work


def test_overwrite_never_replaces_the_working_directory(tiny_llama, tmp_path, monkeypatch, capsys, work_refused):
    _, src = tiny_llama
    here = tmp_path / "project"
    (here / "sub").mkdir(parents=True)
    (here / "keep.txt").write_text("x")
    monkeypatch.chdir(here / "sub")
    for out in (".", "..", str(here), str(here / "sub")):
        assert main(rtn(src, out, "--overwrite")) == 2, out
        assert "working directory" in capsys.readouterr().err
    assert (here / "keep.txt").is_file() and (here / "sub").is_dir()


def test_output_file_or_bad_parent_is_refused_before_work(tiny_llama, tmp_path, capsys, work_refused):
    _, src = tiny_llama
    f = tmp_path / "file.bin"
    f.write_bytes(b"data")
    assert main(rtn(src, f, "--overwrite")) == 2
    assert "not a directory" in capsys.readouterr().err and f.read_bytes() == b"data"
    assert main(rtn(src, f / "ckpt")) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(rtn(src, f / "a" / "b")) == 2
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            assert main(rtn(src, ro / "ckpt")) == 2
            assert "permission" in capsys.readouterr().err
        finally:
            ro.chmod(0o755)


def test_overwrite_replaces_an_elutq_checkpoint(tiny_llama, tmp_path):
    _, src = tiny_llama
    out = tmp_path / "q"
    assert main(rtn(src, out)) == 0
    assert main(rtn(src, out)) == 2  # exists, no --overwrite
    assert main(rtn(src, out, "--overwrite")) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(rtn(src, empty)) == 0  # an empty directory is fine


def test_a_folder_named_like_a_partial_run_is_not_deleted(tiny_llama, tmp_path, capsys):
    _, src = tiny_llama
    out = tmp_path / "q"
    lookalike = tmp_path / "q.partial"
    lookalike.mkdir()
    (lookalike / "data.csv").write_text("1,2")
    assert main(rtn(src, out, "--overwrite")) == 2
    assert "not an unfinished elutq run" in capsys.readouterr().err
    assert (lookalike / "data.csv").is_file()


def test_resume_keeps_finished_layers_when_the_output_was_taken_meanwhile(tiny_llama, tmp_path, monkeypatch, capsys):
    _, src = tiny_llama
    out = tmp_path / "q"
    write_head = pipeline._write_head

    def someone_writes_there(*a, **kw):  # while the run works, another program fills the output folder
        out.mkdir(exist_ok=True)
        (out / "other.txt").write_text("not ours")
        return write_head(*a, **kw)

    monkeypatch.setattr(pipeline, "_write_head", someone_writes_there)
    assert main(rtn(src, out)) == 2
    assert "not an elutq checkpoint" in capsys.readouterr().err
    assert (out / "other.txt").is_file()
    monkeypatch.undo()
    (out / "other.txt").unlink()
    assert main(rtn(src, out, "--resume")) == 0
    assert "resumed after layer 1" in capsys.readouterr().out  # both layers kept, none re-quantized


def test_finetune_refuses_a_foreign_output_before_work(tiny_llama, tmp_path, capsys, monkeypatch):
    from elutq import finetune

    _, src = tiny_llama
    q = tmp_path / "q"
    assert main(rtn(src, q)) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("x")
    monkeypatch.setattr(finetune, "SafetensorsDir", lambda *a, **kw: (_ for _ in ()).throw(AssertionError))
    assert main(["finetune", str(q), "--source", str(src), "-o", str(mine), "--overwrite"]) == 2
    assert "not an elutq checkpoint" in capsys.readouterr().err and (mine / "a.txt").is_file()


@pytest.mark.slow  # five CLI processes
def test_a_resumed_run_reports_the_bits_per_weight_of_all_layers(tiny_llama, tmp_path):
    from test_pipeline import run_cli

    _, src = tiny_llama
    args = ["--method", "rtn", "--bits", "2", "--group-size", "32", "--lm-head-bits", "4", "--lm-head-group-size", "32"]

    def bpw(text: str) -> str:
        return next(line for line in text.splitlines() if "bits per weight" in line)

    full = run_cli(["quantize", str(src), "-o", str(tmp_path / "full"), *args])
    crashed = run_cli(["quantize", str(src), "-o", str(tmp_path / "r"), *args],
                      env={"ELUTQ_TEST_CRASH_AFTER_LAYER": "0"})
    assert crashed.returncode == 17
    resumed = run_cli(["quantize", str(src), "-o", str(tmp_path / "r"), *args, "--resume"])
    assert full.returncode == resumed.returncode == 0, resumed.stderr
    assert "resumed after layer 0" in resumed.stdout
    assert bpw(resumed.stdout) == bpw(full.stdout)
    info = [run_cli(["info", str(tmp_path / d)]).stdout for d in ("full", "r")]
    assert bpw(info[0]) == bpw(info[1])
