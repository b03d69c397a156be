"""The KV cache: one interface, with the bookkeeping every cache shares; the host cache.

Per layer one preallocated [1 + max_len, B, G, D] buffer for keys and one for values. Sequence-first,
so the past prefix [:1+P] and the slot [1+P : 1+P+S] of a layer are contiguous for any batch size: a
graph reads its past in place and its new K/V outputs are bound straight into the slot, so a step
writes S rows per layer and copies nothing else (docs/design.md, "The KV cache"). The two layer
groups keep their own lengths: with FastV, layers < K hold the whole prompt, layers >= K the kept
tokens. Row 0 is the null row the graphs expect before the past (never attended; it keeps the past
from ever being empty).

A step with a cache, as runtime.chain runs it:
    outputs = engine.run({..., **cache.past(group)}, cache.slots(group, count))
    cache.advance(group, count, outputs)
`slots` says where the new rows go (bind them as the graph's outputs); a cache that takes the rows
from the returned outputs instead gives no slots and reads them in `advance` (verification's).
"""

from __future__ import annotations

import numpy as np

from ..errors import MllmEdgeError
from ..graphs import HEAD, TAIL, layer_group

KINDS = ("key", "value")


class CacheBookkeeping:
    """What every cache keeps the same way: the layer groups, their lengths, the names, the limit.

    Subclasses say how a layer's rows are viewed: `_view(kind, layer, first, rows)`.
    """

    def __init__(self, num_layers: int, split: int, max_len: int, owner: str = "bundle's"):
        self.num_layers, self.split, self.max_len = num_layers, split, max_len
        self.owner = owner  # whose max context this is, for the message: the bundle's or the engines'
        self.lengths = {HEAD: 0, TAIL: 0}  # tokens held by layers [0, split) and [split, L)

    def group(self, name: str) -> range:
        return layer_group(name, self.split, self.num_layers)

    def past(self, name: str) -> dict:
        """The past K/V inputs of a layer group: the null row and what the group holds."""
        n = 1 + self.lengths[name]
        return {f"past_{kind}.{i}": self._view(kind, i, 0, n) for i in self.group(name) for kind in KINDS}

    def slots(self, name: str, count: int) -> dict:
        """Where a group's next `count` new K/V rows go: bind these as the graph's outputs."""
        self.check_room(name, count)
        first = 1 + self.lengths[name]
        return {
            f"new_{kind}.{i}": self._view(kind, i, first, count) for i in self.group(name) for kind in KINDS
        }

    def check_room(self, name: str, count: int) -> None:
        if self.lengths[name] + count > self.max_len:
            raise MllmEdgeError(
                f"the context would exceed the {self.owner} max context of {self.max_len} tokens"
            )

    def advance(self, name: str, count: int, outputs: dict | None = None) -> None:
        """Commit a step of `count` tokens (`outputs`: what the graph returned)."""
        self.lengths[name] += count

    def reset(self) -> None:
        self.lengths = {HEAD: 0, TAIL: 0}

    def truncate(self, name: str, length: int) -> None:
        """Keep a group's first `length` tokens (a follow-up prompt's reused prefix); later rows are
        overwritten by the next step."""
        self.lengths[name] = min(self.lengths[name], length)

    def close(self) -> None:
        """Free what the cache holds (device memory); a host cache is left to the garbage collector."""

    def _view(self, kind: str, layer: int, first: int, rows: int):
        raise NotImplementedError


class KVCache(CacheBookkeeping):
    """The host cache: numpy buffers, viewed in place."""

    def __init__(
        self, num_layers: int, split: int, max_len: int, kv_heads: int, head_dim: int, dtype, batch: int = 1
    ):
        super().__init__(num_layers, split, max_len)
        shape = (1 + max_len, batch, kv_heads, head_dim)
        # np.zeros maps pages lazily, so an unused tail of the context costs no memory
        self.buffers = {kind: [np.zeros(shape, dtype) for _ in range(num_layers)] for kind in KINDS}

    def _view(self, kind: str, layer: int, first: int, rows: int) -> np.ndarray:
        return self.buffers[kind][layer][first : first + rows]
