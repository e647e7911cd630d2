"""``tracerl serve``: an OpenAI-compatible HTTP server on the continuous-batching engine.

Routes: ``GET /health``, ``GET /metrics`` (Prometheus), ``GET /v1/models``, ``POST
/v1/completions``, ``POST /v1/chat/completions``.  Every sample of every request is a request of
one ``AsyncEngine`` (its own thread), so concurrent requests share the engine's batch, each
decoded exactly as ``LLM.generate`` decodes it alone under the same seed.

Streaming (``stream: true``, server-sent events): a chunk per committed block with that block's
text (``streaming.TextStream``) and a ``tracerl`` field on the choice: ``start`` (index of the
block's first token in the response), ``token_ids``, ``step_map`` (the forward that unmasked each
token) and ``nfe`` (the sample's forwards so far); then the finish chunk, the usage chunk when
``stream_options.include_usage``, and ``data: [DONE]``.  Non-streamed responses carry the whole
trace per choice when the request sets ``return_trace: true``.

Limits: the body size (413), ``max_tokens`` (a cap, and the context), ``n``, a bounded queue of
samples beyond the batch (503 with ``Retry-After``), a per-request timeout (504); a client that
goes away (stream or not) has its samples aborted, which frees their slots and KV pages before the
engine's next step.  SIGTERM: uvicorn stops accepting connections, lets running requests finish
(up to ``shutdown_timeout_s``), then the engine thread stops.  Errors are OpenAI's JSON error
object (``protocol.APIError``), never a traceback; a failing request never disturbs the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tracerl.errors import ConfigError
from tracerl.llm import LLM, CheckedRequest
from tracerl.serve.async_engine import AsyncEngine, Handle
from tracerl.serve.config import ServeConfig
from tracerl.serve.metrics import ServerMetrics
from tracerl.serve.protocol import APIError, Limits, ServeRequest, choice, envelope, logprobs_body, parse, usage
from tracerl.serve.streaming import TextStream

log = logging.getLogger("tracerl.serve")


@dataclass
class Sample:
    """One choice of a request: its prompt's checked request, engine handle and text stream."""

    index: int
    request: CheckedRequest
    handle: Handle
    text: TextStream
    received: int = 0  # response tokens reported so far
    released: bool = False  # counted out of the server's in-flight samples


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _EventStream(StreamingResponse):
    """Closes its generator however the response ends and then runs ``cleanup``, so a request's
    samples are aborted at once when the client goes away (even before the first chunk, when the
    generator never started and its own ``finally`` would not run)."""

    def __init__(self, content, *, cleanup: Callable[[], None], **kw) -> None:
        super().__init__(content, **kw)
        self.cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.cleanup()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Server:
    """The model, its engine, the metrics and the FastAPI ``app`` of one ``tracerl serve``."""

    def __init__(self, config: ServeConfig, model=None, *, on_ready: Callable[[], None] | None = None) -> None:
        config.validate()
        self.config = config
        self.llm = LLM(model if model is not None else config.model,
                       **({} if model is not None else {"dtype": config.dtype, "device": config.device}))
        self.engine = AsyncEngine(self.llm.model, max_running=config.max_running, num_pages=config.num_pages,
                                  kv_cache_bytes=config.kv_cache_bytes)
        context = self.llm.model.max_positions
        self.limits = Limits(served_names=(config.name,), max_tokens_cap=min(config.max_tokens_cap or context, context),
                             max_n=config.max_n, max_samples=config.max_running + config.max_waiting)
        self.metrics = ServerMetrics()
        self.in_flight = 0  # samples submitted and not yet finished (event-loop thread only)
        self.on_ready = on_ready
        self.app = self._build_app()

    # -- the app ---------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.engine.start()
            if self.on_ready is not None:
                self.on_ready()
            try:
                yield
            finally:
                self.engine.stop()

        app = FastAPI(title="tracerl", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, exc: StarletteHTTPException):
            message = f"{request.method} {request.url.path}: {exc.detail}"
            return _error(APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None))

        @app.exception_handler(Exception)
        async def internal_error(request: Request, exc: Exception):
            log.exception("request failed: %s %s", request.method, request.url.path)
            return _error(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

        @app.get("/health")
        async def health():
            if not self.engine.alive():
                return _error(APIError(503, f"the engine is not running: {self.engine.failed or 'stopped'}"))
            return {"status": "ok"}

        @app.get("/metrics")
        async def metrics():
            return PlainTextResponse(self.metrics.render(self.engine), media_type="text/plain; version=0.0.4")

        @app.get("/v1/models")
        async def models(request: Request):
            try:
                self._authorize(request)
            except APIError as e:
                return _error(e)
            return {"object": "list", "data": [self._model_card()]}

        @app.get("/v1/models/{name:path}")
        async def model(name: str, request: Request):
            try:
                self._authorize(request)
                if name != self.config.name:
                    raise APIError(404, f"model: the model `{name}` does not exist", param="model",
                                   code="model_not_found")
            except APIError as e:
                return _error(e)
            return self._model_card()

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._generate(request, "completion")

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await self._generate(request, "chat")

        return app

    def _model_card(self) -> dict:
        return {"id": self.config.name, "object": "model", "created": 0, "owned_by": "tracerl",
                "root": self.config.model, "max_model_len": self.llm.model.max_positions,
                "family": self.llm.model.family, "block_size": self.llm.model.block_size}

    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "Incorrect or missing API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")

    async def _read_json(self, request: Request):
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"body: {declared} bytes, more than this server's limit of {limit}",
                           code="request_too_large")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > limit:
                raise APIError(413, f"body: more than this server's limit of {limit} bytes", code="request_too_large")
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"body: not valid JSON: {e}") from None

    # -- one request -------------------------------------------------------------------------------
    async def _generate(self, request: Request, kind: str) -> Response:
        t0 = time.perf_counter()
        route = request.url.path
        try:
            self._authorize(request)
            req = parse(await self._read_json(request), kind, self.llm, self.config.defaults, self.limits)
            samples = self._submit(req)
        except APIError as e:
            self.metrics.request_done(route, e.status, time.perf_counter() - t0)
            return _error(e)
        if req.stream:
            return _EventStream(self._stream(req, samples, route, t0), media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                cleanup=lambda: self._release(samples))
        return await self._complete(req, samples, request, route, t0)

    def _submit(self, req: ServeRequest) -> list[Sample]:
        if self.in_flight + req.samples > self.limits.max_samples:
            raise APIError(503, f"the server is busy ({self.in_flight} samples in flight, room for "
                                f"{self.limits.max_samples}); retry later", code="overloaded",
                           headers={"Retry-After": "1"})
        events: asyncio.Queue = asyncio.Queue()
        seqs = []
        try:  # every sample is checked before any is submitted
            for i, (r, seeds) in enumerate(zip(req.requests, req.seeds)):
                seqs += [(r, self.engine.make_sequence(r.ids, r.config, seed)) for seed in seeds]
        except ConfigError as e:
            field, _, why = str(e).partition(":")
            field = {"max_tokens": "max_completion_tokens" if req.kind == "chat" else "max_tokens"}.get(field, field)
            raise APIError(400, f"{field}:{why}", param=field) from None
        self.in_flight += len(seqs)
        tok = self.llm.model.tokenizer
        return [Sample(k, r, self.engine.submit(seq, events, k, stream=req.stream),
                       TextStream(tok, skip_special_tokens=r.params.skip_special_tokens, stops=r.config.stop))
                for k, (r, seq) in enumerate(seqs)]

    def _release(self, samples: list[Sample]) -> None:
        """After a request, whatever happened (idempotent): unfinished samples leave the engine."""
        aborted = False
        for s in samples:
            if s.released:
                continue
            s.released = True
            self.in_flight -= 1
            if not s.handle.done:
                s.handle.done = True
                self.engine.abort(s.handle)
                aborted = True
        if aborted:
            self.metrics.request_aborted()

    async def _next_event(self, events: asyncio.Queue, t0: float):
        left = self.config.request_timeout_s - (time.perf_counter() - t0)
        try:
            return await asyncio.wait_for(events.get(), timeout=max(left, 0.001))
        except asyncio.TimeoutError:
            raise APIError(504, f"the request did not finish within {self.config.request_timeout_s:g} s "
                                f"(request_timeout_s)", code="timeout") from None

    async def _complete(self, req: ServeRequest, samples: list[Sample], request: Request, route: str,
                        t0: float) -> Response:
        events = samples[0].handle.events
        gone = asyncio.create_task(self._watch_disconnect(request, events))
        results: dict[int, object] = {}
        status = 200
        try:
            while len(results) < len(samples):
                tag, kind, payload = await self._next_event(events, t0)
                if kind == "disconnect":
                    status = 499  # nginx's "client closed request": nobody reads the answer
                    return Response(status_code=499)
                if kind == "error":
                    raise APIError(500, payload, code="engine_error")
                if kind == "done":
                    samples[tag].handle.done = True
                    results[tag] = payload
        except APIError as e:
            status = e.status
            return _error(e)
        finally:
            gone.cancel()
            self._release(samples)
            generated = sum(len(g.response_ids) for g in results.values())
            self.metrics.request_done(route, status, time.perf_counter() - t0, req.prompt_tokens, generated)
        tok = self.llm.model.tokenizer
        choices = []
        for s in samples:
            gen = results[s.index]
            text, stop_reason = self.llm.completion_text(gen.response_ids, gen.finish_reason, s.request)
            lps = logprobs_body(req.kind, tok, gen.response_ids, gen.logprobs) if req.logprobs else None
            trace = ({"token_ids": gen.response_ids, "step_map": gen.step_map, "nfe": gen.nfe,
                      "block_size": gen.block_size} if req.return_trace else None)
            choices.append(choice(req, s.index, text, gen.finish_reason, logprobs=lps, trace=trace,
                                  stop_reason=stop_reason))
        return JSONResponse(envelope(req, choices, usage_body=usage(req.prompt_tokens, generated)))

    @staticmethod
    async def _watch_disconnect(request: Request, events: asyncio.Queue) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                events.put_nowait((None, "disconnect", None))
                return

    async def _stream(self, req: ServeRequest, samples: list[Sample], route: str, t0: float):
        events = samples[0].handle.events
        tok = self.llm.model.tokenizer
        status, generated, finished = 200, 0, 0
        try:
            if req.kind == "chat":
                for s in samples:
                    yield _sse(envelope(req, [choice(req, s.index, "", None, delta=True, role=True)], chunk=True))
            while finished < len(samples):
                try:
                    tag, kind, payload = await self._next_event(events, t0)
                except APIError as e:
                    status = e.status
                    yield _sse(e.body())
                    return
                if kind == "error":
                    status = 500
                    yield _sse(APIError(500, payload, code="engine_error").body())
                    return
                s = samples[tag]
                if kind == "block":
                    delta = s.text.add(payload.token_ids)
                    lps = (logprobs_body(req.kind, tok, payload.token_ids, payload.logprobs) if req.logprobs
                           else None)
                    trace = {"start": payload.start, "token_ids": payload.token_ids, "step_map": payload.step_map,
                             "nfe": payload.nfe}
                    s.received += len(payload.token_ids)
                    yield _sse(envelope(req, [choice(req, s.index, delta, None, delta=True, logprobs=lps,
                                                     trace=trace)], chunk=True))
                else:  # done
                    s.handle.done = True
                    finished += 1
                    gen = payload
                    text, stop_reason = self.llm.completion_text(gen.response_ids, gen.finish_reason, s.request)
                    rest = gen.response_ids[s.received:]
                    generated += len(gen.response_ids)
                    lps = (logprobs_body(req.kind, tok, rest, gen.logprobs[s.received:]) if req.logprobs else None)
                    trace = {"start": s.received, "token_ids": rest, "step_map": gen.step_map[s.received:],
                             "nfe": gen.nfe}
                    yield _sse(envelope(req, [choice(req, s.index, s.text.finish(text), gen.finish_reason,
                                                     delta=True, logprobs=lps, trace=trace,
                                                     stop_reason=stop_reason)], chunk=True))
            if req.include_usage:
                yield _sse(envelope(req, [], chunk=True, usage_body=usage(req.prompt_tokens, generated)))
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            status = 499  # the client went away mid-stream
            raise
        finally:
            self._release(samples)
            self.metrics.request_done(route, status, time.perf_counter() - t0, req.prompt_tokens, generated)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the server starts (so port 0 is known at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"port: cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def run_server(config: ServeConfig, *, model=None, announce: Callable[[str], None] = print) -> None:
    """Serve until SIGTERM / SIGINT (uvicorn's signal handling), then drain and stop."""
    import uvicorn

    sock = bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    server = None

    def ready() -> None:
        e = server.engine
        pool = f"{e.num_pages} KV pages" if e.paged else "no KV page pool (full attention)"
        announce(f"tracerl serve: {config.name} on http://{host}:{port}/v1 "
                 f"(max_running {config.max_running}, {pool})")

    server = Server(config, model, on_ready=ready)
    uv = uvicorn.Server(uvicorn.Config(server.app, log_level="warning", access_log=False, lifespan="on",
                                       timeout_graceful_shutdown=config.shutdown_timeout_s))
    # uvicorn drains on SIGTERM / SIGINT, then re-raises the signal to the handler it found: make
    # that one a no-op, so a drained server exits normally (code 0) instead of dying by the signal.
    caught: list[int] = []
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, lambda s, _f: caught.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)} \
        if main else {}
    try:
        uv.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    why = f" ({signal.Signals(caught[0]).name})" if caught else ""
    announce(f"tracerl serve: stopped{why}; running requests were finished first")
