"""Scale-out on Ray Serve: the same app (create_app) in N replicas, each with its own pipeline, its
worker and its queue; Ray's HTTP proxy spreads requests over them. `mllm-edge serve --replicas N`.

One replica per GPU (or per slot of CPU cores): a replica takes at most `max_ongoing_requests`
(its worker's one and its queue), and Ray's proxy holds back what none can take.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from .app import Settings


def application(
    bundle: Path,
    settings: Settings,
    replicas: int,
    backend: str = "auto",
    device: str = "cpu",
    cpus_per_replica: float = 1.0,
):
    """The Ray Serve application: `serve.run(application(...))`."""
    from ray import serve

    name = Path(bundle).resolve().name

    def build():  # run in each replica as it starts: Ray counts it ready once its pipeline is loaded
        from ..runtime.pipeline import Pipeline
        from .app import create_app

        return create_app(Pipeline.load(bundle, backend, device), settings, name=name)

    replica = serve.ingress(build)(type("MllmEdgeReplica", (), {}))
    deployment = serve.deployment(
        replica,
        name="mllm-edge",
        num_replicas=replicas,
        max_ongoing_requests=1 + settings.max_queue,
        graceful_shutdown_timeout_s=settings.shutdown_timeout_s,  # then Ray stops the replica
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": 1 if device == "cuda" else 0},
    )
    return deployment.bind()


def run(app, host: str, port: int, num_cpus: int | None = None, blocking: bool = True):
    """Start Ray on this machine (or join RAY_ADDRESS's cluster) and serve `app` at host:port."""
    import ray
    from ray import serve

    stop = threading.Event()  # set by SIGTERM or Ctrl-C, even while Ray or the replicas start

    def catch_signals():
        if blocking:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: stop.set())

    catch_signals()
    ray.init(num_cpus=num_cpus, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    catch_signals()  # ours again: ray.init installs its own, which kill the process
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(app, blocking=False, route_prefix="/")
    if not blocking:
        return handle
    while not stop.wait(1.0):
        pass
    serve.shutdown()  # the replicas stop, then Ray
    ray.shutdown()
    return None
