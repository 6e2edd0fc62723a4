"""The OpenAI-compatible server: the official `openai` client, concurrency, and bad input over raw HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn
from transformers import AutoTokenizer

import elutq
from conftest import save_tiny_model
from elutq.checkpoint import save_quantized
from elutq.hlq import QuantConfig
from elutq.quantize import quantize
from elutq.server import Engine, create_app

NAME = "tiny"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    model = save_tiny_model(tmp / "src", "llama")
    quantize(model, QuantConfig(3, 32), progress=False)
    tok = AutoTokenizer.from_pretrained(tmp / "src")
    tok.chat_template = CHAT_TEMPLATE
    return save_quantized(model, tok, tmp / "q", {"method": "rtn"})


class Server:
    """uvicorn in a background thread on a free loopback port."""

    def __init__(self, checkpoint, app_kw: dict | None = None, **engine_kw):
        # float tables: batched and single decoding then agree exactly (greedy outputs comparable)
        self.model = elutq.load(checkpoint, max_ctx=64, float_tables=True)
        self.engine = Engine(self.model, **engine_kw)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        app = create_app(self.model, NAME, self.engine, **(app_kw or {}))
        config = uvicorn.Config(app, port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(checkpoint):
    srv = Server(checkpoint, max_batch=8, max_queue=16)
    yield srv
    srv.stop()


def test_ignore_eos_runs_to_max_tokens(server):
    eos = server.model.eos_ids
    server.model.eos_ids = set(range(server.model.arch.vocab))  # every token ends a reply
    try:
        body = {"model": NAME, "prompt": "fox", "max_tokens": 7, "temperature": 0}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
        assert r["usage"]["completion_tokens"] == 0 and r["choices"][0]["finish_reason"] == "stop"
        r = httpx.post(server.url + "/v1/completions", json={**body, "ignore_eos": True}, timeout=60).json()
        assert r["usage"]["completion_tokens"] == 7 and r["choices"][0]["finish_reason"] == "length"
    finally:
        server.model.eos_ids = eos


def test_openai_client_completions_and_chat(server):
    c = server.client
    assert [m.id for m in c.models.list().data] == [NAME]
    r = c.completions.create(model=NAME, prompt="The quick brown", max_tokens=6, temperature=0)
    direct = server.model.generate("The quick brown", max_new_tokens=6, session=elutq.runtime.Session(server.model))
    assert r.choices[0].text == direct.text
    assert r.usage.prompt_tokens == len(server.model.encode("The quick brown"))
    assert r.usage.completion_tokens == len(direct.token_ids) and r.choices[0].finish_reason == "length"
    pieces = c.completions.create(model=NAME, prompt="The quick brown", max_tokens=6, temperature=0, stream=True)
    assert "".join(p.choices[0].text for p in pieces) == direct.text

    msgs = [{"role": "user", "content": "fox?"}]
    chat = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 5
    stream = c.chat.completions.create(
        model=NAME, messages=msgs, max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.total_tokens == chat.usage.total_tokens
    # seeded sampling is reproducible
    a = c.completions.create(model=NAME, prompt="fox", max_tokens=8, temperature=1.0, seed=3, extra_body={"top_k": 20})
    b = c.completions.create(model=NAME, prompt="fox", max_tokens=8, temperature=1.0, seed=3, extra_body={"top_k": 20})
    assert a.choices[0].text == b.choices[0].text


def test_concurrent_requests_are_batched_and_match_single(server):
    prompts = [f"The quick {w}" for w in ("brown", "fox", "dog", "lazy", "over", "jumps", "the", "quick")]
    expect = [
        server.model.generate(p, max_new_tokens=10, session=elutq.runtime.Session(server.model)).text for p in prompts
    ]
    steps0 = server.engine.stats()["steps"]

    def one(p: str) -> str:
        return server.client.completions.create(model=NAME, prompt=p, max_tokens=10, temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(one, prompts))
    assert got == expect
    # 8 requests × (prefill + 9 decode steps) alone would take ≥ 80 steps; batched, far fewer
    assert server.engine.stats()["steps"] - steps0 < 60


def test_shared_prompt_prefix_is_computed_once(server):
    # Requests that open alike (a system prompt) reuse the KV of a finished or running one.
    head = "Be terse, please. "
    prompts = [head + q for q in ("The quick brown", "A lazy dog", "Over the fox")]
    n_head = len(server.model.encode(head))
    expect = [
        server.model.generate(p, max_new_tokens=6, session=elutq.runtime.Session(server.model)).text for p in prompts
    ]
    before = server.engine.stats()["prompt_tokens_computed"]
    got = [server.client.completions.create(model=NAME, prompt=p, max_tokens=6, temperature=0).choices[0].text
           for p in prompts]
    assert got == expect
    computed = server.engine.stats()["prompt_tokens_computed"] - before
    total = sum(len(server.model.encode(p)) for p in prompts)
    assert computed <= total - 2 * (n_head - 2)  # the 2nd and 3rd requests skip (almost) the whole head


def raw(server, path: str, body: bytes | str, status: int) -> dict:
    r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    return err


def test_bad_input_gets_openai_errors_and_server_keeps_serving(server):
    comp, chat = "/v1/completions", "/v1/chat/completions"
    raw(server, comp, b"{not json", 400)
    raw(server, comp, b'{"model": "tiny", "prompt": "\xff\xfe"}', 400)  # invalid UTF-8
    assert raw(server, comp, json.dumps({"model": NAME, "prompt": "x", "max_tokens": "many"}), 400)["param"]
    assert raw(server, comp, json.dumps({"model": "gpt-9", "prompt": "x"}), 404)["code"] == "model_not_found"
    assert raw(server, comp, json.dumps({"model": NAME, "prompt": "x", "max_tokens": -1}), 400)["param"] == "max_tokens"
    raw(server, comp, json.dumps({"model": NAME, "prompt": "x", "max_tokens": 10**9}), 400)
    raw(server, comp, json.dumps({"model": NAME, "prompt": ""}), 400)
    raw(server, comp, json.dumps({"model": NAME, "prompt": "x", "temperature": 7}), 400)
    raw(server, chat, json.dumps({"model": NAME, "messages": []}), 400)
    raw(server, chat, json.dumps({"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}), 400)
    long = "fox " * 200
    err = raw(server, comp, json.dumps({"model": NAME, "prompt": long, "max_tokens": 4}), 400)
    assert err["code"] == "context_length_exceeded"
    ok = httpx.post(server.url + comp, json={"model": NAME, "prompt": long, "max_tokens": 4, "truncate": True})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 63
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert server.client.completions.create(model=NAME, prompt="fox", max_tokens=2).choices[0].text is not None


def _wait_for(cond, what: str, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_queue_limit_429_and_disconnect_frees_the_slot(checkpoint):
    srv = Server(checkpoint, max_batch=1, max_queue=1)
    body = {"model": NAME, "prompt": "The", "max_tokens": 50, "temperature": 1.0}
    post = lambda b: httpx.post(srv.url + "/v1/completions", json=b, timeout=60)  # noqa: E731
    try:
        # Holding the model's lock parks the engine inside its next step, so requests stay put.
        with srv.model._lock:
            with ThreadPoolExecutor(2) as ex:
                running = ex.submit(post, body)
                _wait_for(lambda: srv.engine.stats()["running"] == 1, "the first request to run")
                queued = ex.submit(post, body)
                _wait_for(lambda: srv.engine.stats()["queued"] == 1, "the second request to queue")
                over = post(body)
                assert over.status_code == 429 and over.json()["error"]["type"] == "rate_limit_error"
                srv.model._lock.release()
                try:
                    assert running.result().status_code == 200 and queued.result().status_code == 200
                finally:
                    srv.model._lock.acquire()
            # A streaming client that goes away while its request runs: the slot is freed at once.
            steps = srv.engine.stats()["steps"]
            with httpx.Client(timeout=60) as client, client.stream(
                "POST", srv.url + "/v1/completions", json={**body, "stream": True}
            ) as r:
                assert r.status_code == 200
                # go away only once the request runs (before, a loaded machine could let the
                # disconnect win the race with admission, and the request never ran)
                _wait_for(lambda: srv.engine.stats()["running"] == 1, "the stream to be admitted")
            time.sleep(0.5)  # the server notices the disconnect while the engine is parked
        _wait_for(lambda: srv.engine.stats()["running"] == 0, "the slot to be freed")
        assert srv.engine.stats()["steps"] - steps <= 2  # not the 50 a finished request needs
        assert post({**body, "max_tokens": 3}).status_code == 200
    finally:
        srv.stop()


def test_shutdown_tells_unfinished_requests_why(checkpoint):
    import asyncio

    from elutq.server import APIError, _Job

    model = elutq.load(checkpoint, max_ctx=64)
    engine = Engine(model, max_batch=1, max_queue=4)
    engine.start()
    loop = asyncio.new_event_loop()
    try:
        ids = model.encode("The quick brown fox")
        with model._lock:  # park the engine inside its first step
            running = _Job(ids=ids, params={"max_new_tokens": 40}, loop=loop)
            engine.submit(running)
            _wait_for(lambda: engine.stats()["running"] == 1, "the request to run")
            engine.shutdown(timeout=0.2)
            with pytest.raises(APIError) as refused:
                engine.submit(_Job(ids=ids, params={}, loop=loop))
            assert refused.value.status == 503
        item = loop.run_until_complete(asyncio.wait_for(running.queue.get(), 10))
        assert isinstance(item, APIError) and item.status == 503 and "shut down" in item.message
        _wait_for(lambda: engine.stats()["running"] == 0, "the slot to be freed")
    finally:
        loop.close()
