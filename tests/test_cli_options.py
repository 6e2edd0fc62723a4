"""Numeric options are checked at parse time (issue 27): the error names the option and the range."""

from __future__ import annotations

import pytest

from elutq.cli import build_parser, main
from elutq.validate import available_cores, check_threads

Q = ["quantize", "m", "-o", "out"]
F = ["finetune", "ckpt", "--source", "m", "-o", "out"]
E = ["eval", "m", "--dataset", "wikitext2"]
G = ["generate", "m", "-p", "hi"]
B = ["bench", "m"]
S = ["serve", "m"]
TOO_MANY = str(available_cores() + 1)

CASES = [
    (Q, "--lm-head-bits", "5"), (Q, "--bits", "0"), (Q, "--bits", "5"), (Q, "--group-size", "48"),
    (Q, "--mixed-group-sizes", "64,48"), (Q, "--mixed-group-sizes", "64,64"),
    (Q, "--embed-bits", "7"), (Q, "--iters", "-1"), (Q, "--calib-samples", "0"), (Q, "--calib-seqlen", "0"),
    (Q, "--calib-seed", "-1"), (Q, "--damp", "0"), (Q, "--damp", "nan"), (Q, "--ft-calib-seqlen", "0"),
    (Q, "--ft-val-fraction", "1.5"), (Q, "--ft-epochs", "0"), (Q, "--ft-lr", "nan"), (Q, "--ft-seed", "-1"),
    (F, "--seed", "-1"), (F, "--batch-size", "0"), (F, "--lr", "-1"), (F, "--calib-samples", "-3"),
    (F, "--patience", "-1"), (F, "--weight-decay", "inf"),
    (E, "--seqlen", "0"), (E, "--max-tokens", "-5"), (E, "--stride", "0"),
    (G, "--threads", "0"), (G, "--threads", TOO_MANY), (G, "--seed", "-1"), (G, "--temperature", "-1"),
    (G, "--temperature", "nan"), (G, "--top-p", "0"), (G, "--top-p", "1.5"), (G, "--top-k", "-1"),
    (G, "--max-new-tokens", "0"), (G, "--ctx", "1"), (G, "--repetition-penalty", "0"), (G, "--seed", "x"),
    (G, "--max-draft", "0"), (G, "--max-draft", "65"), (S, "--max-draft", "0"),
    (B, "--repeats", "0"), (B, "--prompt-tokens", "0"), (B, "--gen-tokens", "0"),
    (S, "--port", "70000"), (S, "--port", "0"), (S, "--max-batch", "0"), (S, "--max-queue", "-1"),
    (S, "--threads", TOO_MANY), (S, "--ctx", "1"),
]


@pytest.mark.parametrize(("base", "option", "value"), CASES, ids=[f"{c[0][0]}{c[1]}={c[2]}" for c in CASES])
def test_bad_numeric_option_is_refused_at_parse_time_naming_it(base, option, value, capsys):
    with pytest.raises(SystemExit) as e:
        main([*base, option, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err, err
    assert "Traceback" not in err


def test_bench_threads_list_and_force_threads(capsys):
    with pytest.raises(SystemExit):
        main([*B, "--threads", "1", TOO_MANY])
    assert "--force-threads" in capsys.readouterr().err
    p = build_parser()
    for argv in ([*B, "--threads", "1", TOO_MANY, "--force-threads"], [*G, "--threads", TOO_MANY, "--force-threads"],
                 [*S, "--threads", "1"]):
        check_threads(p, p.parse_args(argv))  # accepted


def test_good_values_parse():
    a = build_parser().parse_args([*Q, "--lm-head-bits", "0", "--group-size", "-1", "--damp", "0.05", "--bits", "3"])
    assert (a.lm_head_bits, a.group_size, a.damp, a.bits) == (0, -1, 0.05, 3)
    a = build_parser().parse_args([*S, "--port", "65535", "--max-queue", "0"])
    assert (a.port, a.max_queue) == (65535, 0)


def test_finetune_precision_auto_follows_the_cpu(monkeypatch):
    from elutq import cli
    from elutq import finetune as ft

    for has, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(ft, "cpu_features", lambda has=has: {"avx512bf16": has})
        args = build_parser().parse_args([*F, "--device", "cpu"])
        assert cli._finetune_config(args, "e2e").precision == want
        assert cli._finetune_config(args, "block").precision == "fp32"
        args = build_parser().parse_args([*F, "--device", "cpu", "--precision", "fp32"])
        assert cli._finetune_config(args, "e2e").precision == "fp32"
