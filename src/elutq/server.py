"""An OpenAI-compatible HTTP server with continuous batching: ``elutq serve CHECKPOINT``.

    HTTP handlers (asyncio)                         engine thread
    ─────────────────────────                       ───────────────────────────────────────────────
    validate, tokenize, submit ──► waiting queue ──► admit FIFO into ≤ max_batch slots (own KV cache)
    stream pieces from the        ◄── per-request   each step: one forward over all active requests
    request's asyncio queue            queue         (prompt chunks and single decode tokens mixed),
                                                     then sample, detokenize, stop strings per request

A client that disconnects is cancelled and its slot freed before the next step; beyond
``max_queue`` waiting requests the server answers 429.  Errors use OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.  Any exception while serving one request ends
that request alone (500) and the engine goes on; ``/health`` answers 503 if the engine thread is gone.
Request bodies beyond ``MAX_BODY_BYTES`` get 413; prompts are tokenized off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import hmac
import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .generation import Completion, Generation, common_prefix, sample_batch
from .runtime import Model, Session
from .utils import ElutqError

PREFILL_BUDGET = 256  # prompt tokens per step: bounds how long a new prompt stalls running decodes
MIN_SHARED_PREFIX = 8  # copy another request's KV only for a prefix longer than this (else recompute)
log = logging.getLogger("elutq.server")
MAX_BODY_BYTES = 4 * 2**20  # a request body larger than this gets 413 (a prompt far beyond any context)
CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"  # served at /
OPEN_ROUTES = ("/health", "/")  # no API key needed
MAX_SEED = 2**63 - 1


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# ----------------------------------------------------------------------------- the engine


@dataclass
class _Job:
    ids: list[int]
    params: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    gen: Generation | None = None
    session: Session | None = None

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Engine:
    """Runs every admitted request in one batched step after another, on its own thread."""

    def __init__(
        self, model: Model, max_batch: int = 16, max_queue: int = 64, ctx: int | None = None, speculative: bool = True,
        max_draft: int = 8,
    ):
        if max_batch < 1 or max_queue < 0:
            raise ElutqError("max_batch must be >= 1 and max_queue >= 0")
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        # A request decoding alone checks prompt-lookup drafts (Model.step) where they pay; a batch of
        # several already shares each pass over the weights, and decodes one token per request per step.
        self.policy = model.draft_policy(max_draft) if speculative else None
        self.ctx = min(ctx or model.max_ctx, model.max_ctx)
        self._waiting: deque[_Job] = deque()
        self._active: list[_Job] = []
        self._free: list[Session] = []
        self._cv = threading.Condition()
        self._stopping = False
        self.error: BaseException | None = None  # what stopped the engine thread, if anything did
        self._thread = threading.Thread(target=self._loop, name="elutq-engine", daemon=True)
        self.steps = 0  # counters for /health: steps, tokens sampled, prompt tokens run, seconds in forward
        self.sampled = self.prompt_tokens = 0
        self.forward_seconds = 0.0

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the engine thread runs (it serves requests)."""
        return self._thread.is_alive() and self.error is None

    def submit(self, job: _Job) -> None:
        with self._cv:
            if self._stopping:
                raise APIError(503, "the server is shutting down", "server_error")
            if self._thread.ident is not None and not self.alive:
                raise APIError(503, f"the inference engine stopped ({self.error!r}); restart the server",
                               "server_error")
            if len(self._active) >= self.max_batch and len(self._waiting) >= self.max_queue:
                raise APIError(
                    429, f"server busy: {len(self._active)} requests running and {len(self._waiting)} queued; "
                    "retry later", "rate_limit_error")
            self._waiting.append(job)
            self._cv.notify()

    def cancel(self, job: _Job) -> None:
        with self._cv:
            job.cancelled = True
            self._cv.notify()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop admitting; let running and queued requests finish for up to ``timeout`` seconds,
        then tell the rest why they stop."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cv:
                if not self._active and not self._waiting:
                    break
            time.sleep(0.05)
        with self._cv:
            for job in [*self._active, *self._waiting]:
                job.cancelled = True
                job.put(APIError(503, "the server shut down before this request finished", "server_error"))
            self._waiting.clear()
            self._cv.notify()

    def stats(self) -> dict[str, int]:
        with self._cv:
            return {"running": len(self._active), "queued": len(self._waiting), "steps": self.steps,
                    "sampled_tokens": self.sampled, "prompt_tokens_computed": self.prompt_tokens,
                    "forward_seconds": round(self.forward_seconds, 3)}

    # -- engine thread

    def _loop(self) -> None:
        try:
            while True:
                self._iterate()
        except BaseException as e:  # the engine cannot go on (never for one request's error): tell everyone
            with self._cv:
                self.error = e
                for job in [*self._active, *self._waiting]:
                    job.cancelled = True
                    job.put(APIError(500, f"the inference engine stopped ({e!r}); restart the server",
                                     "server_error"))
                self._active.clear()
                self._waiting.clear()
            raise

    def _iterate(self) -> None:
        """Admit what fits, then one batched step.  An exception fails only the requests it concerns."""
        with self._cv:
            while not (self._waiting or self._active):
                self._cv.wait()
            self._reap()
            while self._waiting and len(self._active) < self.max_batch:
                job = self._waiting.popleft()
                try:
                    self._admit(job)
                except Exception as e:  # noqa: BLE001 (one request's failure must not stop the engine)
                    self._fail([job], e)
            batch = list(self._active)
        if batch:
            try:
                self._step(batch)
            except Exception as e:  # noqa: BLE001
                with self._cv:
                    self._fail(batch, e)

    def _fail(self, jobs: list[_Job], e: Exception) -> None:
        """End ``jobs`` with a 500 (caller holds the lock); their sessions go back to the pool."""
        for job in jobs:
            job.cancelled = True
            job.put(APIError(500, f"the request failed inside the engine: {type(e).__name__}: {e}", "server_error"))
            if job.gen is not None:
                job.gen.cancel()
            self._release(job)

    def _session_for(self, ids: list[int]) -> Session:
        """A free session for ``ids``: the one whose cached tokens share the longest prefix with
        them; if a running request's session shares a longer one (a common system prompt), its KV
        for that prefix is copied in, so a shared prefix is computed once."""
        def shared(s: Session) -> int:
            return common_prefix(s.tokens, ids)

        have, session = max(((shared(s), s) for s in self._free), key=lambda t: t[0], default=(0, None))
        if session is None:
            session = Session(self.model, max_ctx=self.ctx)
        else:
            self._free.remove(session)
        best, donor = max(((shared(j.session), j.session) for j in self._active if j.session is not None),
                          key=lambda t: t[0], default=(0, None))
        if donor is not None and best > have + MIN_SHARED_PREFIX:
            session.share_prefix(donor, best)
        return session

    def _admit(self, job: _Job) -> None:
        if job.cancelled:
            return
        session = self._session_for(job.ids)
        try:
            job.gen = self.model.start(ids=job.ids, session=session, **job.params)
        except ElutqError as e:
            self._free.append(session)
            job.put(APIError(400, str(e)))
            return
        except Exception:
            self._free.append(session)
            raise
        job.session = session
        self._active.append(job)

    def _release(self, job: _Job) -> None:
        if job in self._active:
            self._active.remove(job)
            if job.session is not None:
                self._free.append(job.session)

    def _reap(self) -> None:
        for job in [j for j in self._active if j.cancelled]:
            job.gen.cancel()
            self._release(job)

    def _step(self, batch: list[_Job]) -> None:
        if self.policy is not None and len(batch) == 1 and batch[0].gen.out and len(batch[0].gen.pending) == 1:
            return self._step_alone(batch[0])
        budget = PREFILL_BUDGET
        jobs, feeds = [], []
        for job in batch:
            pending = job.gen.pending
            n = len(pending) if len(pending) == 1 else min(len(pending), budget)
            if n == 0:
                continue  # a prompt waiting for prefill budget
            if len(pending) > 1:
                budget -= n
            jobs.append(job)
            feeds.append(pending[:n])
        t0 = time.perf_counter()
        try:
            logits = self.model.forward_batch([j.session for j in jobs], feeds)
        except Exception as e:  # never take the engine down: fail this step's requests
            with self._cv:
                for job in jobs:
                    job.put(APIError(500, f"inference failed: {e}", "server_error"))
                    self._release(job)
            return
        self.steps += 1
        self.forward_seconds += time.perf_counter() - t0
        self.prompt_tokens += sum(len(f) for j, f in zip(jobs, feeds, strict=True) if not j.gen.out)
        out: list[tuple[_Job, Any]] = []
        ready = []
        for r, (job, feed) in enumerate(zip(jobs, feeds, strict=True)):
            job.gen.pending = job.gen.pending[len(feed) :]
            if not (job.gen.pending or job.cancelled):  # else: more prompt to prefill, or gone (reaped next step)
                ready.append(r)
        # every ready row sampled in one native call (threads over rows), not one Python pass per row
        try:
            rows = logits if len(ready) == len(jobs) else logits[ready]  # (no copy in the usual case)
            toks = sample_batch(rows, [jobs[r].gen.sampler for r in ready],
                                [jobs[r].gen.history() for r in ready])
        except Exception as e:  # as for the forward: fail this step's requests, keep serving
            with self._cv:
                for job in jobs:
                    job.put(APIError(500, f"sampling failed: {e}", "server_error"))
                    self._release(job)
            return
        with self._cv:
            for r, tok in zip(ready, toks, strict=True):
                job = jobs[r]
                if job.cancelled:  # cancelled (or told why it stops) while this step sampled
                    continue
                try:
                    piece = job.gen.advance(None, tok)
                except Exception as e:  # noqa: BLE001 (this request's detokenizing, stop strings: it alone fails)
                    self._fail([job], e)
                    continue
                self.sampled += 1
                if piece:
                    out.append((job, piece))
                if job.gen.done:
                    out.append((job, job.gen.completion()))
                    self._release(job)
        _deliver(out)


    def _step_alone(self, job: _Job) -> None:
        """One decoding request on its own: one ``Model.step`` (drafts checked where they pay)."""
        g, before, t0 = job.gen, len(job.gen.out), time.perf_counter()
        try:
            piece = self.model.step(g, self.policy)
        except Exception as e:  # noqa: BLE001 (as a batched step: this request fails, the engine goes on)
            with self._cv:
                self._fail([job], e)
            return
        self.steps += 1
        self.forward_seconds += time.perf_counter() - t0
        self.sampled += len(g.out) - before
        out: list[tuple[_Job, Any]] = []
        with self._cv:
            if job.cancelled:
                return
            if piece:
                out.append((job, piece))
            if g.done:
                out.append((job, g.completion()))
                self._release(job)
        _deliver(out)


def _deliver(items: list[tuple[_Job, Any]]) -> None:
    """Hand a step's outputs to their requests' queues: one wake-up of each event loop per step,
    not one per token (each costs the event loop a self-pipe write and the GIL)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, Any]]] = {}
    for job, item in items:
        by_loop.setdefault(job.loop, []).append((job, item))
    for loop, batch in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            loop.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list[tuple[_Job, Any]]) -> None:
    for job, item in batch:
        job.queue.put_nowait(item)


# ----------------------------------------------------------------------------- request schemas


class _Base(BaseModel):
    # unknown OpenAI fields (user, logprobs, ...) are ignored; NaN and infinities are refused
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1)
    truncate: bool = False  # extension: drop the oldest prompt tokens that do not fit the context
    ignore_eos: bool = False  # extension (as vLLM's): generate max_tokens tokens past end-of-text (load tests)


class CompletionRequest(_Base):
    prompt: str | list[str]


class _Part(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[_Part] | None = None


class ChatRequest(_Base):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# ----------------------------------------------------------------------------- the app


class _BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 (by its Content-Length, or once
    the bytes received pass the limit), before anything parses it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_big = APIError(413, f"the request body is larger than {self.limit} bytes; send a shorter prompt",
                           code="request_too_large")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_big.response()(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:  # (FastAPI passes an HTTPException raised while it reads the body)
                    raise HTTPException(413, too_big.message)
            return msg

        await self.app(scope, limited, send)


class _Gate:
    """ASGI middleware for every route: the API key (``Authorization: Bearer KEY``, compared in constant time;
    ``/health`` stays open for load balancers, ``/`` — the chat page, which holds no data and asks for the key —
    for browsers), then one log line and the request counters per request.
    Prompts are never logged."""

    def __init__(self, app, api_key: str | None, metrics: _Metrics):
        self.app, self.key, self.metrics = app, (api_key or "").encode(), metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, path, status = time.perf_counter(), scope["path"], [500]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.key and path not in OPEN_ROUTES and not self._authorized(scope):
                status[0] = 401
                err = APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                               "invalid_request_error", code="invalid_api_key")
                return await err.response()(scope, receive, send)
            await self.app(scope, receive, send_status)
        finally:
            ms = 1000 * (time.perf_counter() - t0)
            self.metrics.request(path, status[0], ms / 1000)
            client = scope.get("client") or ("-", 0)
            log.info("%s %s %s %d %.0fms", client[0], scope["method"], path, status[0], ms)

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False


class _Metrics:
    """Request counters and latencies, exposed with the engine's own counters at ``/metrics``."""

    ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/")

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.seconds: dict[str, float] = {}

    def request(self, path: str, status: int, seconds: float) -> None:
        route = path if path in self.ROUTES else "other"
        with self.lock:
            self.requests[route, status] = self.requests.get((route, status), 0) + 1
            self.seconds[route] = self.seconds.get(route, 0.0) + seconds

    def text(self, engine: Engine, model_name: str) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        st = engine.stats()
        out = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP elutq_{name} {help_}\n# TYPE elutq_{name} {kind}")
            out.extend(f"elutq_{name}{labels} {value:g}" for labels, value in samples)

        with self.lock:
            reqs = sorted(self.requests.items())
            secs = sorted(self.seconds.items())
        metric("requests_total", "counter", "HTTP requests answered, by route and status",
               [(f'{{route="{r}",status="{c}"}}', n) for (r, c), n in reqs])
        metric("request_seconds_total", "counter", "Time spent answering requests, by route",
               [(f'{{route="{r}"}}', v) for r, v in secs])
        metric("generated_tokens_total", "counter", "Tokens sampled", [("", st["sampled_tokens"])])
        metric("prompt_tokens_total", "counter", "Prompt tokens computed (shared prefixes once)",
               [("", st["prompt_tokens_computed"])])
        metric("steps_total", "counter", "Engine steps (one batched forward each)", [("", st["steps"])])
        metric("forward_seconds_total", "counter", "Time in the batched forwards", [("", st["forward_seconds"])])
        metric("running_requests", "gauge", "Requests being decoded", [("", st["running"])])
        metric("queued_requests", "gauge", "Requests waiting for a slot", [("", st["queued"])])
        metric("engine_up", "gauge", "1 while the engine thread runs", [(f'{{model="{model_name}"}}', engine.alive)])
        return "\n".join(out) + "\n"


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is already read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(
    model: Model,
    model_name: str,
    engine: Engine,
    max_body_bytes: int = MAX_BODY_BYTES,
    api_key: str | None = None,
    request_timeout: float | None = None,
) -> FastAPI:
    """The app: OpenAI routes, ``/health``, ``/metrics``.  ``api_key``: required on every route but ``/health``;
    ``request_timeout``: seconds a request may take before it is stopped (504, or an error event in a stream)."""
    # Tokenizing a long prompt takes a while: off the event loop, on one thread (a fast tokenizer is
    # not safe to call from several threads at once).
    tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="elutq-tokenize")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown, 5.0)  # uvicorn has already let open requests finish
        tokenize_pool.shutdown(wait=False)

    app = FastAPI(title="elutq", version="1", lifespan=lifespan)
    metrics = _Metrics()
    app.add_middleware(_BodyLimit, limit=max_body_bytes)
    app.add_middleware(_Gate, api_key=api_key, metrics=metrics)  # added last: runs first
    created = int(time.time())

    async def off_loop(fn, *args, **kw):
        return await asyncio.get_running_loop().run_in_executor(tokenize_pool, functools.partial(fn, *args, **kw))

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {}
        param = ".".join(str(p) for p in err.get("loc", ())[1:]) or None
        msg = err.get("msg", "invalid request")
        if err.get("type") == "json_invalid":
            msg = "the request body is not valid JSON (or not UTF-8)"
        return APIError(400, f"{msg}" + (f" (at {param})" if param else ""), param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = "request_too_large" if e.status_code == 413 else None
        return APIError(e.status_code, str(e.detail), "invalid_request_error", code=code).response()

    @app.get("/health")
    async def health():
        if not engine.alive:
            why = repr(engine.error) if engine.error is not None else "the engine thread is not running"
            return JSONResponse({"status": "error", "error": why, "model": model_name, **engine.stats()}, 503)
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.text(engine, model_name), media_type="text/plain; version=0.0.4")

    qc = model.qconfig or {}
    about = {k: qc[k] for k in ("method", "format", "bits", "group_size") if k in qc}
    for key in ("bits", "group_size"):  # a mixed-precision checkpoint: the range over its modules
        seen = sorted({m[key] for m in qc.get("modules", {}).values() if key in m})
        if key not in about and seen:
            about[key] = seen[0] if len(seen) == 1 else f"{seen[0]}-{seen[-1]}"
    if model.path is not None:
        about["size_mib"] = round(sum(f.stat().st_size for f in Path(model.path).glob("*.safetensors")) / 2**20, 1)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "elutq", "elutq": about}
        return {"object": "list", "data": [card]}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {model_name!r}", param="model",
                           code="model_not_found")

    def budget(req: _Base, ids: list[int], default: int) -> tuple[list[int], int]:
        max_tokens = req.max_tokens
        if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
            max_tokens = req.max_completion_tokens
        max_tokens = default if max_tokens is None else max_tokens
        if max_tokens < 1 or max_tokens >= engine.ctx:
            raise APIError(400, f"max_tokens must be between 1 and {engine.ctx - 1} (the context), got {max_tokens}",
                           param="max_tokens")
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        room = engine.ctx - 1
        if len(ids) > room:
            if not req.truncate:
                raise APIError(
                    400, f"the prompt has {len(ids)} tokens; the context holds {engine.ctx} (pass \"truncate\": true "
                    "to drop the oldest tokens)", param="messages" if isinstance(req, ChatRequest) else "prompt",
                    code="context_length_exceeded")
            ids = ids[len(ids) - room :]
        return ids, max_tokens

    def sampling(req: _Base, max_tokens: int) -> dict[str, Any]:
        return dict(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                    repetition_penalty=req.repetition_penalty, stop=req.stop, seed=req.seed, ignore_eos=req.ignore_eos)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise APIError(400, "send one prompt per request (batched prompts are not supported)", param="prompt")
        ids = (await off_loop(model.tokenizer, prompts[0]))["input_ids"]
        ids, max_tokens = budget(req, ids, default=16)
        return await run(req, request, ids, max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        check_model(req.model)
        msgs = [{"role": m.role, "content": _text(m.content)} for m in req.messages]
        try:
            ids = await off_loop(model.encode, messages=msgs)
        except ElutqError as e:
            raise APIError(400, str(e), param="messages") from None
        except Exception as e:  # the template itself rejected the conversation (roles, order, ...)
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
        ids, max_tokens = budget(req, ids, default=engine.ctx - 1)
        return await run(req, request, ids, max_tokens, chat=True)

    async def run(req: _Base, request: Request, ids: list[int], max_tokens: int, chat: bool):
        job = _Job(ids=ids, params=sampling(req, max_tokens), loop=asyncio.get_running_loop())
        engine.submit(job)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        meta = {"id": rid, "created": int(time.time()), "model": model_name}
        deadline = None if request_timeout is None else time.monotonic() + request_timeout
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(job, engine, meta, chat, len(ids), usage, deadline, request_timeout),
                                     media_type="text/event-stream")
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            item = None
            while not isinstance(item, Completion):
                if job.queue.empty():
                    get = asyncio.ensure_future(job.queue.get())
                    left = None if deadline is None else max(deadline - time.monotonic(), 0)
                    await asyncio.wait({get, gone}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                    if not get.done():  # the client went away, or the time is up: free its slot now
                        get.cancel()
                        engine.cancel(job)
                        if not gone.done():
                            return _timed_out(request_timeout).response()
                        return JSONResponse({}, status_code=499)
                    item = get.result()
                else:
                    item = job.queue.get_nowait()
                if isinstance(item, APIError):
                    return item.response()
        except asyncio.CancelledError:
            engine.cancel(job)
            raise
        finally:
            gone.cancel()
        reason = _reason(item.finish_reason)
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": item.text}, "finish_reason": reason}
            if chat else {"index": 0, "text": item.text, "finish_reason": reason, "logprobs": None}
        )
        return {
            **meta,
            "object": "chat.completion" if chat else "text_completion",
            "choices": [choice],
            "usage": _usage(len(ids), len(item.token_ids)),
        }

    return app


def _text(content: str | list[_Part] | None) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(p.text for p in content)


def _reason(r: str) -> str:
    return "length" if r == "length" else "stop"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _timed_out(limit: float | None) -> APIError:
    return APIError(504, f"the request took longer than the server's limit of {limit:g} s (--request-timeout); "
                    "ask for fewer tokens", "server_error", code="timeout")


async def _sse(job: _Job, engine: Engine, meta: dict, chat: bool, n_prompt: int, usage: bool,
               deadline: float | None = None, limit: float | None = None) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(piece: str | None, reason: str | None, role: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if piece is not None:
                delta["content"] = piece
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": piece or "", "finish_reason": reason, "logprobs": None}
        return f"data: {json.dumps({**meta, 'object': obj, 'choices': [choice]})}\n\n"

    # The content chunk is formatted from a fixed head: it is sent for every token of every stream.
    head = json.dumps({**meta, "object": obj})[:-1]
    tail = '}, "finish_reason": null}]}\n\n' if chat else ', "finish_reason": null, "logprobs": null}]}\n\n'
    open_ = f'data: {head}, "choices": [{{"index": 0, ' + ('"delta": {"content": ' if chat else '"text": ')

    def content(piece: str) -> str:
        return open_ + json.dumps(piece) + tail

    try:
        if chat:
            yield chunk("", None, role=True)
        done = False
        while not done:
            try:
                left = None if deadline is None else max(deadline - time.monotonic(), 0)
                items = [await asyncio.wait_for(job.queue.get(), left)]
            except TimeoutError:
                items = [_timed_out(limit)]
            while not job.queue.empty():  # the engine got ahead: send what is there in one write
                items.append(job.queue.get_nowait())
            text = []
            for item in items:
                if isinstance(item, APIError):
                    text.append(f"data: {json.dumps({'error': {'message': item.message, 'type': item.type}})}\n\n")
                    done = True
                    break
                if isinstance(item, Completion):
                    text.append(chunk(None if chat else "", _reason(item.finish_reason)))
                    if usage:
                        text.append(f"data: {json.dumps({**meta, 'object': obj, 'choices': [], 'usage': _usage(n_prompt, len(item.token_ids))})}\n\n")  # noqa: E501
                    done = True
                    break
                text.append(content(item))
            yield "".join(text)
        yield "data: [DONE]\n\n"
    finally:
        engine.cancel(job)  # a no-op once finished; frees the slot at once if the client went away


def serve(
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    ctx: int | None = 2048,
    max_batch: int = 16,
    max_queue: int = 64,
    threads: int | None = None,
    model_name: str | None = None,
    residual_tables: bool = False,
    api_key: str | None = None,
    request_timeout: float | None = None,
    speculative: bool = True,
    max_draft: int = 8,
) -> None:
    import uvicorn

    from .runtime import load

    model = load(checkpoint, max_ctx=ctx, threads=threads, residual_tables=residual_tables)
    name = model_name or Path(str(checkpoint)).name
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, speculative=speculative, max_draft=max_draft)
    # Everything loaded so far (torch, transformers, the model) lives as long as the server: keep it
    # out of the cyclic collector's full passes, which would otherwise walk it between decode steps.
    gc.collect()
    gc.freeze()
    print(f"serving {name} ({model.runtime.path} kernels, context {engine.ctx}, batch {max_batch}) "
          f"on http://{host}:{port}/v1")
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host} without an API key: anyone who can reach it can use it (--api-key)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    uvicorn.run(create_app(model, name, engine, api_key=api_key, request_timeout=request_timeout), host=host,
                port=port, log_level="warning", timeout_graceful_shutdown=30)
