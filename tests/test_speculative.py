"""Speculative decoding (issue 32): prompt lookup, the draft-length policy, and verification that gives exactly
the tokens plain greedy decoding gives, with the session's KV left as plain decoding leaves it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import elutq
from elutq import generation, runtime
from elutq.generation import DraftPolicy, Sampler, prompt_lookup, prompt_match, sample_batch, speculative_pick
from elutq.utils import ElutqError
from test_runtime import _quantized
from test_server import NAME, Server, checkpoint  # noqa: F401 (checkpoint: a fixture)


def test_prompt_lookup_takes_what_followed_the_latest_match():
    ctx = [7, 1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 6, 1, 2, 3]
    assert prompt_lookup(ctx, 3) == [4, 5, 6]  # the tail (1, 2, 3) last seen at 6, then 4 5 6
    assert prompt_lookup(ctx, 10) == [4, 5, 6, 1, 2, 3]
    assert prompt_lookup([5, 6, 7, 8], 4) == []  # nothing repeats
    assert prompt_lookup([1, 2, 8, 2], 2) == [8, 2]  # down to a 1-gram
    assert prompt_lookup([1, 2, 8, 2], 2, min_ngram=2) == []
    assert prompt_lookup([3], 4) == []


def test_prompt_match_says_how_long_a_match_backs_the_draft():
    ctx = [7, 1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 6, 1, 2, 3]
    assert prompt_match(ctx, 3) == (3, [4, 5, 6])
    assert prompt_match([1, 2, 8, 2], 2) == (1, [8, 2])
    assert prompt_match([5, 6, 7, 8], 4) == (0, [])


def test_draft_policy_drafts_only_where_it_pays():
    p = DraftPolicy()
    assert p.length(8) == 0  # no plain step timed yet: nothing to compare a draft with
    p.cost.update({n: float(n) for n in range(1, 10)})  # compute-bound: n tokens cost n steps
    assert p.length(8) == 0
    p.cost.update({n: 1 + 0.02 * (n - 1) for n in range(1, 10)})  # memory-bound: nearly free
    assert 1 < p.length(8) < 8 and p.length(3) == 3  # at the prior (each token right at 1/2) the gain levels off
    for _ in range(30):
        p._observe(3, 0, 8)  # drafts from 3-token matches are never right
        p._observe(1, 8, 8)  # from 1-token matches always
    assert p.expected_taken(3, 8) < 0.05 and p.length(8, n=3) == 0
    assert p.expected_taken(1, 8) > 7.5 and p.length(8, n=1) == 8
    p.cost.update({n: 0.6 + 0.4 * n for n in range(1, 10)})  # a checked token costs 0.4 of a step
    for _ in range(30):
        p._observe(2, 3, 8)  # right for 3 tokens, then wrong: runs, not a coin per token
    assert p.expected_taken(2, 8) == pytest.approx(3, abs=0.05) and p.length(8, n=2) == 3


def test_draft_policy_learns_from_offers_it_did_not_check():
    """Each offer is scored against what followed it, checked or not: a reply that starts repeating its input
    gets drafted once the unchecked offers show it; an offer from another context is ignored."""
    p = DraftPolicy(cost={n: 0.3 + 0.7 * n for n in range(1, 10)})  # drafts pay only when mostly right
    prompt = list(range(100, 140))
    reply: list[int] = [1, 2]
    assert p.offer(prompt + reply, 50) == []  # nothing repeats yet
    reply += prompt[:3]  # the reply starts copying the prompt
    checked = []
    for t in prompt[3:30]:
        checked.append(len(p.offer(prompt + reply, 50)))
        reply.append(t)
    assert checked[0] == 0 and checked[-1] >= 4  # first plain steps, then long drafts
    assert p.expected_taken(3, 8) > 6
    before = [list(x) for x in p.risk.values()]
    p.offer([5, 6, 7, 5, 6, 7], 50)  # another reply: its context does not hold the pending offers
    assert [list(x) for x in p.risk.values()] == before


def test_draft_policy_caps_drafts_at_max_draft_and_refuses_absurd_caps():
    p = DraftPolicy(k_max=2)
    p.cost.update({n: 1 + 0.02 * (n - 1) for n in range(1, 10)})
    for _ in range(30):
        p._observe(3, 2, 2)
    assert p.length(8) == 2
    for bad in (0, -1, 65, 2.5, True):
        with pytest.raises(ElutqError, match="max_draft must be an integer from 1 to 64"):
            DraftPolicy(k_max=bad)


def test_draft_policy_estimates_untried_lengths_from_measured_ones():
    p = DraftPolicy()
    p.timed(1, 1.0)
    assert p.length(8) >= 1  # only a plain step measured: a draft is assumed cheap, so it gets tried
    p.timed(2, 1.9)  # compute-bound: the checked token cost 0.9 of a step
    assert p._cost(5) == pytest.approx(1.9 + 3 * 0.9)
    assert p.length(8) == 0  # no longer draft is tried at that price (at α = 1/2)
    p.cost[2] = 1.05  # memory-bound: checking is nearly free
    assert p._cost(5) == pytest.approx(1.05 + 3 * 0.05) and p.length(8) > 1
    p.cost[9] = 9.0  # between two measured lengths: interpolated
    assert p._cost(5) == pytest.approx(1.05 + 3 * (9.0 - 1.05) / 7)
    q = DraftPolicy(cost={1: 1.0, 2: 0.98})  # a 2-token forward timed faster than a plain one: noise, not a slope
    assert q._cost(5) == pytest.approx(0.98 + 3 * 0.25)
    q.cost[4] = 0.9  # and never cheaper than a shorter measured length
    assert q._cost(3) == pytest.approx(0.98)


def test_draft_policy_keeps_the_least_first_timings_and_probes_again():
    """Noise only ever slows a forward: one slow first timing must not stop drafting.  Until a 2-token forward
    has FIRST_SAMPLES timings a 1-token draft is probed every EARLY_PROBE_EVERY plain steps, and a cost is the
    least of its first timings; after that, one probe per PROBE_EVERY and a decayed average in which a
    hiccup counts as at most OUTLIER × the estimate."""
    p = DraftPolicy()
    p.timed(1, 1.0)
    p.timed(2, 1.9)  # one slow first sample of a memory-bound model's 2-token forward
    early = DraftPolicy.EARLY_PROBE_EVERY
    steps = [p.length(8) for _ in range(early)]
    assert steps[:-1] == [0] * (early - 1) and steps[-1] == 1
    p.timed(2, 1.02)
    assert p.cost[2] == 1.02  # the least, not the mean
    assert p.length(8) > 1  # drafting again
    p.timed(2, 1.5)
    assert p.cost[2] == 1.02 and p.samples[2] == DraftPolicy.FIRST_SAMPLES
    p.timed(2, 9.0)  # a hiccup: counts as OUTLIER × the estimate
    assert p.cost[2] == pytest.approx(1.02 + DraftPolicy.COST_WEIGHT * (DraftPolicy.OUTLIER - 1) * 1.02)
    p.cost[2] = 1.9  # compute-bound after all: probes only every PROBE_EVERY plain steps now
    steps = [p.length(8) for _ in range(DraftPolicy.PROBE_EVERY)]
    assert steps[:-1] == [0] * (DraftPolicy.PROBE_EVERY - 1) and steps[-1] == 1


def test_draft_policy_calibrates_its_estimates_on_checked_drafts():
    """Drafts are checked where their estimate looks good, so the checked ones' estimates run high; the policy
    scales every estimate by the checked drafts' tokens taken over their estimates (decayed, from a prior)."""
    p = DraftPolicy(cost={n: 0.7 + 0.3 * n for n in range(1, 10)})  # a checked token costs 0.3 of a step
    assert p.calibration() == 1.0
    prompt = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    ctx = prompt + [10, 11, 12]  # the reply repeats the prompt's start: a 3-token match, draft 13 14 ...
    k = len(p.offer(ctx, 50))
    assert k >= 1  # at the prior a draft pays at this price
    estimate = p.expected_taken(3, k)
    p.offer([*ctx, 99], 50)  # what followed: wrong at the first token
    assert p.checked_taken == 0 and p.checked_estimate == pytest.approx(estimate)
    assert p.calibration() == pytest.approx(DraftPolicy.CAL_PRIOR / (DraftPolicy.CAL_PRIOR + estimate))
    q = DraftPolicy(cost=dict(p.cost))
    for _ in range(4):  # checked drafts keep failing where the per-position counts alone would still draft
        q.checked_estimate, q.checked_taken = q.checked_estimate * q.CAL_DECAY + 1.5, q.checked_taken * q.CAL_DECAY
    assert q.length(8, n=3) == 0 and DraftPolicy(cost=dict(p.cost)).length(8, n=3) >= 1
    q.checked_estimate, q.checked_taken = 1.0, 50.0  # better than estimated: raised, at most CAL_CAP
    assert q.calibration() == DraftPolicy.CAL_CAP


def test_generate_checks_at_most_max_draft_tokens(tmp_path, monkeypatch):
    _, out = _quantized(tmp_path, "llama")
    model = elutq.load(out, threads=1)
    model.step_costs.update({1: 1.0, 2: 1.01, 3: 1.02})  # memory-bound: drafts pay
    asked, checked = [], []
    monkeypatch.setattr(generation, "prompt_match", lambda ctx, k, max_ngram: asked.append(k) or (3, [0] * 5))
    verify = runtime.Model._verify
    monkeypatch.setattr(runtime.Model, "_verify", lambda self, g, feed, draft: checked.append(len(draft))
                        or verify(self, g, feed, draft))  # fmt: skip
    model.generate("the cat sat on the mat", max_new_tokens=12, temperature=0, max_draft=2)
    assert asked and set(asked) == {2} and checked and max(checked) == 2


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

        monkeypatch.setattr(DraftPolicy, "offer", lambda self, ctx, room: drafter(ctx, min(3, room)))
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
    monkeypatch.setattr(DraftPolicy, "length", lambda self, available, n=3: min(6, available))
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
    with pytest.raises(ElutqError, match="max_draft"):  # refused before any work
        model.generate(prompt, max_draft=0)


def test_speculative_pick_keeps_the_distribution():
    """Whatever the draft, the token taken is distributed as p (5,000 draws per draft, each frequency within 5
    standard deviations of its probability)."""
    p = np.array([0.5, 0.25, 0.15, 0.1, 0.0])
    n = 5000
    for draft in (0, 2, 4):
        rng = np.random.default_rng(draft)
        counts = np.bincount([speculative_pick(p, draft, rng) for _ in range(n)], minlength=p.size)
        assert np.all(np.abs(counts / n - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12), (draft, counts)


def test_distribution_matches_the_native_sampler():
    """``Sampler.distribution`` (what speculative sampling accepts by) against the native draws of
    ``sample_batch`` with the same settings: 4,000 draws, frequencies within 5 standard deviations."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=40).astype(np.float32) * 2
    for settings in (dict(temperature=0.7), dict(temperature=1.0, top_k=5), dict(temperature=1.3, top_p=0.8),
                     dict(temperature=0.9, top_k=8, top_p=0.9, repetition_penalty=1.3)):  # fmt: skip
        s = Sampler(**settings, seed=1)
        history = [1, 2, 3]
        p = s.distribution(logits, history)
        assert abs(p.sum() - 1) < 1e-9
        n = 4000
        counts = np.bincount(sample_batch(np.tile(logits, (n, 1)), [s] * n, [history] * n), minlength=p.size)
        assert np.all(np.abs(counts / n - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-9), settings


def test_speculative_sampling_runs_and_respects_the_seed(tmp_path, monkeypatch):
    _, out = _quantized(tmp_path, "llama")
    model = elutq.load(out, threads=1)
    monkeypatch.setattr(DraftPolicy, "length", lambda self, available, n=3: min(3, available))
    prompt = "the cat sat on the mat. the cat sat on the mat. the cat sat on the"
    kw = dict(max_new_tokens=30, temperature=0.8, top_k=20, seed=7, speculative=True)
    a = model.generate(prompt, **kw)
    model.session.reset()
    b = model.generate(prompt, **kw)
    assert a.token_ids == b.token_ids and a.timing.drafted_tokens > 0


def test_server_request_alone_checks_drafts_and_replies_the_same(monkeypatch, checkpoint):  # noqa: F811
    """Through the server: a request decoding alone checks drafts (here the plain reply's next tokens, every other
    draft's second one wrong) in fewer engine steps than tokens, and gets the plain greedy reply; with
    ``speculative=False`` every step decodes one token."""
    import httpx

    ckpt = checkpoint
    prompt, n = "The quick brown", 24
    body = {"model": NAME, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    off = Server(ckpt, max_batch=2, max_queue=2, speculative=False)
    try:
        want = httpx.post(off.url + "/v1/completions", json=body, timeout=60).json()
        assert off.engine.stats()["steps"] == n  # one prompt step, then one per token after the first
        ids = off.model.encode(prompt)
    finally:
        off.stop()
    srv = Server(ckpt, max_batch=2, max_queue=2, max_draft=2)
    try:
        reply_ids = srv.model.encode(prompt + want["choices"][0]["text"])[len(ids):]
        calls = itertools.count()
        asked = []

        def drafter(context, k):
            asked.append(k)
            d = list(reply_ids[len(context) - len(ids) :][:k])
            if next(calls) % 2 and len(d) > 1:
                d[1] = (d[1] + 1) % 256
            return d

        monkeypatch.setattr(DraftPolicy, "offer", lambda self, ctx, room: drafter(ctx, min(self.k_max, room)))
        got = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()
        assert got["choices"][0]["text"] == want["choices"][0]["text"]
        assert got["usage"] == want["usage"]
        stats = srv.engine.stats()
        assert stats["sampled_tokens"] == n and stats["steps"] < n - 2, stats
        assert max(asked) == 2  # the engine's max_draft
    finally:
        srv.stop()
