"""The interfaces every backend implements, in the spirit of Polygraphy's runners.

An `Engine` runs one graph with named numpy inputs, used in place (C-contiguous), and optional
preallocated output buffers that it writes into directly. That is how a graph's new K/V rows land in
their cache slot without a copy; outputs not given are allocated by the engine and returned.

A `Backend` is opened for a bundle and owns what running it takes: one engine per graph, the device
memory, the KV cache's home and the largest context its engines take; `close()` gives it all back.
The chain (runtime.chain) and the Pipeline are written once against these two interfaces.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Engine(Protocol):
    name: str
    input_names: list[str]
    output_names: list[str]

    def run(
        self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Run once; returns every output not passed in `outputs` (those are written in place)."""
        ...

    def close(self) -> None:
        """Release the graph (session, engine, staging buffers); the engine is not run again."""
        ...


class Backend(Protocol):
    name: str  # "onnxruntime" | "tensorrt"
    device: str  # "cpu" | "cuda"
    engines: dict[str, Engine]  # graph name -> its engine
    max_context: int  # tokens the engines take: the bundle's, or what the TensorRT engines were built for
    # whether the LLM engines take several new tokens after a non-empty past (a follow-up prompt's
    # reused prefix); otherwise every prompt prefills from an empty cache
    extends_cache: bool

    @staticmethod
    def files_read(manifest) -> list[str]:
        """The bundle files (relative paths) this backend reads: the ones checked when it opens."""
        ...

    def new_cache(self, num_layers: int, split: int, kv_heads: int, head_dim: int, dtype):
        """A KV cache of max_context tokens where this backend's engines read it (runtime.cache's interface)."""
        ...

    def close(self) -> None:
        """Close every engine and free the device memory this backend allocated."""
        ...


class BackendResources:
    """What every backend holds and gives back alike: its engines and the caches it made."""

    def __init__(self):
        self.engines: dict[str, Engine] = {}
        self.caches: list = []

    def _keep(self, cache):
        self.caches.append(cache)
        return cache

    def close(self) -> None:
        for cache in self.caches:
            cache.close()
        for engine in self.engines.values():
            engine.close()
        self.caches = []
        self.engines.clear()  # in place: the chain holds this dict
