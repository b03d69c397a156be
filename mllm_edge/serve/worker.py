"""One thread owns the pipeline (a batch-1 engine and its KV cache); requests wait in a bounded queue.

A request is a Job: the worker runs it and hands its events (text pieces, then the result or an
error) back to the request's event loop as they come. A job whose client went away is cancelled:
the worker stops at the next token. A full queue refuses at once (the HTTP layer's 429), rather
than letting waits grow without bound.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from ..errors import MllmEdgeError
from ..runtime.pipeline import Pipeline
from .requests import ApiError, ChatRequest

STOP = object()  # the worker's own sentinel: leave the loop


def shutting_down(why: str = "the server is shutting down") -> ApiError:
    return ApiError(503, why, kind="server_error")


@dataclass
class Job:
    request: ChatRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(
        default_factory=asyncio.Queue
    )  # ("piece", str) | ("done", dict) | ("error", str)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cut: bool = False  # cancelled by a shutdown, not by its client: it is told so
    queued_at: float = field(default_factory=time.perf_counter)

    def send(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class QueueFull(Exception):
    pass


class Worker:
    def __init__(self, pipeline: Pipeline, max_queue: int = 16, queue_timeout_s: float | None = None):
        self.pipeline, self.queue_timeout_s = pipeline, queue_timeout_s
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.running = 0  # jobs the worker is generating for now (0 or 1)
        self.current: Job | None = None
        self.closed = False  # cut: no job starts any more
        self.lock = threading.Lock()  # cut and the start of a job: one or the other first
        self.thread = threading.Thread(target=self._loop, name="mllm-edge-worker", daemon=True)
        self.thread.start()

    @property
    def waiting(self) -> int:
        return self.jobs.qsize()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def cut(self) -> None:
        """A shutdown that cannot wait longer: refuse what waits, stop the running answer at its next
        token, each told why (a 503, or an error event in a stream)."""
        with self.lock:
            self.closed = True
            running = self.current
        if running is not None:
            running.cut = True
            running.cancelled.set()
        stopping = False
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is STOP:
                stopping = True
            else:
                job.send("error", shutting_down())
        if stopping:  # stop() had asked the loop to leave: it still must
            self.jobs.put(STOP)

    def stop(self) -> None:
        """Cut what is left, and leave (the running job ends at its next token; a prefill cannot be
        interrupted, hence the wait)."""
        self.cut()
        self.jobs.put(STOP)
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is STOP:
                return
            if job.cancelled.is_set():
                continue
            waited = time.perf_counter() - job.queued_at
            if self.queue_timeout_s is not None and waited > self.queue_timeout_s:
                job.send(
                    "error",
                    ApiError(
                        503,
                        f"the request waited {waited:.1f} s in the queue, over the server's limit",
                        kind="server_error",
                    ),
                )
                continue
            with self.lock:
                if self.closed:
                    job.send("error", shutting_down())
                    continue
                self.running, self.current = 1, job
            try:
                self._run(job)
            except MllmEdgeError as e:  # what the request asked cannot be done (the context is full, ...)
                job.send("error", ApiError(400, str(e)))
            except Exception as e:  # the worker must outlive any one request
                job.send(
                    "error", ApiError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error")
                )
            finally:
                self.running, self.current = 0, None

    def _run(self, job: Job) -> None:
        request = job.request
        generation = self.pipeline.stream_chat(
            request.messages, request.picture, stop=request.stop, **request.options
        )
        for piece in generation:
            if job.cancelled.is_set():  # the client went away, or the server is shutting down
                if job.cut:
                    job.send("error", shutting_down("the server is shutting down: the answer was cut short"))
                return
            job.send("piece", piece)
        job.send("done", generation.result)
