"""`mllm-edge serve` through the `openai` client on loopback, as applications call it.

What is checked: the models and health endpoints; an answer (non-streamed and streamed, with
usage) equals the pipeline's own for the same conversation; a follow-up takes its prompt from the
cache; stop strings; bad requests are 400/413 with OpenAI's error object and the server keeps
serving; a burst beyond the queue gets 429 with Retry-After while every accepted request gets its
complete answer.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import pytest

pytest.importorskip("onnxruntime", reason="the runtime needs the onnxruntime extra")
pytest.importorskip("fastapi", reason="serve needs the serve extra")
openai = pytest.importorskip("openai", reason="the tests call the server with the openai client")

import uvicorn  # noqa: E402

from mllm_edge.errors import MllmEdgeError  # noqa: E402
from mllm_edge.evaluate import synthetic_items  # noqa: E402
from mllm_edge.runtime.pipeline import Pipeline  # noqa: E402
from mllm_edge.serve.app import Settings, create_app  # noqa: E402
from mllm_edge.serve.requests import Limits  # noqa: E402

TOKENS = 8


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from mllm_edge.default_model import checkpoint
    from mllm_edge.export.bundle import ExportConfig, export_bundle
    from mllm_edge.pruning import PruningConfig

    out = tmp_path_factory.mktemp("serve") / "fastv"
    export_bundle(ExportConfig(str(checkpoint()), out, PruningConfig.from_method("fastv", 0.5), verify=False))
    return out


class Server:
    """The app under uvicorn in a thread, on a free loopback port."""

    def __init__(self, pipeline, settings, name=None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        app = create_app(pipeline, settings, name)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def served(bundle, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    pipeline = Pipeline.load(bundle, backend="onnxruntime")
    server = Server(
        pipeline, Settings(max_queue=4, limits=Limits(max_image_bytes=1 << 20, allowed_media_path=media))
    )
    yield server, media
    server.close()
    pipeline.close()


def hold_the_worker(pipeline, seconds: float) -> None:
    """Each request then keeps the worker `seconds` longer before it generates."""
    real = pipeline.stream_chat

    def slower(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    pipeline.stream_chat = slower


def still_serves(server, seed: int) -> None:
    """The next request after a failure gets an answer."""
    item = synthetic_items(1, seed=seed)[0]
    got = server.client().chat.completions.create(model="fastv", messages=[image_turn(item)], max_tokens=2)
    assert got.choices[0].message.content is not None


def wait_until_healthy(url: str, seconds: int, failure: str) -> None:
    """Until GET url (a /health) answers 200; a test failure after `seconds`. Before, nothing may
    listen yet, or (Ray's proxy while the replicas start) something that does not answer JSON."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if http(url)[0] == 200:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    pytest.fail(failure)


def data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_turn(item, url=None) -> dict:
    return {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": url or data_uri(item.image)}},
            {"type": "text", "text": item.question},
        ],
    }


def ours(item, messages_after=()) -> list[dict]:
    """The same conversation in the pipeline's form."""
    first = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.question}]}
    return [first, *messages_after]


def http(url: str, body: bytes | None = None) -> tuple[int, dict]:
    """A raw request (what the openai client would not send), -> (status, JSON body)."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_and_health(served):
    server, _ = served
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["fastv"]
    assert http(server.url + "/health") == (200, {"status": "ok", "running": 0, "waiting": 0})


def test_answers_equal_the_pipelines_streamed_or_not(served, bundle):
    server, _ = served
    client = server.client()
    items = synthetic_items(2, seed=21)
    with Pipeline.load(bundle, backend="onnxruntime") as reference:
        for item in items:
            want = reference.chat(ours(item), item.image, max_new_tokens=TOKENS, reuse=False)
            got = client.chat.completions.create(
                model="fastv", messages=[image_turn(item)], max_tokens=TOKENS
            )
            assert got.choices[0].message.content == want.text and got.choices[0].finish_reason == "stop"
            assert got.usage.prompt_tokens == len(want.prompt_token_ids)
            assert got.usage.completion_tokens == len(want.token_ids)
            extension = got.model_extra["mllm_edge"]
            assert extension["kept_image_tokens"] == want.kept_image_tokens

            chunks = list(
                client.chat.completions.create(
                    model="fastv",
                    messages=[image_turn(item)],
                    max_completion_tokens=TOKENS,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == want.text
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
            assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(want.prompt_token_ids)

            # a follow-up about the same picture: the answer of the whole conversation, from the cache
            follow = [
                {"role": "assistant", "content": want.text},
                {"role": "user", "content": "How many shapes?"},
            ]
            want2 = reference.chat(ours(item, follow), item.image, max_new_tokens=TOKENS, reuse=False)
            got2 = client.chat.completions.create(
                model="fastv", messages=[image_turn(item), *follow], max_tokens=TOKENS
            )
            assert got2.choices[0].message.content == want2.text
            assert got2.usage.prompt_tokens_details.cached_tokens > len(want.prompt_token_ids) // 2


def test_stop_strings_end_the_answer(served, bundle):
    server, _ = served
    item = synthetic_items(1, seed=22)[0]
    with Pipeline.load(bundle, backend="onnxruntime") as reference:
        full = reference.chat(ours(item), item.image, max_new_tokens=TOKENS, reuse=False).text
    assert len(full) >= 2
    stop = full[1:3] if len(full) >= 3 else full[1:]
    got = server.client().chat.completions.create(
        model="fastv", messages=[image_turn(item)], max_tokens=TOKENS, stop=[stop]
    )
    assert got.choices[0].message.content == full[: full.index(stop)]
    assert got.choices[0].finish_reason == "stop"


def test_bad_requests_are_openai_errors_and_the_server_goes_on(served):
    server, media = served
    client = server.client()
    item = synthetic_items(1, seed=23)[0]
    (media / "ok.png").write_bytes(base64.b64decode(data_uri(item.image).split(",", 1)[1]))
    from PIL import Image

    bomb = data_uri(Image.new("1", (10_000, 10_000)))
    outside = media.parent / "outside.png"
    outside.write_bytes((media / "ok.png").read_bytes())
    cases = [
        ({"n": 2}, "n must be 1"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools are not supported"),
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": [image_turn(item, "https://example.com/a.png")]}, "not fetched"),
        ({"messages": [image_turn(item, "data:image/png;base64,@@@")]}, "base64"),
        ({"messages": [image_turn(item, "data:image/png;base64,aGVsbG8=")]}, "cannot be read"),
        ({"messages": [image_turn(item, outside.as_uri())]}, "outside the allowed media path"),
        ({"messages": [image_turn(item, bomb)]}, "over the limit"),  # 100 M pixels in a few kB
        ({"messages": [image_turn(item), image_turn(item)]}, "2 images"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
        ({"messages": []}, "non-empty"),
    ]
    for change, message in cases:
        body = {"model": "fastv", "messages": [image_turn(item)], "max_tokens": 2, **change}
        with pytest.raises(openai.BadRequestError, match=message) as raised:
            client.chat.completions.create(**body)
        assert raised.value.body["type"] == "invalid_request_error"
    big = "data:image/png;base64," + "A" * (2 << 20)
    with pytest.raises(openai.APIStatusError, match="larger than") as raised:
        client.chat.completions.create(model="fastv", messages=[image_turn(item, big)], max_tokens=2)
    assert raised.value.status_code == 413
    status, answer = http(server.url + "/v1/chat/completions", b"{not json")
    assert status == 400 and "not JSON" in answer["error"]["message"]
    import http.client as httpclient
    import json

    connection = httpclient.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("POST", "/v1/chat/completions")  # a 33 MB body announced: refused unread
    connection.putheader("Content-Length", str(33 << 20))
    connection.endheaders()
    response = connection.getresponse()
    assert (
        response.status == 413 and "request body is larger" in json.loads(response.read())["error"]["message"]
    )
    connection.close()
    # still serving, and a file:// image under the allowed path works
    fine = client.chat.completions.create(
        model="fastv", messages=[image_turn(item, (media / "ok.png").as_uri())], max_tokens=2
    )
    assert fine.choices[0].message.content is not None


def test_a_burst_beyond_the_queue_gets_429_and_nothing_is_lost(bundle):
    items = synthetic_items(6, seed=24)
    pipeline = Pipeline.load(bundle, backend="onnxruntime")
    with Pipeline.load(bundle, backend="onnxruntime") as reference:
        wanted = [reference.chat(ours(i), i.image, max_new_tokens=TOKENS, reuse=False).text for i in items]
    hold_the_worker(pipeline, 0.5)  # so that the burst finds it busy
    server = Server(pipeline, Settings(max_queue=1))
    results = [None] * len(items)

    def ask(i):
        try:
            got = server.client().chat.completions.create(
                model="fastv", messages=[image_turn(items[i])], max_tokens=TOKENS
            )
            results[i] = got.choices[0].message.content
        except openai.RateLimitError as e:
            results[i] = ("429", e.response.headers.get("retry-after"))

    try:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(items))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        server.close()
        pipeline.close()
    rejected = [r for r in results if isinstance(r, tuple)]
    answered = [(i, r) for i, r in enumerate(results) if isinstance(r, str)]
    assert rejected and all(r == ("429", "1") for r in rejected)
    assert len(answered) >= 2 and all(r == wanted[i] for i, r in answered)


def test_serve_refuses_a_missing_media_folder(bundle, tmp_path):
    from typer.testing import CliRunner

    from mllm_edge.cli import app

    result = CliRunner().invoke(
        app, ["serve", "--bundle", str(bundle), "--allowed-media-path", str(tmp_path / "missing")]
    )
    assert result.exit_code == 1 and "is not a folder" in result.stderr and "Traceback" not in result.stderr


def test_an_api_key_guards_everything_but_health_and_long_waits_are_refused(bundle):
    item = synthetic_items(1, seed=25)[0]
    pipeline = Pipeline.load(bundle, backend="onnxruntime")
    hold_the_worker(pipeline, 0.6)
    server = Server(pipeline, Settings(api_key="s3cret", queue_timeout_s=0.3))
    try:
        assert http(server.url + "/health")[0] == 200
        assert http(server.url + "/v1/models")[0] == 401
        with pytest.raises(openai.AuthenticationError):
            server.client().models.list()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["fastv"]
        results = []

        def ask():
            try:
                got = client.chat.completions.create(model="fastv", messages=[image_turn(item)], max_tokens=2)
                results.append(got.choices[0].message.content)
            except openai.APIStatusError as e:
                results.append(e.status_code)

        threads = [threading.Thread(target=ask) for _ in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.05)  # in order: the second waits behind the first's 0.6 s
        for t in threads:
            t.join(timeout=60)
        assert sorted(results, key=str) == sorted(
            [503, results[0] if results[0] != 503 else results[1]], key=str
        )
        assert 503 in results and any(isinstance(r, str) for r in results)
    finally:
        server.close()
        pipeline.close()


def test_metrics_count_what_was_served(bundle):
    item = synthetic_items(1, seed=26)[0]
    pipeline = Pipeline.load(bundle, backend="onnxruntime")
    server = Server(pipeline, Settings(metrics=True, max_queue=1))
    try:
        got = server.client().chat.completions.create(
            model="fastv", messages=[image_turn(item)], max_tokens=TOKENS
        )
        import urllib.request

        with urllib.request.urlopen(server.url + "/metrics", timeout=30) as response:
            text = response.read().decode()
        values = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in text.splitlines()
            if line and line[0] != "#"
        }
        assert values["mllm_edge_requests_completed_total"] == 1
        assert values["mllm_edge_prompt_tokens_total"] == got.usage.prompt_tokens
        assert values["mllm_edge_generation_tokens_total"] == got.usage.completion_tokens
        assert values["mllm_edge_time_to_first_token_seconds_count"] == 1
        assert values["mllm_edge_image_tokens_kept_total"] == len(
            got.model_extra["mllm_edge"]["kept_image_tokens"]["llm"]
        )
        assert values["mllm_edge_requests_running"] == 0 and values["mllm_edge_requests_waiting"] == 0
    finally:
        server.close()
        pipeline.close()


def test_health_is_503_while_the_bundle_loads_and_says_why_it_failed(bundle):
    item = synthetic_items(1, seed=27)[0]
    go = threading.Event()

    def load():
        go.wait(timeout=60)
        return Pipeline.load(bundle, backend="onnxruntime")

    server = Server(load, Settings(), name="fastv")
    try:
        status, body = http(server.url + "/health")
        assert status == 503 and "loading" in body["reason"]
        with pytest.raises(openai.InternalServerError, match="loading"):
            server.client().chat.completions.create(model="fastv", messages=[image_turn(item)], max_tokens=2)
        go.set()
        deadline = time.time() + 60
        while http(server.url + "/health")[0] != 200 and time.time() < deadline:
            time.sleep(0.1)
        got = server.client().chat.completions.create(
            model="fastv", messages=[image_turn(item)], max_tokens=2
        )
        assert got.choices[0].message.content is not None
    finally:
        server.close()

    def broken():
        raise MllmEdgeError("bundle x is damaged")

    server = Server(broken, Settings(), name="x")
    try:
        deadline = time.time() + 30
        while "could not" not in http(server.url + "/health")[1].get("reason", "") and time.time() < deadline:
            time.sleep(0.05)
        status, body = http(server.url + "/health")
        assert status == 503 and "could not be loaded: bundle x is damaged" in body["reason"]
    finally:
        server.close()


def test_a_client_that_goes_away_stops_its_generation(bundle):
    """The worker stops at the next piece once a streaming client disconnects, and serves the next."""
    import http.client as httpclient

    from mllm_edge.runtime.pipeline import Generation

    pipeline = Pipeline.load(bundle, backend="onnxruntime")
    produced = []

    def endless(*args, **kwargs):  # a long answer: one piece every 20 ms, for 10 s
        def pieces():
            for i in range(500):
                time.sleep(0.02)
                produced.append(i)
                yield "x "

        return Generation(pieces())

    real = pipeline.stream_chat
    pipeline.stream_chat = endless
    server = Server(pipeline, Settings())
    try:
        body = b'{"messages": [{"role": "user", "content": "go"}], "stream": true}'
        connection = httpclient.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        for _ in range(3):
            assert response.readline().startswith(b"data: ")
            response.readline()
        connection.close()  # gone after about three pieces
        time.sleep(1.0)
        stopped_at = len(produced)
        time.sleep(0.5)
        assert len(produced) == stopped_at < 100  # stopped, long before the 500
        pipeline.stream_chat = real
        still_serves(server, seed=28)
    finally:
        server.close()
        pipeline.close()


def test_sigterm_stops_the_server_cleanly(bundle):
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "mllm_edge.cli", "serve", "--bundle", str(bundle), "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/health", 120, "the server did not come up")
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
    err = process.stderr.read()
    assert code == 0 and "Traceback" not in err, err


PACED_SERVER = """
import sys, time
from mllm_edge.runtime.pipeline import Generation, Pipeline

real = Pipeline.stream_chat

def paced(self, messages, image=None, max_new_tokens=256, **options):
    # the real answer, one piece every 0.2 s; max_tokens >= 100 asks for an endless one instead
    if max_new_tokens >= 100:
        return Generation(("x " for _ in range(10_000) if time.sleep(0.05) is None))
    inner = real(self, messages, image, max_new_tokens, **options)

    def steps():
        for piece in inner:
            time.sleep(0.2)
            yield piece
        return inner.result

    return Generation(steps())

Pipeline.stream_chat = paced
from mllm_edge.cli import app
sys.argv[0] = "mllm-edge"
app()
"""


def test_sigterm_lets_running_answers_finish_cuts_them_at_the_timeout_and_exits_0(bundle, tmp_path):
    """SIGTERM during two requests: the running one completes (its answer the pipeline's), the one
    queued behind it runs and is cut short once --shutdown-timeout has passed, with an error event
    saying so; new connections are refused; exit 0."""
    import http.client as httpclient
    import json
    import os
    import signal
    import subprocess
    import sys

    item = synthetic_items(1, seed=31)[0]
    with Pipeline.load(bundle, backend="onnxruntime") as reference:
        wanted = reference.chat(ours(item), item.image, max_new_tokens=4, reuse=False).text
    script = tmp_path / "paced_server.py"
    script.write_text(PACED_SERVER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, str(script), "serve", "--bundle", str(bundle), "--port", str(port)]
    process = subprocess.Popen([*command, "--shutdown-timeout", "2"], stderr=subprocess.PIPE, text=True)

    def stream(max_tokens: int):
        body = {"messages": [image_turn(item)], "max_tokens": max_tokens, "stream": True}
        connection = httpclient.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        assert response.status == 200
        return response

    def text_of(events: list[bytes]) -> str:
        chunks = [json.loads(e[6:]) for e in events if e.startswith(b"data: {")]
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))

    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/health", 120, "the server did not come up")
        running = stream(4)
        first = [running.readline(), running.readline()]  # the role chunk: it is generating
        behind = stream(1000)  # waits in the queue for the worker
        process.send_signal(signal.SIGTERM)
        signalled = time.time()
        finished = first + list(running)  # to the end of the stream
        assert finished[-2] == b"data: [DONE]\n", finished
        assert text_of(finished) == wanted
        cut = list(behind)  # an answer begun once the first was done, then cut short, told why
        assert text_of(cut).startswith("x x ")
        errors = [json.loads(e[6:]) for e in cut if e.startswith(b'data: {"error"')]
        assert [e["error"]["message"] for e in errors] == [
            "the server is shutting down: the answer was cut short"
        ]
        with pytest.raises(OSError):
            http(f"http://127.0.0.1:{port}/health")  # no longer accepting
        code = process.wait(timeout=60)
        took = time.time() - signalled
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
    err = process.stderr.read()
    assert code == 0 and "Traceback" not in err, err
    assert took < 30, took  # the endless answer was cut, not waited for


def test_an_unexpected_error_is_still_an_openai_error(bundle):
    item = synthetic_items(1, seed=29)[0]
    pipeline = Pipeline.load(bundle, backend="onnxruntime")
    prompts, pipeline.prompts = pipeline.prompts, None  # the route's own check now fails unexpectedly
    server = Server(pipeline, Settings())
    try:
        with pytest.raises(openai.InternalServerError, match="internal error: AttributeError"):
            server.client().chat.completions.create(model="fastv", messages=[image_turn(item)], max_tokens=2)
        pipeline.prompts = prompts
        still_serves(server, seed=29)
    finally:
        server.close()
        pipeline.close()


@pytest.mark.slow
def test_two_replicas_on_ray_serve_answer_as_one(bundle):
    """`serve --replicas 2`: Ray Serve's proxy in front of two replicas of the same app, each with
    its own pipeline; concurrent requests all get the pipeline's answers."""
    pytest.importorskip("ray.serve", reason="--replicas needs the ray extra")
    import ray
    from ray import serve

    from mllm_edge.serve import replicas

    items = synthetic_items(4, seed=30)
    with Pipeline.load(bundle, backend="onnxruntime") as reference:
        wanted = [reference.chat(ours(i), i.image, max_new_tokens=TOKENS, reuse=False).text for i in items]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = replicas.application(bundle, Settings(max_queue=2), replicas=2, backend="onnxruntime")
    try:
        replicas.run(app, "127.0.0.1", port, num_cpus=2, blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url + "/health", 120, "the replicas did not come up")
        states = serve.status().applications["default"].deployments["mllm-edge"].replica_states
        assert states.get("RUNNING") == 2, states
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        results = [None] * len(items)

        def ask(i):
            got = client.chat.completions.create(
                model="fastv", messages=[image_turn(items[i])], max_tokens=TOKENS
            )
            results[i] = got.choices[0].message.content

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(items))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert results == wanted
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow
def test_serve_replicas_from_the_command_line_answers_and_exits_0_on_sigterm(bundle):
    """`mllm-edge serve --replicas 2` as a user starts it: the pipeline's answer, then SIGTERM stops
    the replicas and Ray, and the command exits 0."""
    pytest.importorskip("ray.serve", reason="--replicas needs the ray extra")
    import os
    import signal
    import subprocess
    import sys

    item = synthetic_items(1, seed=32)[0]
    with Pipeline.load(bundle, backend="onnxruntime") as reference:
        wanted = reference.chat(ours(item), item.image, max_new_tokens=TOKENS, reuse=False).text
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "mllm_edge.cli", "serve", "--bundle", str(bundle), "--port", str(port)]
    process = subprocess.Popen([*command, "--replicas", "2"], stderr=subprocess.PIPE, text=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/health", 180, "the replicas did not come up")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        got = client.chat.completions.create(model="fastv", messages=[image_turn(item)], max_tokens=TOKENS)
        assert got.choices[0].message.content == wanted
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
    err = process.stderr.read()
    assert code == 0 and "Traceback" not in err, err
