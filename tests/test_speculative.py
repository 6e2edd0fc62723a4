"""Speculative decoding (issue 32): prompt lookup, the draft-length policy, and verification that gives exactly
the tokens plain greedy decoding gives, with the session's KV left as plain decoding leaves it."""

from __future__ import annotations

import itertools

import pytest

import elutq
from elutq import runtime
from elutq.generation import DraftPolicy, prompt_lookup
from test_runtime import _quantized


def test_prompt_lookup_takes_what_followed_the_latest_match():
    ctx = [7, 1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 6, 1, 2, 3]
    assert prompt_lookup(ctx, 3) == [4, 5, 6]  # the tail (1, 2, 3) last seen at 6, then 4 5 6
    assert prompt_lookup(ctx, 10) == [4, 5, 6, 1, 2, 3]
    assert prompt_lookup([5, 6, 7, 8], 4) == []  # nothing repeats
    assert prompt_lookup([1, 2, 8, 2], 2) == [8, 2]  # down to a 1-gram
    assert prompt_lookup([1, 2, 8, 2], 2, min_ngram=2) == []
    assert prompt_lookup([3], 4) == []


def test_draft_policy_drafts_only_where_it_pays():
    p = DraftPolicy()
    assert p.length(8) == 0  # no plain step timed yet: nothing to compare a draft with
    p.cost.update({n: float(n) for n in range(1, 10)})  # compute-bound: n tokens cost n steps
    assert p.length(8) == 0
    p.cost.update({n: 1 + 0.02 * (n - 1) for n in range(1, 10)})  # memory-bound: nearly free
    assert 1 < p.length(8) < 8 and p.length(3) == 3  # at α = 1/2 the expected gain levels off near 2 tokens
    for _ in range(30):
        p.result(4, 0)  # nothing is ever taken
    assert p.alpha < 0.05 and p.length(8) == 0
    for _ in range(30):
        p.result(4, 4)
    assert p.alpha > 0.9 and p.length(8) == 8


@pytest.mark.parametrize("forced", [False, True])
def test_speculative_gives_the_plain_tokens(tmp_path, monkeypatch, forced):
    """A repetitive prompt (drafts to find) through a tiny model: the same tokens, the same session state, and
    a follow-up reply that reuses the session the same way.  ``forced``: every step checks 3 drafted tokens,
    the reference reply's next ones with every other draft's second token wrong, so taken and rejected drafts
    both occur whatever the policy and the lookup would do."""
    _, out = _quantized(tmp_path, "llama")
    model = elutq.load(out, threads=1)
    prompt = "the cat sat on the mat. the cat sat on the mat. the cat sat on the"
    kw = dict(max_new_tokens=40, temperature=0)
    plain = model.generate(prompt, speculative=False, **kw)
    plain_session = list(model.session.tokens)
    plain_next = model.generate(prompt + " mat.", speculative=False, **kw)
    if forced:
        calls = itertools.count()
        n_prompt = len(model.encode(prompt))

        def drafter(context, k):
            d = list(plain.token_ids[len(context) - n_prompt :][:k])
            if next(calls) % 2 and len(d) > 1:
                d[1] = (d[1] + 1) % 256
            return d

        monkeypatch.setattr(DraftPolicy, "length", lambda self, available: min(3, available))
        monkeypatch.setattr(runtime, "prompt_lookup", drafter)
    model.session.reset()
    spec = model.generate(prompt, speculative=True, **kw)
    assert spec.token_ids == plain.token_ids and spec.text == plain.text
    assert model.session.tokens == plain_session
    if not forced:
        assert model.generate(prompt + " mat.", speculative=True, **kw).token_ids == plain_next.token_ids
    t = spec.timing
    if forced:
        assert 0 < t.accepted_tokens < t.drafted_tokens, t  # both outcomes exercised
        assert t.decode_steps < t.generated_tokens - 1
        assert "tokens per step" in t.summary()


def test_speculative_respects_max_tokens_and_context(tmp_path, monkeypatch):
    _, out = _quantized(tmp_path, "llama")
    model = elutq.load(out, threads=1, max_ctx=40)
    monkeypatch.setattr(DraftPolicy, "length", lambda self, available: min(6, available))
    prompt = "the cat sat on the mat. the cat sat"
    for n in (1, 2, 5, 7):
        model.session.reset()
        plain = model.generate(prompt, speculative=False, max_new_tokens=n, temperature=0)
        model.session.reset()
        spec = model.generate(prompt, speculative=True, max_new_tokens=n, temperature=0)
        assert spec.token_ids == plain.token_ids and spec.finish_reason == plain.finish_reason
    model.session.reset()
    plain = model.generate(prompt, speculative=False, max_new_tokens=100, temperature=0)  # runs into max_ctx
    model.session.reset()
    spec = model.generate(prompt, speculative=True, max_new_tokens=100, temperature=0)
    assert spec.token_ids == plain.token_ids and spec.finish_reason == plain.finish_reason == "length"
