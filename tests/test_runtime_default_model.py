"""The runtime on the real default model (SmolLM2-135M-Instruct), against torch on the same weights."""

from __future__ import annotations

import pytest
import torch

import elutq
from elutq.checkpoint import load_quantized, save_quantized
from elutq.eval import load_text
from elutq.hlq import QuantConfig
from elutq.models import load_model
from elutq.quantize import quantize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, tokenizer = load_model("default")
    quantize(model, QuantConfig(bits=4, group_size=128, iters=4), lm_head=QuantConfig(4, 128, iters=4), progress=False)
    return save_quantized(model, tokenizer, tmp_path_factory.mktemp("ckpt") / "w4", {"method": "rtn"})


def test_greedy_64_tokens_match_torch_with_float_tables(checkpoint):
    ref_model, tokenizer, _ = load_quantized(checkpoint, fp16_kv=True)
    prompt = "The history of the city of Rome begins"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = ref_model.generate(ids, max_new_tokens=64, do_sample=False, min_new_tokens=64)[0, ids.shape[1] :]
    got = elutq.load(checkpoint, float_tables=True).generate(prompt, max_new_tokens=64)
    assert len(got.token_ids) == 64
    assert got.token_ids == ref.tolist()


def _compare(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """Relative RMS logit error, top-1 agreement, and the reference's largest top-2 margin (logit units) at
    a position where the top-1 tokens differ (0 if none): how clear a decision the kernels' error flipped."""
    rel = ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    miss = got.argmax(-1) != ref.argmax(-1)
    top2 = ref.topk(2, -1).values
    worst = (top2[:, 0] - top2[:, 1])[miss].max().item() if miss.any() else 0.0
    return rel, 1.0 - miss.float().mean().item(), worst


def _teacher_forced(checkpoint, **load_kw) -> tuple[float, float, float]:
    """:func:`_compare` against torch over 512 WikiText-2 test tokens."""
    ref_model, tokenizer, _ = load_quantized(checkpoint, fp16_kv=True)
    text, _ = load_text(dataset="wikitext2", split="test")
    ids = tokenizer(text[:20000], add_special_tokens=False).input_ids[:512]
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0]
    rel, agree, worst = _compare(elutq.load(checkpoint, **load_kw).logits(ids), ref)
    print(f"{load_kw or 'int8 tables'}: relative RMS logit error {rel:.3e}, top-1 agreement {agree:.2%}, "
          f"largest reference margin at a miss {worst:.3f} (logit RMS {ref.pow(2).mean().sqrt():.2f})")
    return rel, agree, worst


def test_int8_tables_logits_and_top1(checkpoint):
    """int8 tables (the fast path) against torch, teacher-forced on 512 WikiText-2 test tokens.

    Measured on this model: relative RMS logit error 1.04e-2 to 1.06e-2, top-1 agreement 98.8 % to 99.0 %
    (4 Dec 2026: 98.83 %), the misses at reference margins ≤ 0.13 logits (the logits' RMS is 8.3), i.e.
    near-ties only (int8 activation tables, each run on its own grid through per-run integer multipliers;
    see docs/KERNELS.md).  The bounds below leave a margin over those figures; a kernel or runtime bug
    moves them by orders of magnitude."""
    rel, agree, worst = _teacher_forced(checkpoint)
    assert rel < 0.016
    assert agree > 0.97
    assert worst < 0.3


PROMPTS = ("The history of the city of Rome begins", "Photosynthesis is the process by which", "def fibonacci(n):",
           "The three laws of motion are", "Once upon a time, in a small village,", "The capital of France is",
           "To make a good cup of coffee, you", "Machine learning models are trained")


@pytest.fixture(scope="module")
def greedy_continuations(checkpoint) -> list[tuple[list[int], int, torch.Tensor]]:
    """torch's greedy continuations (64 tokens) of each prompt: (sequence, prompt length, reference logits
    at the positions that predict the 64 tokens)."""
    ref_model, tokenizer, _ = load_quantized(checkpoint, fp16_kv=True)
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            seq = ref_model.generate(ids, max_new_tokens=64, do_sample=False, min_new_tokens=64)[0]
            out.append((seq.tolist(), ids.shape[1], ref_model(seq[None]).logits[0, ids.shape[1] - 1 : -1]))
    return out


@pytest.mark.parametrize(
    ("load_kw", "max_rel", "min_agree"),
    [({}, 0.025, 0.97), ({"residual_tables": True}, 1e-3, 0.99)],
    ids=["int8", "residual"],
)
def test_top1_on_greedy_continuations(checkpoint, greedy_continuations, load_kw, max_rel, min_agree):
    """The issue's setting: the 8 × 64 positions of torch's greedy continuations, scored by the runtime.
    Measured on this model: int8 tables 98.0 % to 98.2 % top-1 (relative RMS logit error 1.1e-2, misses at
    reference margins ≤ 0.11 logits); with residual tables 100 % (relative error 2.4e-4)."""
    model = elutq.load(checkpoint, **load_kw)
    got = torch.cat([model.logits(seq)[n - 1 : -1] for seq, n, _ in greedy_continuations])
    ref = torch.cat([r for _, _, r in greedy_continuations])
    rel, agree, worst = _compare(got, ref)
    print(f"greedy continuations, {load_kw or 'int8 tables'}: relative RMS logit error {rel:.3e}, "
          f"top-1 agreement {agree:.2%}, largest reference margin at a miss {worst:.3f}")
    assert got.shape == ref.shape == (64 * len(PROMPTS), ref.shape[1])
    assert rel < max_rel
    assert agree >= min_agree
    assert worst < 0.3


def test_residual_tables_logits_and_top1(checkpoint):
    """int8 tables plus residual int8 tables (``residual_tables=True``: two lookup passes), as above.

    Measured on this model (4 Dec 2026): relative RMS logit error 2.8e-4 and top-1 agreement 100% (3.0e-4
    over 1024 tokens, ``benchmarks/bench_table_error.py --tokens 1024 --residual-tables``): the floor of
    the fp16 KV cache, which the reference rounds to as the runtime does (docs/KERNELS.md)."""
    rel, agree, _ = _teacher_forced(checkpoint, residual_tables=True)
    assert rel < 1e-3
    assert agree >= 0.99


def test_native_and_torch_perplexity_agree(checkpoint):
    """`elutq eval`'s default backend (the LUT runtime, int8 tables) against the dequantized torch model:
    perplexity within 0.5 % on the same 2 × 512 WikiText-2 test tokens (measured: ~0.02 %)."""
    from elutq.eval import perplexity, tokenize

    text, _ = load_text(dataset="wikitext2", split="test")
    torch_model, tokenizer, _ = load_quantized(checkpoint)
    ids = tokenize(tokenizer, text[:20000])
    ref = perplexity(torch_model, ids, seqlen=512, max_tokens=1024, progress=False)
    got = perplexity(elutq.load(checkpoint, max_ctx=512), ids, seqlen=512, max_tokens=1024, progress=False)
    assert (got.tokens_scored, got.windows) == (ref.tokens_scored, ref.windows) == (1022, 2)
    assert abs(got.ppl / ref.ppl - 1) < 5e-3, (got.ppl, ref.ppl)
