"""The server under bad requests and failures (issue 27): one request's failure ends that request
alone, /health tells the truth, numeric fields are validated, slots are freed, the event loop stays free."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

import elutq
from elutq.server import MAX_SEED
from test_server import NAME, Server, _wait_for, checkpoint, raw  # noqa: F401 (checkpoint: a fixture)


@pytest.fixture(scope="module")
def server(checkpoint):  # noqa: F811
    srv = Server(checkpoint, max_batch=4, max_queue=8)
    yield srv
    srv.stop()


COMP, CHAT = "/v1/completions", "/v1/chat/completions"


def _ok(server) -> None:
    r = httpx.post(server.url + COMP, json={"model": NAME, "prompt": "fox", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200, r.text
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_numeric_request_fields_get_400(server):
    chat = {"model": NAME, "messages": [{"role": "user", "content": "fox"}], "temperature": 0.7}
    for field, value in [("seed", -1), ("seed", MAX_SEED + 1), ("max_tokens", 0), ("max_completion_tokens", 0),
                         ("top_p", 0), ("top_k", -1), ("repetition_penalty", 0), ("repetition_penalty", 1e9)]:
        err = raw(server, CHAT, json.dumps({**chat, field: value}), 400)
        assert err["param"] == field, (field, value, err)
    for value in ("NaN", "Infinity", "-Infinity"):  # Python's json reads these literals
        body = f'{{"model": "{NAME}", "prompt": "x", "max_tokens": 2, "temperature": {value}}}'
        assert raw(server, COMP, body, 400)["param"] == "temperature"
    _ok(server)


def test_an_exception_in_the_engine_fails_that_request_alone(server, monkeypatch):
    # The case: a negative seed used to raise inside the engine thread and stop it for good.
    import asyncio

    from elutq.server import APIError, _Job

    loop = asyncio.new_event_loop()
    try:
        job = _Job(ids=server.model.encode("fox"), params={"seed": -1, "temperature": 1.0}, loop=loop)
        server.engine.submit(job)
        item = loop.run_until_complete(asyncio.wait_for(job.queue.get(), 10))
        assert isinstance(item, APIError) and item.status == 400 and "seed" in item.message
    finally:
        loop.close()
    _ok(server)

    # Any exception: in admission (model.start), and in the step after sampling (Generation.advance).
    start = server.model.start

    def bad_start(*a, **kw):
        raise RuntimeError("boom in start")

    monkeypatch.setattr(server.model, "start", bad_start)
    err = raw(server, COMP, json.dumps({"model": NAME, "prompt": "fox", "max_tokens": 3}), 500)
    assert err["type"] == "server_error" and "boom in start" in err["message"]
    monkeypatch.setattr(server.model, "start", start)
    _ok(server)

    def bad_advance(self, *a, **kw):
        raise ValueError("boom in advance")

    monkeypatch.setattr(elutq.generation.Generation, "advance", bad_advance)
    err = raw(server, COMP, json.dumps({"model": NAME, "prompt": "fox", "max_tokens": 3}), 500)
    assert "boom in advance" in err["message"]
    monkeypatch.undo()
    _ok(server)
    assert server.engine.stats()["running"] == 0

    # One request of a batch fails in advance; the others in the same steps finish normally.
    advance, bad_ids = elutq.generation.Generation.advance, server.model.encode("fox jumps")

    def advance_fails_for_one(self, *a, **kw):
        if self.ids == bad_ids:
            raise ValueError("boom for one")
        return advance(self, *a, **kw)

    monkeypatch.setattr(elutq.generation.Generation, "advance", advance_fails_for_one)

    def post(prompt: str) -> httpx.Response:
        return httpx.post(server.url + COMP, json={"model": NAME, "prompt": prompt, "max_tokens": 8}, timeout=30)

    with ThreadPoolExecutor(3) as ex:
        results = list(ex.map(post, ["The quick brown", "fox jumps", "the lazy dog"]))
    assert [r.status_code for r in results] == [200, 500, 200]
    monkeypatch.undo()


def test_health_tells_the_truth_when_the_engine_thread_is_gone(checkpoint):  # noqa: F811
    srv = Server(checkpoint, max_batch=2, max_queue=2)
    try:
        _ok(srv)

        def die() -> None:
            raise SystemExit("simulated engine death")

        srv.engine._iterate = die  # the engine thread's next round ends the thread
        with srv.engine._cv:
            srv.engine._cv.notify()
        # the thread is parked in the current round's wait; a request wakes it, the next round dies
        httpx.post(srv.url + COMP, json={"model": NAME, "prompt": "fox", "max_tokens": 2}, timeout=30)
        _wait_for(lambda: not srv.engine.alive, "the engine thread to end")
        h = httpx.get(srv.url + "/health", timeout=10)
        assert h.status_code == 503 and h.json()["status"] == "error"
        t0 = time.time()
        r = httpx.post(srv.url + COMP, json={"model": NAME, "prompt": "fox", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        assert time.time() - t0 < 5  # refused at once, never a hang
    finally:
        srv.stop()


def _slow_steps(srv, monkeypatch, seconds: float) -> None:
    """Each engine step takes ``seconds``; end-of-sequence is never sampled (a request runs its max_tokens).
    Both forwards: a batch's (``forward_batch``) and a request's decoding alone (``Model.step`` → ``forward``)."""
    eos = sorted(srv.model.eos_ids)

    def slowed(real):
        def slow(*a, **kw):
            time.sleep(seconds)
            logits = real(*a, **kw)
            logits[:, eos] = -np.inf
            return logits

        return slow

    for name in ("forward_batch", "forward"):
        monkeypatch.setattr(srv.model, name, slowed(getattr(srv.model, name)))


def test_non_streaming_client_that_disconnects_frees_its_slot(checkpoint, monkeypatch):  # noqa: F811
    srv = Server(checkpoint, max_batch=1, max_queue=1)
    try:
        _slow_steps(srv, monkeypatch, 0.1)  # 60 tokens: 6 s if nobody noticed the client leave
        body = {"model": NAME, "prompt": "The", "max_tokens": 60, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + COMP, json=body, timeout=httpx.Timeout(30, read=0.6))
        t0 = time.time()
        _wait_for(lambda: srv.engine.stats()["running"] == 0, "the slot to be freed", timeout=2.0)
        assert time.time() - t0 < 2.0
    finally:
        monkeypatch.undo()
        srv.stop()


def test_oversized_body_gets_413(server):
    big = json.dumps({"model": NAME, "prompt": "fox " * (5 * 2**20 // 4)})
    err = raw(server, COMP, big, 413)
    assert err["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(80):
            yield b"x" * 65536
        yield b'"}'

    r = httpx.post(server.url + COMP, content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    _ok(server)


def test_tokenizing_a_long_prompt_does_not_block_the_event_loop(server, monkeypatch):
    tok = server.model.tokenizer

    class SlowTokenizer:
        def __call__(self, *a, **kw):
            time.sleep(1.5)
            return tok(*a, **kw)

        def __getattr__(self, name):
            return getattr(tok, name)

    monkeypatch.setattr(server.model, "tokenizer", SlowTokenizer())
    post = threading.Thread(target=lambda: httpx.post(
        server.url + COMP, json={"model": NAME, "prompt": "fox", "max_tokens": 2}, timeout=30))
    post.start()
    time.sleep(0.3)  # the request is being tokenized
    t0 = time.time()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert time.time() - t0 < 0.6
    post.join()
