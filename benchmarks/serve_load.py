"""`mllm-edge serve` under load: N concurrent clients on loopback for a bounded time, each sending
an image question and then, half the time, a follow-up about the same picture (streamed, through
the `openai` client). Reports requests/s, time to first token and end-to-end p50/p95, rejections,
and checks that every accepted request got the complete answer a sequential run gives (nothing
lost, nothing mixed between conversations).

    .venv/bin/python benchmarks/serve_load.py --clients 1,2,4,8 --seconds 20
"""

from __future__ import annotations

import argparse
import base64
import io
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

from common import machine, write_json  # this folder is sys.path[0] when run as a script

FOLLOW_UP = "How many shapes are there?"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, help="default: the built-in model exported with FastV K=2 R=0.5")
    p.add_argument("--clients", default="1,2,4,8")
    p.add_argument("--seconds", type=float, default=20.0, help="per concurrency level")
    p.add_argument("--max-queue", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--items", type=int, default=8, help="distinct pictures and questions")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "serve_load.json")
    args = p.parse_args()

    import openai
    import uvicorn

    from mllm_edge.evaluate import synthetic_items
    from mllm_edge.runtime.pipeline import Pipeline
    from mllm_edge.serve.app import Settings, create_app

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            from mllm_edge.default_model import checkpoint
            from mllm_edge.export.bundle import ExportConfig, export_bundle
            from mllm_edge.pruning import PruningConfig

            bundle = Path(tmp) / "fastv"
            export_bundle(
                ExportConfig(str(checkpoint()), bundle, PruningConfig.from_method("fastv", 0.5), verify=False)
            )

        items = synthetic_items(args.items, seed=31)
        urls = []
        for item in items:
            buffer = io.BytesIO()
            item.image.save(buffer, format="PNG")
            urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())

        def conversation(i: int, follow: bool, first_answer: str | None = None) -> list[dict]:
            first = [
                {"type": "image_url", "image_url": {"url": urls[i]}},
                {"type": "text", "text": items[i].question},
            ]
            messages = [{"role": "user", "content": first}]
            if follow:
                messages += [
                    {"role": "assistant", "content": first_answer},
                    {"role": "user", "content": FOLLOW_UP},
                ]
            return messages

        print("sequential answers (the reference) ...", flush=True)
        expected = {}
        with Pipeline.load(bundle, backend="onnxruntime") as reference:
            for i, item in enumerate(items):
                ours = [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.question}]}
                ]
                first = reference.chat(ours, item.image, max_new_tokens=args.max_tokens, reuse=False).text
                follow = ours + [
                    {"role": "assistant", "content": first},
                    {"role": "user", "content": FOLLOW_UP},
                ]
                second = reference.chat(follow, item.image, max_new_tokens=args.max_tokens, reuse=False).text
                expected[i, False], expected[i, True] = first, second

        pipeline = Pipeline.load(bundle, backend="onnxruntime")
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(pipeline, Settings(max_queue=args.max_queue)), port=port, log_level="error"
            )
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)

        rows = []
        try:
            for clients in [int(c) for c in args.clients.split(",")]:
                records, lock = [], threading.Lock()
                stop_at = time.perf_counter() + args.seconds

                def run(seed: int, stop_at=stop_at, records=records, lock=lock) -> None:
                    rng = random.Random(seed)
                    while time.perf_counter() < stop_at:
                        i = rng.randrange(len(items))
                        turns = [False, True] if rng.random() < 0.5 else [False]
                        for follow in turns:
                            messages = conversation(i, follow, expected[i, False])
                            start = time.perf_counter()
                            first_token, text, outcome = None, "", "ok"
                            try:
                                for chunk in client.chat.completions.create(
                                    model=bundle.name,
                                    messages=messages,
                                    max_tokens=args.max_tokens,
                                    stream=True,
                                ):
                                    if chunk.choices and chunk.choices[0].delta.content:
                                        first_token = first_token or time.perf_counter()
                                        text += chunk.choices[0].delta.content
                            except openai.RateLimitError:
                                outcome = "rejected"
                            except openai.APIError as e:
                                outcome = f"error: {e}"
                            end = time.perf_counter()
                            with lock:
                                records.append(
                                    {
                                        "outcome": outcome,
                                        "ttft_s": (first_token or end) - start,
                                        "e2e_s": end - start,
                                        "same": text == expected[i, follow],
                                        "follow_up": follow,
                                    }
                                )
                            if outcome != "ok":
                                break

                started = time.perf_counter()
                workers = [threading.Thread(target=run, args=(clients * 1000 + k,)) for k in range(clients)]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
                elapsed = time.perf_counter() - started
                ok = [r for r in records if r["outcome"] == "ok"]
                row = {
                    "clients": clients,
                    "seconds": round(elapsed, 2),
                    "requests_ok": len(ok),
                    "requests_per_s": round(len(ok) / elapsed, 2),
                    "rejected": sum(r["outcome"] == "rejected" for r in records),
                    "errors": sum(r["outcome"].startswith("error") for r in records),
                    "wrong_answers": sum(not r["same"] for r in ok),
                    "ttft_p50_ms": round(1000 * percentile([r["ttft_s"] for r in ok], 0.5), 1),
                    "ttft_p95_ms": round(1000 * percentile([r["ttft_s"] for r in ok], 0.95), 1),
                    "e2e_p50_ms": round(1000 * percentile([r["e2e_s"] for r in ok], 0.5), 1),
                    "e2e_p95_ms": round(1000 * percentile([r["e2e_s"] for r in ok], 0.95), 1),
                    "follow_up_e2e_p50_ms": round(
                        1000
                        * statistics.median([r["e2e_s"] for r in ok if r["follow_up"]] or [float("nan")]),
                        1,
                    ),
                    "first_turn_e2e_p50_ms": round(
                        1000
                        * statistics.median([r["e2e_s"] for r in ok if not r["follow_up"]] or [float("nan")]),
                        1,
                    ),
                }
                rows.append(row)
                print(row, flush=True)
        finally:
            server.should_exit = True
            thread.join(timeout=30)
            pipeline.close()

    header = ["clients", "requests_per_s", "ttft_p50_ms", "ttft_p95_ms", "e2e_p50_ms", "e2e_p95_ms"]
    header += ["first_turn_e2e_p50_ms", "follow_up_e2e_p50_ms", "rejected", "errors", "wrong_answers"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")
    write_json(
        args.json,
        {
            "machine": machine(),
            "bundle": str(args.bundle or "built-in, FastV K=2 R=0.5"),
            "max_queue": args.max_queue,
            "max_tokens": args.max_tokens,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
