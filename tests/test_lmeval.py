"""The lm-evaluation-harness backend against lm-eval's own ``hf`` backend on the same checkpoint.

Oracle: with the float-table kernels elutq's runtime computes the dequantized model's logits to float
rounding, and ``hf`` runs exactly that model (transformers loads elutq checkpoints after ``import elutq``),
so every item's log-likelihood, every rolling log-likelihood and every greedy generation must agree.
Tasks are local (a YAML and a JSONL written here): nothing comes from the hub.
"""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

import elutq  # noqa: E402
import elutq.lmeval  # noqa: E402, F401  (registers the "elutq" model with lm-eval)
from conftest import save_tiny_model  # noqa: E402
from elutq.checkpoint import save_quantized  # noqa: E402
from elutq.cli import main as cli  # noqa: E402
from elutq.hlq import QuantConfig  # noqa: E402
from elutq.quantize import quantize  # noqa: E402
from elutq.utils import ElutqError  # noqa: E402

FACTS = [
    ("The capital of France is", "Paris", ["Berlin", "Madrid", "Rome"]),
    ("Two plus two equals", "four", ["seven", "nine", "twelve"]),
    ("The sun rises in the", "east", ["west", "north", "south"]),
    ("A week has seven", "days", ["cats", "rivers", "chairs"]),
    ("The opposite of hot is", "cold", ["blue", "loud", "tall"]),
    ("Bees make", "honey", ["steel", "glass", "paper"]),
]
TASKS = ["t_mc", "t_roll", "t_gen"]


def _write_tasks(d) -> None:
    rng = random.Random(0)
    with open(d / "mc.jsonl", "w") as f:
        for q, a, wrong in FACTS:
            ch = [a, *wrong]
            rng.shuffle(ch)
            f.write(json.dumps({"question": q, "choices": ch, "answer": ch.index(a)}) + "\n")
    with open(d / "text.jsonl", "w") as f:
        for q, a, _ in FACTS:
            f.write(json.dumps({"text": f"{q} {a}. " * 3, "q": q, "a": a}) + "\n")
    common = "test_split: test\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\n"
    (d / "mc.yaml").write_text(
        "task: t_mc\n" + common.format(d / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    higher_is_better: true\n    aggregation: mean\n"
    )
    (d / "roll.yaml").write_text(
        "task: t_roll\n" + common.format(d / "text.jsonl") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n    higher_is_better: false\n    aggregation: weighted_perplexity\n"
    )
    (d / "gen.yaml").write_text(
        "task: t_gen\n" + common.format(d / "text.jsonl") + "output_type: generate_until\n"
        'doc_to_text: "{{q}}"\ndoc_to_target: " {{a}}"\n'
        'generation_kwargs:\n  until: ["."]\n  max_gen_toks: 6\n'
        "metric_list:\n  - metric: exact_match\n    higher_is_better: true\n    aggregation: mean\n"
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    d = tmp_path_factory.mktemp("lmeval")
    _write_tasks(d)
    model = save_tiny_model(d / "src", "llama")
    from transformers import AutoTokenizer

    quantize(model, QuantConfig(3, 32), progress=False)
    ckpt = save_quantized(model, AutoTokenizer.from_pretrained(d / "src"), d / "q", {"method": "rtn"})
    return d, ckpt


def _run(model, model_args, d):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=TASKS, task_manager=TaskManager(include_path=str(d)),
        log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )


def _per_item(res, task):
    return [s["filtered_resps"] for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]


def test_items_equal_the_hf_backend_on_the_dequantized_model(setup, monkeypatch):
    d, ckpt = setup
    monkeypatch.setenv("ELUTQ_HF_KERNELS", "off")  # transformers multiplies by the dequantized weights
    ours = _run("elutq", f"pretrained={ckpt},float_tables=True", d)
    ref = _run("hf", f"pretrained={ckpt},dtype=float32,device=cpu,batch_size=1", d)
    for task in ("t_mc", "t_roll"):
        a, b = _per_item(ours, task), _per_item(ref, task)
        assert len(a) == len(b) == len(FACTS)
        for x, y in zip(a, b, strict=True):
            lx = torch.tensor([r[0] if isinstance(r, tuple | list) else r for r in x], dtype=torch.float64)
            ly = torch.tensor([r[0] if isinstance(r, tuple | list) else r for r in y], dtype=torch.float64)
            torch.testing.assert_close(lx, ly, rtol=1e-4, atol=1e-3)
            if task == "t_mc":  # is_greedy too
                assert [r[1] for r in x] == [r[1] for r in y]
    assert _per_item(ours, "t_gen") == _per_item(ref, "t_gen")
    assert any(g[0] for g in _per_item(ours, "t_gen"))  # generations are not all empty
    for task, metric in (("t_mc", "acc,none"), ("t_gen", "exact_match,none")):
        assert ours["results"][task][metric] == ref["results"][task][metric]
    # a random model's word perplexity is ~1e11: compare its log (the summed log-likelihoods per word)
    ppl = [r["results"]["t_roll"]["word_perplexity,none"] for r in (ours, ref)]
    assert math.log(ppl[0]) == pytest.approx(math.log(ppl[1]), abs=1e-3)


def test_shared_prefixes_score_as_fresh_sessions(setup):
    # Requests sorted to share KV prefixes must score as each one alone from an empty context.
    from elutq.lmeval import ElutqLM

    _, ckpt = setup
    lm = ElutqLM(str(ckpt))
    reqs = [((None, None), lm.tok_encode(q), lm.tok_encode(" " + c)) for q, a, w in FACTS for c in [a, *w]]
    together = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    for r, got in zip(reqs, together, strict=True):
        alone = ElutqLM(elutq.load(ckpt))._loglikelihood_tokens([r], disable_tqdm=True)[0]
        assert got[0] == pytest.approx(alone[0], abs=1e-4) and got[1] == alone[1]


def test_cli_runs_tasks_and_rejects_unknown_ones(setup, capsys):
    d, ckpt = setup
    assert cli(["eval", str(ckpt), "--tasks", "t_mc", "--include-path", str(d), "--limit", "3", "--json"]) == 0
    out = capsys.readouterr().out
    res = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert res["results"]["t_mc"]["sample_len"] == 3 and 0 <= res["results"]["t_mc"]["acc,none"] <= 1
    assert cli(["eval", str(ckpt), "--tasks", "no_such_task"]) == 2
    assert "unknown lm-eval task" in capsys.readouterr().err
    with pytest.raises(ElutqError, match="unknown lm-eval task"):
        from elutq.lmeval import evaluate

        evaluate(str(ckpt), ["no_such_task"])
