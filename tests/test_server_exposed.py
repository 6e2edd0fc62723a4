"""A server fit to expose (issue 33): the API key, /metrics, per-request timeouts, one log line per request."""

from __future__ import annotations

import logging
import re

import httpx
import openai
import pytest

from test_server import NAME, Server, checkpoint  # noqa: F401 (checkpoint: a fixture)

KEY = "sk-test-0123456789"
COMP = "/v1/completions"


@pytest.fixture(scope="module")
def server(checkpoint):  # noqa: F811
    srv = Server(checkpoint, app_kw={"api_key": KEY}, max_batch=4, max_queue=8)
    yield srv
    srv.stop()


def test_api_key_guards_every_route_but_health(server):
    body = {"model": NAME, "prompt": "fox", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(server.url + COMP, json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (headers, r.text)
    for path in ("/v1/models", "/metrics", "/nowhere"):
        assert httpx.get(server.url + path, timeout=10).status_code == 401, path
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    r = httpx.post(server.url + COMP, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    ok = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert ok.completions.create(model=NAME, prompt="fox", max_tokens=2).choices[0].text is not None
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_metrics_in_prometheus_text_format(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    httpx.post(server.url + COMP, json={"model": NAME, "prompt": "fox", "max_tokens": 3}, headers=auth, timeout=30)
    r = httpx.get(server.url + "/metrics", headers=auth, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in r.text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) elutq_\w+ .+", line), line
            continue
        m = re.fullmatch(r"(elutq_\w+)(\{[^}]*\})? (\S+)", line)
        assert m, line
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    assert samples['elutq_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert samples['elutq_requests_total{route="/v1/completions",status="401"}'] >= 0  # (if the test above ran)
    assert samples["elutq_generated_tokens_total"] >= 3 and samples["elutq_steps_total"] >= 3
    assert samples["elutq_queued_requests"] == 0 and samples['elutq_engine_up{model="' + NAME + '"}'] == 1


def test_one_log_line_per_request_without_the_prompt(server, caplog):
    auth = {"Authorization": f"Bearer {KEY}"}
    with caplog.at_level(logging.INFO, logger="elutq.server"):
        httpx.post(server.url + COMP, json={"model": NAME, "prompt": "secret words", "max_tokens": 2}, headers=auth,
                   timeout=30)  # fmt: skip
        httpx.get(server.url + "/v1/models", timeout=10)
    lines = [r.getMessage() for r in caplog.records if r.name == "elutq.server"]
    assert any(re.search(r"POST /v1/completions 200 \d+ms", ln) for ln in lines), lines
    assert any("GET /v1/models 401" in ln for ln in lines), lines
    assert not any("secret" in ln for ln in lines)


def test_request_timeout_stops_the_request_and_frees_its_slot(checkpoint):  # noqa: F811
    import time

    srv = Server(checkpoint, app_kw={"request_timeout": 0.2}, max_batch=2, max_queue=4)
    def slowed(real):  # 20 ms a step: 60 tokens take over a second, well past the limit
        def slow(*a, **kw):
            time.sleep(0.02)
            return real(*a, **kw)

        return slow

    for name in ("forward_batch", "forward"):
        setattr(srv.model, name, slowed(getattr(srv.model, name)))
    srv.model.eos_ids = set()  # every request runs its 60 tokens: a sampled end-of-text would beat the limit
    try:
        body = {"model": NAME, "prompt": "fox", "max_tokens": 60, "temperature": 1.0}
        r = httpx.post(srv.url + COMP, json=body, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
        with httpx.stream("POST", srv.url + COMP, json={**body, "stream": True}, timeout=60) as s:
            text = "".join(s.iter_text())
        assert '"error"' in text and "--request-timeout" in text and text.endswith("data: [DONE]\n\n")
        for _ in range(100):
            if httpx.get(srv.url + "/health", timeout=10).json()["running"] == 0:
                break
        assert httpx.get(srv.url + "/health", timeout=10).json()["running"] == 0
    finally:
        srv.stop()
