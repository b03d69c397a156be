"""`mllm-edge serve`: OpenAI's chat-completions API over a bundle (the `serve` extra: FastAPI, uvicorn).

requests.py  OpenAI requests -> the pipeline's inputs (images decoded, limits), errors as OpenAI's
worker.py    one thread owns the pipeline; a bounded queue in front; cancellation per request
metrics.py   Prometheus figures (with --metrics)
app.py       the FastAPI routes: chat completions (and their server-sent events), models, health, metrics
replicas.py  the same app in N replicas on Ray Serve (the ray extra)
"""
