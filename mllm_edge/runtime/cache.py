"""The KV cache: per layer one preallocated [1 + max_len, B, G, D] buffer for keys and one for values.

Sequence-first, so the past prefix [:P] and the slot [P:P+S] of a layer are contiguous for any
batch size: a graph reads its past in place and its new K/V outputs are bound straight into the
slot, so a step writes S rows per layer and copies nothing else (ARCHITECTURE.md, "The KV cache";
README's design notes say why sequence-first). The two layer groups keep their own lengths: with
FastV, layers < K hold the whole prompt, layers >= K the kept tokens. Row 0 is the null row the
graphs expect before the past (never attended; it keeps the past from ever being empty).
"""

from __future__ import annotations

import numpy as np

from ..errors import MllmEdgeError


class KVCache:
    def __init__(
        self, num_layers: int, split: int, max_len: int, kv_heads: int, head_dim: int, dtype, batch: int = 1
    ):
        shape = (1 + max_len, batch, kv_heads, head_dim)
        # np.zeros maps pages lazily, so an unused tail of the context costs no memory
        self.keys = [np.zeros(shape, dtype) for _ in range(num_layers)]
        self.values = [np.zeros(shape, dtype) for _ in range(num_layers)]
        self.max_len, self.split, self.num_layers = max_len, split, num_layers
        self.lengths = {"head": 0, "tail": 0}  # tokens held by layers [0, split) and [split, L)

    def group(self, name: str) -> range:
        return range(0, self.split) if name == "head" else range(self.split, self.num_layers)

    def past(self, name: str) -> dict[str, np.ndarray]:
        """The past K/V inputs of a layer group: views of the null row and what it holds."""
        n = 1 + self.lengths[name]
        views = {}
        for i in self.group(name):
            views[f"past_key.{i}"] = self.keys[i][:n]
            views[f"past_value.{i}"] = self.values[i][:n]
        return views

    def slots(self, name: str, count: int) -> dict[str, np.ndarray]:
        """Where a group's next `count` new K/V rows go: bind these as the graph's outputs."""
        if self.lengths[name] + count > self.max_len:
            raise MllmEdgeError(f"the context would exceed the bundle's max context of {self.max_len} tokens")
        n = 1 + self.lengths[name]
        views = {}
        for i in self.group(name):
            views[f"new_key.{i}"] = self.keys[i][n : n + count]
            views[f"new_value.{i}"] = self.values[i][n : n + count]
        return views

    def advance(self, name: str, count: int) -> None:
        self.lengths[name] += count

    def reset(self) -> None:
        self.lengths = {"head": 0, "tail": 0}
