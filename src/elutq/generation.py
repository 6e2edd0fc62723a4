"""Sampling and generation: from a model's logits to text.

``Sampler`` and ``sample_batch`` pick tokens (greedy, temperature, top-k, top-p, repetition penalty;
a whole batch in one native call); ``Generation`` is one request's reply (prompt bookkeeping,
detokenization, stop strings, timing), driven by ``runtime.Model.generate`` for one request or by the
server for many; ``generation_defaults`` reads the sampling defaults a model ships in
``generation_config.json``.  Nothing here loads weights or runs layers (``runtime.py`` does).
"""

from __future__ import annotations

import json
import math
import numbers
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import _native
from .checkpoint import GENERATION_FILE
from .utils import ElutqError

if TYPE_CHECKING:  # the runtime drives generations; this module never imports it at run time
    from .runtime import Model, Session

# ----------------------------------------------------------------------------- results


@dataclass
class Timing:
    """Speed of one ``generate`` call."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused from the previous call
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0  # after the first generated token
    time_to_first_token: float = 0.0
    decode_steps: int = 0  # forwards after the first token (speculative decoding: fewer than tokens)
    drafted_tokens: int = 0  # speculative decoding: draft tokens checked, and accepted
    accepted_tokens: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.generated_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    def summary(self) -> str:
        spec = ""
        if self.drafted_tokens:
            spec = (f"; speculative: {(self.generated_tokens - 1) / max(self.decode_steps, 1):.2f} tokens per step, "
                    f"{self.accepted_tokens}/{self.drafted_tokens} drafted accepted")
        return (
            f"prompt {self.prompt_tokens} tokens ({self.cached_tokens} cached), prefill "
            f"{self.prefill_tokens_per_s:.1f} tok/s; generated {self.generated_tokens} tokens, decode "
            f"{self.decode_tokens_per_s:.1f} tok/s; time to first token {self.time_to_first_token * 1000:.0f} ms{spec}"
        )


def prompt_match(context: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> tuple[int, list[int]]:
    """Prompt lookup: the last ``n`` tokens of ``context`` (``n`` from ``max_ngram`` down to ``min_ngram``) are
    searched for earlier in it, and up to ``k`` tokens that followed their latest earlier occurrence are the
    draft — free, and strong wherever a reply repeats its input (code editing, summaries, chat with context).
    Returns ``(n, draft)``, ``(0, [])`` where nothing repeats: a longer match predicts better."""
    ctx = np.asarray(context, dtype=np.int64)
    for n in range(min(max_ngram, len(ctx) - 1), min_ngram - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(ctx[:-1], n)  # starts s < len - n
        for s in np.flatnonzero(np.all(windows == ctx[-n:], axis=1))[::-1]:
            follow = ctx[s + n : s + n + k]
            if follow.size:
                return n, follow.tolist()
    return 0, []


def prompt_lookup(context: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to ``k`` draft tokens by prompt lookup (:func:`prompt_match`'s draft)."""
    return prompt_match(context, k, max_ngram, min_ngram)[1]


MAX_DRAFT = 64  # more draft tokens than this per forward never pay (and would make a prefill of each step)
MAX_NGRAM = 3  # prompt lookup's longest match


@dataclass
class DraftPolicy:
    """Which draft to check next (:meth:`offer`): of the prompt-lookup draft on offer, the first ``k`` tokens that
    maximise expected tokens per second, ``(1 + E[taken | n, k]) / cost(1 + k)`` — ``k = 0``, plain decoding,
    wherever no draft pays.

    ``E[taken | n, k] = Σ_{j ≤ k} S_n(j)``, ``S_n(j)`` the chance that a draft from an ``n``-token match is right
    in its first ``j`` tokens (a longer match predicts better; rightness comes in runs, so the chance of token
    ``j`` is estimated given the ones before it: at-risk and failure counts per position, decayed so they
    follow the text, from a prior of one half).  Every offer is scored against the tokens that then followed
    it, checked or not — so the policy learns how well drafts would do without paying to check them, and a
    reply that starts repeating its input is drafted as soon as it does.  ``cost(n)``: the measured time of
    a forward over ``n`` tokens (kept by the model across replies: the machine's, not the text's; the least of
    the first ``FIRST_SAMPLES`` timings, since noise only ever slows a forward, then a decayed average in which
    a timing above ``OUTLIER`` × the estimate counts as that).  An untried ``n`` is interpolated between the
    nearest measured lengths around it, or extrapolated at the slope per token measured up to the longest one
    below it — ``1/4`` of a plain step while nothing but a plain step is measured (or the slope measured is
    not positive), so a draft that looks worth it gets tried; on a compute-bound model, where that try shows
    each checked token costing nearly a whole step, only drafts right nearly every time are checked.  After
    ``PROBE_EVERY`` plain steps with a draft on offer (``EARLY_PROBE_EVERY`` until a 2-token forward has
    ``FIRST_SAMPLES`` timings), one 1-token draft is checked, so one slow early timing does not stop drafting.

    The estimates are checked against the drafts actually checked: a draft is checked because its estimate
    looked good, so among checked drafts the estimates run high (more so on text where drafts are coin flips,
    and there a check costs more than it gains).  ``E`` is scaled by :meth:`calibration`, the checked drafts'
    tokens taken over their estimates (decayed sums, from a prior of ``CAL_PRIOR`` tokens as estimated)."""

    PROBE_EVERY = 128  # one probe per this many plain steps: well under 1% of the time where drafts never pay
    EARLY_PROBE_EVERY = 16  # ... until a 2-token forward is timed FIRST_SAMPLES times (twice per model at most)
    PENDING = 16  # offers kept for scoring (a draft's outcome is known within k_max + 1 tokens)
    FIRST_SAMPLES = 3  # a cost is the least of its first timings ...
    COST_WEIGHT = 0.1  # ... then a decayed average: a new timing's weight
    OUTLIER = 1.5  # ... in which a timing counts as at most this many times the estimate (a hiccup, not a trend)
    CAL_PRIOR = 2.0  # calibration's prior: this many tokens taken of as many estimated
    CAL_DECAY = 0.8  # of calibration's sums, per checked draft
    CAL_CAP = 1.2  # drafts doing better than estimated raise the estimates at most this much

    k_max: int = 8  # at most this many draft tokens per forward (``max_draft``)
    decay: float = 0.95  # of a position's counts, per scored offer that reached it
    cost: dict[int, float] = field(default_factory=dict)
    samples: dict[int, int] = field(default_factory=dict)  # how many timings each cost averages
    plain_steps: int = 0  # plain steps chosen since the last draft
    risk: dict[int, list[float]] = field(default_factory=dict)  # n → per position j: offers reaching token j
    fail: dict[int, list[float]] = field(default_factory=dict)  # n → per position j: offers wrong at token j
    pending: list[tuple[int, int, tuple[int, ...], list[int], int, float]] = field(default_factory=list)
    checked_estimate: float = 0.0  # decayed sums over checked drafts: tokens estimated to be taken ...
    checked_taken: float = 0.0  # ... and taken

    def __post_init__(self) -> None:
        k = self.k_max
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= MAX_DRAFT:
            raise ElutqError(f"max_draft must be an integer from 1 to {MAX_DRAFT} draft tokens per forward, got "
                             f"{k!r}; to check no drafts at all, turn speculative decoding off (speculative=False, "
                             "--no-speculative)")
        self.k_max = int(k)
        for n in range(1, MAX_NGRAM + 1):
            self.risk.setdefault(n, [1.0] * self.k_max)  # the prior: each next token right at one half
            self.fail.setdefault(n, [0.5] * self.k_max)

    def offer(self, context: Sequence[int], room: int) -> list[int]:
        """The draft to check after ``context`` (at most ``room`` tokens; empty: a plain step); earlier offers
        are scored against what followed them first."""
        self._score(context)
        n, draft = prompt_match(context, self.k_max, MAX_NGRAM)
        if not draft:
            return []
        k = self.length(min(room, len(draft)), n)
        entry = (n, len(context), tuple(context[-n:]), draft, k, self.expected_taken(n, k))
        self.pending = [*self.pending[-(self.PENDING - 1) :], entry]
        return draft[:k]

    def expected_taken(self, n: int, k: int) -> float:
        """``E[taken | n, k]``: the expected number of a ``k``-token draft's tokens taken, from an ``n``-token match."""
        s, total = 1.0, 0.0
        for j in range(k):
            s *= 1 - self.fail[n][j] / self.risk[n][j]
            total += s
        return total

    def _score(self, context: Sequence[int]) -> None:
        keep = []
        for n, at, key, draft, k, estimate in self.pending:
            if at > len(context) or tuple(context[at - n : at]) != key:
                continue  # another reply's offer (a server's policy serves many), or a rolled-back context
            seen = context[at : at + len(draft)]
            taken = next((j for j, (a, b) in enumerate(zip(seen, draft, strict=False)) if a != b), len(seen))
            if k and (taken < len(seen) or len(seen) >= k):  # the checked part's outcome is known
                self.checked_estimate = self.checked_estimate * self.CAL_DECAY + estimate
                self.checked_taken = self.checked_taken * self.CAL_DECAY + min(taken, k)
                k = 0
            if taken < len(seen) or len(seen) == len(draft):
                self._observe(n, taken, len(draft))
            else:
                keep.append((n, at, key, draft, k, estimate))  # still unfolding
        self.pending = keep

    def calibration(self) -> float:
        """Checked drafts' tokens taken over their estimates (decayed, from the prior; at most ``CAL_CAP``)."""
        return min(self.CAL_CAP, (self.CAL_PRIOR + self.checked_taken) / (self.CAL_PRIOR + self.checked_estimate))

    def _observe(self, n: int, taken: int, drafted: int) -> None:
        """One offer's outcome: right in its first ``taken`` of ``drafted`` tokens."""
        risk, fail = self.risk[n], self.fail[n]
        for j in range(min(taken + 1, drafted)):  # the positions it reached: right before `taken`, wrong at it
            risk[j] = risk[j] * self.decay + 1.0
            fail[j] = fail[j] * self.decay + (j == taken)

    def _cost(self, n: int) -> float:
        if n in self.cost:
            return self.cost[n]
        one = self.cost.get(1, 1.0)
        lo = max((k for k in self.cost if k < n), default=1)
        c_lo = self.cost.get(lo, one)
        hi = min((k for k in self.cost if k > n), default=None)
        if hi is not None:  # between two measured lengths; never cheaper than the shorter one
            return c_lo + (n - lo) * max(self.cost[hi] - c_lo, 0.0) / (hi - lo)
        slope = (c_lo - one) / (lo - 1) if lo > 1 else 0.0
        return c_lo + (n - lo) * (slope if slope > 0 else one / 4)

    def length(self, available: int, n: int = MAX_NGRAM) -> int:
        """How many of ``available`` draft tokens from an ``n``-token match to check (0: none)."""
        if 1 not in self.cost:  # a plain step first: the unit every other cost is compared with
            return 0
        best, best_k, c = 1.0 / self._cost(1), 0, self.calibration()
        for k in range(1, min(available, self.k_max) + 1):
            rate = (1 + c * self.expected_taken(n, k)) / self._cost(1 + k)
            if rate > best:
                best, best_k = rate, k
        if best_k == 0 and available >= 1:
            self.plain_steps += 1
            early = self.samples.get(2, 0) < self.FIRST_SAMPLES
            if self.plain_steps >= (self.EARLY_PROBE_EVERY if early else self.PROBE_EVERY):
                best_k = 1
        if best_k:
            self.plain_steps = 0
        return best_k

    def timed(self, n: int, seconds: float) -> None:
        count = self.samples.get(n, 0) + 1
        self.samples[n] = count
        old = self.cost.get(n, seconds)
        if count <= self.FIRST_SAMPLES:
            self.cost[n] = min(old, seconds)
        else:
            self.cost[n] = old + self.COST_WEIGHT * (min(seconds, self.OUTLIER * old) - old)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-sequence token or stop string), "length" or "cancelled"
    timing: Timing


class TextStream:
    """Iterator over the text pieces of a streamed generation; ``completion`` is set once it ends."""

    def __init__(self, it: Iterator[str | Completion]):
        self._it = it
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        for item in self._it:
            if isinstance(item, Completion):
                self.completion = item
            else:
                yield item

    def close(self) -> None:
        """Stop generating (the tokens so far stay in the session's KV cache)."""
        close = getattr(self._it, "close", None)
        if close:
            close()


# ----------------------------------------------------------------------------- sampling


@dataclass
class Sampler:
    """Greedy when ``temperature == 0``; otherwise temperature, top-k, top-p, in that order."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ElutqError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ElutqError(f"seed must be an integer >= 0 (or none for a random one), got {self.seed!r}")
        if self.temperature < 0:
            raise ElutqError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ElutqError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ElutqError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ElutqError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int]) -> int:
        return sample_batch(np.asarray(logits, dtype=np.float32)[None], [self], [history])[0]

    def distribution(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """The probabilities (float64 ``[vocab]``) this sampler draws a token from after ``logits`` — the
        repetition penalty, temperature, top-k, top-p as ``sample_batch`` applies them — for speculative
        sampling, which must accept a drafted token with exactly that probability.  Not for greedy ones."""
        x = self.penalized(logits, history).astype(np.float64) / self.temperature
        x[np.isnan(x)] = -np.inf
        v = x.size
        if 0 < self.top_k < v:
            x[x < np.partition(x, v - self.top_k)[v - self.top_k]] = -np.inf
        w = np.exp(x - x.max())
        if self.top_p < 1:  # the largest weights (ties: lower index first) until their mass reaches top_p
            cand = np.flatnonzero(w > 0)
            order = cand[np.argsort(-w[cand], kind="stable")]
            n = int(np.searchsorted(np.cumsum(w[order]), self.top_p * w.sum())) + 1
            kept = np.zeros_like(w)
            kept[order[:n]] = w[order[:n]]
            w = kept
        return w / w.sum()

    def penalized(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """``logits`` with the repetition penalty applied to the tokens in ``history`` (a copy), or as is."""
        if self.repetition_penalty == 1.0 or not len(history):
            return logits
        x = np.array(logits, dtype=np.float32)
        seen = np.unique(np.asarray(history, dtype=np.int64))
        v = x[seen]
        x[seen] = np.where(v > 0, v / self.repetition_penalty, v * self.repetition_penalty)
        return x


def speculative_pick(p: np.ndarray, draft: int, rng: np.random.Generator) -> int:
    """Speculative sampling of one position whose draft is the single token ``draft`` (prompt lookup's drafts
    are certain, ``q = δ(draft)``): keep it with probability ``p[draft]``, else draw from ``p`` without it —
    ``(p − q)⁺`` renormalised — so the token taken is distributed exactly as ``p``."""
    if rng.random() < p[draft]:
        return draft
    rest = p.copy()
    rest[draft] = 0.0
    total = rest.sum()
    return draft if total <= 0 else int(rng.choice(rest.size, p=rest / total))


def sample_batch(logits: np.ndarray, samplers: Sequence[Sampler], histories: Sequence[Sequence[int]]) -> list[int]:
    """One token per row of ``logits`` [R, vocab], row r by ``samplers[r]`` (its own settings and
    random stream) after ``histories[r]``'s repetition penalty, all rows in one native call split
    over the threads (``csrc/runtime.h``: ``sample_rows``): greedy rows take the first largest logit;
    sampled rows draw by inverse CDF in vocabulary order over e^(logit/T − max), restricted to the
    top-k, then to the smallest set of largest weights whose mass reaches top-p.  Each sampled row
    consumes one uniform from its sampler's generator; greedy rows consume none."""
    rows = np.ascontiguousarray(logits, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[0] != len(samplers) or len(histories) != len(samplers):
        raise ElutqError("sample_batch needs one sampler and one history per row of a 2-D logits array")
    if any(s.repetition_penalty != 1.0 and len(h) for s, h in zip(samplers, histories, strict=True)):
        rows = np.stack([s.penalized(rows[r], h) for r, (s, h) in enumerate(zip(samplers, histories, strict=True))])
    n, vocab = rows.shape
    tiny = float(np.finfo(np.float32).tiny)  # a huge temperature or a tiny top_p must not round to 0 in float32
    inv_t = np.array([0.0 if s.temperature == 0 else max(1.0 / s.temperature, tiny) for s in samplers], np.float32)
    top_k = np.array([s.top_k if s.top_k < vocab else 0 for s in samplers], dtype=np.int32)  # >= vocab: all
    top_p = np.array([max(s.top_p, tiny) for s in samplers], dtype=np.float32)
    u = np.array([0.0 if s.temperature == 0 else s.rng.random() for s in samplers], dtype=np.float64)
    out = np.empty(n, dtype=np.int32)
    _native.sample_rows(rows, inv_t, top_k, top_p, u, out)
    return out.tolist()


class IncrementalDecoder:
    """Text of a growing token sequence at O(1) cost per token: only a short window is decoded —
    the tokens since the last complete character plus the ones before them, so that tokenizers whose
    decoding depends on context (SentencePiece's leading space) give the same text as decoding the
    whole sequence.  Bytes of an unfinished UTF-8 character are held back until it completes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = self._read = 0  # window start; end of the tokens whose text was returned

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, tok: int) -> str:
        """Append a token; returns the new text that is complete."""
        self.ids.append(tok)
        prefix = self._decode(self.ids[self._prefix : self._read])
        full = self._decode(self.ids[self._prefix :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """The held-back rest (an unfinished character decodes as U+FFFD)."""
        prefix = self._decode(self.ids[self._prefix : self._read])
        full = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return full[len(prefix) :]


class Generation:
    """One request's reply: prompt bookkeeping, sampling, detokenization, stop strings, timing.

    The driver feeds ``pending`` to the session (the uncached prompt part first, then each sampled
    token) and passes the last row of logits to :meth:`advance`, which returns the new text."""

    def __init__(
        self, model: Model, session: Session, ids: list[int], max_new: int, sampler: Sampler, stops: list[str],
        ignore_eos: bool = False,
    ):
        if max_new < 1:
            raise ElutqError(f"max_new_tokens must be >= 1, got {max_new}")
        if len(ids) >= session.max_ctx:
            raise ElutqError(
                f"the prompt has {len(ids)} tokens; the context holds {session.max_ctx}: shorten the prompt "
                "(or load with a larger max_ctx if the model allows it)"
            )
        self.model, self.session, self.ids, self.max_new = model, session, ids, max_new
        self.sampler, self.stops = sampler, stops
        self.eos_ids = set() if ignore_eos else model.eos_ids  # ignore_eos: always max_new tokens (load tests)
        self.t0 = time.perf_counter()
        keep = min(common_prefix(session.tokens, ids), len(ids) - 1)  # the last prompt token always runs
        del session.tokens[keep:]
        self.pending: list[int] = ids[keep:]
        self.timing = Timing(prompt_tokens=len(ids), cached_tokens=keep)
        self.out: list[int] = []
        self.text, self.sent = "", 0
        self._decoder = IncrementalDecoder(model.tokenizer)
        self.done, self.finish_reason = False, "length"
        self._hold = max((len(x) for x in stops), default=1) - 1
        self._t_first = 0.0

    def history(self) -> Sequence[int]:
        """What the repetition penalty looks at (nothing when there is no penalty)."""
        return self.ids + self.out if self.sampler.repetition_penalty != 1.0 else ()

    def advance(self, logits: np.ndarray | None, token: int | None = None) -> str:
        """Sample the next token from ``logits`` (or take ``token``, already sampled from them with
        this generation's sampler, e.g. by :func:`sample_batch` for a whole batch); returns the text
        that is now safe to show."""
        now = time.perf_counter()
        if not self.out and not self._t_first:
            self.timing.prefill_seconds = now - self.t0
        tok = self.sampler(logits, self.history()) if token is None else int(token)
        if not self._t_first:
            self._t_first = time.perf_counter()
            self.timing.time_to_first_token = self._t_first - self.t0
        if tok in self.eos_ids:
            return self._finish("stop")
        self.out.append(tok)
        new = self._decoder.push(tok)
        # A stop string first seen now overlaps the new text: search only from there.
        start = max(len(self.text) - self._hold, 0)
        self.text += new
        cut = min((i for x in self.stops if (i := self.text.find(x, start)) >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self._finish("stop", flush=False)
        if len(self.out) >= self.max_new or len(self.session.tokens) >= self.session.max_ctx:
            return self._finish("length")
        self.pending = [tok]
        # Hold back anything that may start a stop string (unfinished characters are held by the decoder).
        safe = len(self.text)
        if self.stops:
            safe = max(len(self.text) - self._hold, 0)
        return self._emit(safe)

    def _emit(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : upto], upto
        return piece

    def _finish(self, reason: str, flush: bool = True) -> str:
        if flush:  # the held-back rest of the text; it may complete a stop string
            start = max(len(self.text) - self._hold, 0)
            self.text += self._decoder.flush()
            cut = min((i for x in self.stops if (i := self.text.find(x, start)) >= 0), default=-1)
            if cut >= 0:
                self.text, reason = self.text[:cut], "stop"
        self.done, self.finish_reason, self.pending = True, reason, []
        self.timing.generated_tokens = len(self.out)
        self.timing.decode_seconds = time.perf_counter() - self._t_first if self._t_first else 0.0
        return self._emit(len(self.text))

    def cancel(self) -> None:
        """Stop early (client gone, Ctrl-C); the tokens so far stay in the session."""
        if not self.done:
            self._finish("cancelled")

    def completion(self) -> Completion:
        return Completion(self.text, list(self.out), self.finish_reason, self.timing)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def read_generation_config(path: Path | None) -> dict:
    """A model's ``generation_config.json`` (sampling defaults, extra end-of-sequence ids), or ``{}``."""
    f = Path(path) / GENERATION_FILE if path is not None else None
    if f is None or not f.is_file():
        return {}
    try:
        g = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ElutqError(f"{f} is not valid JSON ({e}); fix or delete it (it only holds sampling defaults)") from e
    if not isinstance(g, dict):
        raise ElutqError(f"{f} is not a JSON object; fix or delete it (it only holds sampling defaults)")
    return g


def generation_defaults(g: dict) -> dict[str, float]:
    """Sampler settings from a generation config, read as transformers reads it: greedy unless
    ``do_sample`` is true; then its temperature, top-p, top-k and repetition penalty, each defaulting to
    transformers' own (1.0, 1.0, 50, 1.0)."""
    try:
        rep = float(g.get("repetition_penalty") or 1.0)
        if not g.get("do_sample"):
            return {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": rep}
        return {
            "temperature": float(g["temperature"] if g.get("temperature") is not None else 1.0),
            "top_p": float(g.get("top_p") or 1.0),
            "top_k": int(g["top_k"] if g.get("top_k") is not None else 50),
            "repetition_penalty": rep,
        }
    except (TypeError, ValueError) as e:
        raise ElutqError(f"{GENERATION_FILE} has a non-numeric sampling setting ({e}); fix or delete it") from e


def eos_ids(config, tokenizer, gen: dict) -> set[int]:
    ids: set[int] = set()
    sources = [getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None), gen.get("eos_token_id")]
    for e in sources:
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, list):
            ids.update(int(x) for x in e)
    return ids
