"""The HTTP server: OpenAI's chat-completions API over one pipeline (FastAPI; `mllm-edge serve`).

    POST /v1/chat/completions   OpenAI's request and response, `stream: true` as server-sent events
    GET  /v1/models             the one model: the bundle
    GET  /health                200 with the running and waiting counts once loaded, else 503
    GET  /metrics               with Settings.metrics: Prometheus's text format

Requests are parsed and their images decoded in the event loop's thread pool, never in the worker
(which only generates); a full queue answers 429 with Retry-After, a closing server 503.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import MllmEdgeError
from ..runtime.pipeline import Pipeline, RunResult
from ..runtime.prompt import normalize_messages
from .metrics import Metrics
from .requests import ApiError, Limits, parse_chat_request
from .worker import Job, QueueFull, Worker


@dataclass
class Settings:
    max_queue: int = 16
    max_body_bytes: int = 32 << 20
    limits: Limits = field(default_factory=Limits)
    retry_after_s: int = 1
    api_key: str | None = None  # every endpoint but /health then needs "Authorization: Bearer KEY"
    queue_timeout_s: float | None = None  # a request that waited longer is refused (503)
    metrics: bool = False  # GET /metrics in Prometheus's format (prometheus-client)
    shutdown_timeout_s: float = 30.0  # on SIGTERM, how long accepted requests may take to finish


def create_app(
    pipeline: Pipeline | Callable[[], Pipeline], settings: Settings | None = None, name: str | None = None
) -> FastAPI:
    """pipeline: an open one, or a function that opens it: then the server answers (/health 503)
    while the bundle loads in the background, and closes the pipeline when it stops."""
    settings = settings or Settings()
    loader = None if isinstance(pipeline, Pipeline) else pipeline
    model = name or ("bundle" if loader else Path(pipeline.folder).resolve().name)
    state = {"pipeline": None if loader else pipeline, "worker": None, "closing": False, "error": None}
    metrics = Metrics(state) if settings.metrics else None

    def start(opened: Pipeline) -> None:
        state["pipeline"] = opened
        state["worker"] = Worker(opened, settings.max_queue, settings.queue_timeout_s)

    async def load() -> None:
        try:
            start(await asyncio.to_thread(loader))
        except Exception as e:  # the bundle is bad: say so on /health and to every request
            state["error"] = f"the bundle could not be loaded: {e}"

    async def lifespan(app):
        loading = asyncio.create_task(load()) if loader else None
        if loader is None:
            start(pipeline)
        yield
        state["closing"] = True
        if loading is not None:
            await loading  # a thread cannot be interrupted: let the load end, then close
        if state["worker"] is not None:
            await asyncio.to_thread(state["worker"].stop)
        if loader is not None and state["pipeline"] is not None:
            state["pipeline"].close()

    def ready() -> Worker:
        if state["worker"] is None or state["closing"]:
            why = state["error"] or (
                "the server is shutting down" if state["closing"] else "the bundle is loading"
            )
            raise ApiError(503, why, kind="server_error")
        return state["worker"]

    app = FastAPI(title="mllm-edge", lifespan=lifespan)

    def close() -> None:  # SIGTERM: new requests get 503, those accepted go on
        state["closing"] = True

    def cut() -> None:  # the shutdown timeout: what still runs or waits stops, each told why
        if state["worker"] is not None:
            state["worker"].cut()

    app.state.close, app.state.cut = close, cut

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if settings.api_key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
                error = ApiError(
                    401, "a valid API key is needed: Authorization: Bearer KEY", kind="authentication_error"
                )
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        headers = {"Retry-After": str(settings.retry_after_s)} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(request, e: Exception):  # still OpenAI's error object, and the server goes on
        error = ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/health")
    async def health():
        try:
            worker = ready()
        except ApiError as e:
            return JSONResponse({"status": "unavailable", "reason": e.message}, status_code=503)
        return {"status": "ok", "running": worker.running, "waiting": worker.waiting}

    if metrics is not None:

        @app.get("/metrics")
        async def scrape():
            return Response(metrics.scrape(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model, "object": "model", "created": 0, "owned_by": "mllm-edge"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            worker = ready()
        except ApiError:
            metrics and metrics.rejected.inc()
            raise
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > settings.max_body_bytes:  # refused before it is read
            raise ApiError(413, f"the request body is larger than {settings.max_body_bytes} bytes")
        raw = await request.body()
        if len(raw) > settings.max_body_bytes:
            raise ApiError(413, f"the request body is larger than {settings.max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not JSON: {e}") from None
        chat = await asyncio.to_thread(parse_chat_request, body, settings.limits)
        try:  # the messages' own mistakes answer now, not after a wait in the queue
            normalize_messages(chat.messages, state["pipeline"].prompts.image_token)
        except MllmEdgeError as e:
            raise ApiError(400, str(e), "messages") from None
        job = Job(chat, asyncio.get_running_loop())
        try:
            worker.submit(job)
        except QueueFull:
            metrics and metrics.rejected.inc()
            raise ApiError(
                429, "too many requests waiting: try again shortly", kind="rate_limit_error"
            ) from None
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if chat.stream:
            return StreamingResponse(
                _events(job, ident, created, model, chat.include_usage, metrics),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            while True:
                kind, value = await job.events.get()
                if kind == "error":
                    metrics and metrics.failed.inc()
                    raise value
                if kind == "done":
                    metrics and metrics.answered(value)
                    return _completion(value, ident, created, model)
        finally:
            job.cancelled.set()  # a client that went away while waiting frees the worker

    return app


def run_server(app: FastAPI, host: str, port: int, shutdown_timeout_s: float, log_level: str = "warning"):
    """uvicorn until SIGTERM or Ctrl-C, then the shutdown the docs promise: it stops accepting, new
    requests on open connections get 503, accepted ones may finish for shutdown_timeout_s, then
    they are cut (a 503, or an error event ending the stream) and it returns."""
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not self.should_exit:
                app.state.close()
                timer = threading.Timer(shutdown_timeout_s, app.state.cut)
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    # uvicorn's own cancellation is only a backstop: it kills the request tasks mid-response
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout_s + 10
    )
    Server(config).run()


def _usage(result: RunResult) -> dict:
    prompt = len(result.prompt_token_ids)
    completion = len(result.token_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": result.cached_prompt_tokens},
    }


def _extension(result: RunResult) -> dict:
    """What `run --json` reports beyond OpenAI's fields."""
    return {
        "kept_image_tokens": result.kept_image_tokens,
        "timings_ms": result.timings_ms,
        "decode_tokens_per_s": result.decode_tokens_per_s,
        "vision_reused": result.vision_reused,
        "backend": result.backend,
        "device": result.device,
    }


def _completion(result: RunResult, ident: str, created: int, model: str) -> dict:
    return {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": _usage(result),
        "mllm_edge": _extension(result),
    }


async def _events(job: Job, ident: str, created: int, model: str, include_usage: bool, metrics):
    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await job.events.get()
            if kind == "piece":
                yield chunk({"content": value})
            elif kind == "error":  # headers are sent: the error travels as an event
                metrics and metrics.failed.inc()
                yield f"data: {json.dumps(value.body())}\n\n"
                break
            else:
                metrics and metrics.answered(value)
                yield chunk({}, value.finish_reason, mllm_edge=_extension(value))
                if include_usage:
                    body = {
                        "id": ident,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                    }
                    yield f"data: {json.dumps({**body, 'choices': [], 'usage': _usage(value)})}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:  # the client disconnected, or the answer is complete
        job.cancelled.set()
