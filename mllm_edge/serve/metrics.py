"""The server's figures in Prometheus's format (prometheus-client), one registry per app."""

from __future__ import annotations

from ..runtime.pipeline import RunResult

SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class Metrics:
    def __init__(self, state: dict):
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram

        self.registry, self.content_type = CollectorRegistry(), CONTENT_TYPE_LATEST
        r = self.registry

        def worker_count(name: str):  # read at scrape time
            return lambda: getattr(state["worker"], name) if state["worker"] else 0

        Gauge("mllm_edge_requests_running", "Requests generating now", registry=r).set_function(
            worker_count("running")
        )
        Gauge("mllm_edge_requests_waiting", "Requests waiting for the worker", registry=r).set_function(
            worker_count("waiting")
        )
        self.state = state
        self.completed = Counter("mllm_edge_requests_completed", "Requests answered", registry=r)
        self.failed = Counter("mllm_edge_requests_failed", "Requests that failed in generation", registry=r)
        self.rejected = Counter(
            "mllm_edge_requests_rejected", "Requests refused: queue full, loading, closing", registry=r
        )
        self.ttft = Histogram(
            "mllm_edge_time_to_first_token_seconds", "Time to first token", buckets=SECONDS, registry=r
        )
        self.per_token = Histogram(
            "mllm_edge_time_per_output_token_seconds", "Decode time per token", buckets=PER_TOKEN, registry=r
        )
        self.prompt = Counter("mllm_edge_prompt_tokens", "Prompt tokens", registry=r)
        self.cached = Counter(
            "mllm_edge_cached_prompt_tokens", "Prompt tokens taken from the cache", registry=r
        )
        self.generated = Counter("mllm_edge_generation_tokens", "Generated tokens", registry=r)
        self.image_kept = Counter(
            "mllm_edge_image_tokens_kept", "Image tokens the LLM kept after pruning", registry=r
        )

    def answered(self, result: RunResult) -> None:
        self.completed.inc()
        self.ttft.observe(result.timings_ms["ttft"] / 1000.0)
        if result.timings_ms["decode_per_token"]:
            self.per_token.observe(result.timings_ms["decode_per_token"] / 1000.0)
        self.prompt.inc(len(result.prompt_token_ids))
        self.cached.inc(result.cached_prompt_tokens)
        self.generated.inc(len(result.token_ids))
        token = self.state["pipeline"].manifest.tokenizer["image_token_id"]
        self.image_kept.inc(result.image_token_counts(token)[2])

    def scrape(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
