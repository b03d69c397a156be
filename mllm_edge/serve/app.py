"""The HTTP server: OpenAI's chat-completions API over one pipeline (FastAPI; `mllm-edge serve`).

    POST /v1/chat/completions   OpenAI's request and response, `stream: true` as server-sent events
    GET  /v1/models             the one model: the bundle
    GET  /health                200 with the running and waiting counts once loaded

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

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import MllmEdgeError
from ..runtime.pipeline import Pipeline, RunResult
from ..runtime.prompt import normalize_messages
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


def create_app(pipeline: Pipeline, settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    model = Path(pipeline.folder).resolve().name
    state = {"worker": None, "closing": False}

    async def lifespan(app):
        state["worker"] = Worker(pipeline, settings.max_queue, settings.queue_timeout_s)
        yield
        state["closing"] = True
        await asyncio.to_thread(state["worker"].stop)

    app = FastAPI(title="mllm-edge", lifespan=lifespan)

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

    @app.get("/health")
    async def health():
        worker = state["worker"]
        if worker is None or state["closing"]:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok", "running": worker.running, "waiting": worker.waiting}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model, "object": "model", "created": 0, "owned_by": "mllm-edge"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        worker = state["worker"]
        if worker is None or state["closing"]:
            raise ApiError(503, "the server is not ready or is shutting down", kind="server_error")
        raw = await request.body()
        if len(raw) > settings.max_body_bytes:
            raise ApiError(413, f"the request body is larger than {settings.max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not JSON: {e}") from None
        chat = await asyncio.to_thread(parse_chat_request, body, settings.limits)
        try:  # the messages' own mistakes answer now, not after a wait in the queue
            normalize_messages(chat.messages, pipeline.prompts.image_token)
        except MllmEdgeError as e:
            raise ApiError(400, str(e), "messages") from None
        job = Job(chat, asyncio.get_running_loop())
        try:
            worker.submit(job)
        except QueueFull:
            raise ApiError(
                429, "too many requests waiting: try again shortly", kind="rate_limit_error"
            ) from None
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if chat.stream:
            return StreamingResponse(
                _events(job, ident, created, model, chat.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            while True:
                kind, value = await job.events.get()
                if kind == "error":
                    raise value
                if kind == "done":
                    return _completion(value, ident, created, model)
        finally:
            job.cancelled.set()  # a client that went away while waiting frees the worker

    return app


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


async def _events(job: Job, ident: str, created: int, model: str, include_usage: bool):
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
                yield f"data: {json.dumps(value.body())}\n\n"
                break
            else:
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
