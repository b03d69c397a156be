"""The graphs of a bundle joined with a KV cache, written once: encode_image, prefill, decode_step.

  prefill      vision's image_embeds -> embed -> [llm_head -> prune ->] llm_tail -> first logits
  decode_step  embed(one id) -> [llm_head ->] llm_tail -> next logits, each group appending to its cache

Any backend's engines (runtime.backends; export's torch modules behind the same interface for the
reference samples) and any cache with runtime.cache's interface run through this one chain: the
Pipeline, export verification (with its own concatenating cache, an independent check of the graphs'
cache contract) and the tests. Observers see every graph call's inputs and outputs (calibration
records activations this way). Batch-first numpy in and out; imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from ..errors import MllmEdgeError
from ..graphs import EMBED, GRAPHS, LLM_HEAD, LLM_TAIL, NO_IMAGE, PRUNE, VISION

_NO_IMAGE_START = np.array(NO_IMAGE, np.int64)  # decode's image_start: made once, not per token

# observer(graph, inputs, outputs): outputs holds the returned ones and those bound into the cache
Observer = Callable[[str, dict, dict], None]


def place_image_tokens(ids: np.ndarray, image_token_id: int, count: int) -> tuple[np.ndarray, int]:
    """The prompt ids as they enter the LLM: the one run of image placeholders (the processor puts one
    per image token of the unpruned model) made `count` long, the tokens the vision graph gave.

    ids [B, T], the same run in every row -> (ids [B, T - run + count], where the run starts).
    """
    is_image = ids == image_token_id
    counts = is_image.sum(axis=1)
    if counts.min() == 0:
        raise MllmEdgeError("the prompt holds no image placeholder token")
    start, run = int(np.argmax(is_image[0])), int(counts[0])
    if (counts != run).any() or not is_image[:, start : start + run].all():
        raise MllmEdgeError("image placeholder tokens must form one run at the same place in every prompt")
    placed = np.full((ids.shape[0], count), image_token_id, ids.dtype)
    return np.concatenate((ids[:, :start], placed, ids[:, start + run :]), axis=1), start


@dataclass
class Prefilled:
    logits: np.ndarray  # [B, V] at the last prompt token
    length: int  # prompt tokens entering the LLM (after FasterVLM): decode positions continue from here
    kept_image: np.ndarray | None  # [B, keep] FastV's kept indices into the image span, or None


class Chain:
    def __init__(self, engines: Mapping, cache, split: int, observers: list[Observer] | None = None):
        """engines: graph name -> anything with run(inputs, outputs=None) -> the outputs not given.
        split: FastV's layer K (0 without FastV: no llm_head, no prune)."""
        self.engines, self.cache, self.split = engines, cache, split
        self.observers: list[Observer] = [] if observers is None else observers
        self._no_image = None  # decode's image_embeds: one zero row of the prompt's dtype and width

    def run(self, graph: str, inputs: dict, outputs: dict | None = None) -> dict:
        returned = self.engines[graph].run(inputs, outputs)
        for observe in self.observers:
            observe(graph, inputs, {**(outputs or {}), **returned})
        return returned

    def encode_image(self, pixel_values: np.ndarray) -> dict:
        """-> the vision graph's outputs: image_embeds [B, n, C] (+ kept_patches with FasterVLM)."""
        return self.run(VISION, {"pixel_values": pixel_values})

    def _llm(self, graph: str, hidden: np.ndarray, positions: np.ndarray) -> dict:
        """One LLM graph over hidden [B, S, C] at positions [B, S], reading and extending its cache group."""
        definition = GRAPHS[graph]
        count = hidden.shape[1]
        inputs = {
            definition.inputs[0].name: np.ascontiguousarray(hidden),
            "position_ids": np.ascontiguousarray(positions),
            **self.cache.past(definition.cache),
        }
        out = self.run(graph, inputs, self.cache.slots(definition.cache, count))
        self.cache.advance(definition.cache, count, out)
        return out

    def prefill(self, ids: np.ndarray, image_embeds: np.ndarray, image_start: int) -> Prefilled:
        """ids [B, T] with the image run as long as image_embeds [B, n, C] (place_image_tokens), into an
        empty cache -> the last token's logits."""
        self.cache.reset()
        b, t = ids.shape
        start = np.array(image_start, np.int64)
        self._no_image = np.zeros((b, 1, image_embeds.shape[2]), image_embeds.dtype)
        hidden = self.run(EMBED, {"input_ids": ids, "image_embeds": image_embeds, "image_start": start})[
            "inputs_embeds"
        ]
        positions = np.ascontiguousarray(np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)))
        kept_image = None
        if self.split:
            head = self._llm(LLM_HEAD, hidden, positions)
            pruned = self.run(
                PRUNE,
                {
                    "hidden_states": head["hidden_states"],
                    "last_row": head["last_row"],
                    "position_ids": positions,
                    "image_start": start,
                },
            )
            hidden, positions, kept_image = (
                pruned["kept_hidden_states"],
                pruned["kept_position_ids"],
                pruned["kept_image"],
            )
        logits = self._llm(LLM_TAIL, hidden, positions)["logits"]
        return Prefilled(logits, t, kept_image)

    def decode_step(self, tokens: np.ndarray, position: int) -> np.ndarray:
        """tokens [B] at `position` (the unpruned prompt length plus the step: FastV keeps original
        positions) -> logits [B, V]."""
        b = tokens.shape[0]
        inputs = {"input_ids": tokens.reshape(b, 1).astype(np.int64), "image_embeds": self._no_image}
        hidden = self.run(EMBED, {**inputs, "image_start": _NO_IMAGE_START})["inputs_embeds"]
        positions = np.full((b, 1), position, np.int64)
        if self.split:
            hidden = self._llm(LLM_HEAD, hidden, positions)["hidden_states"]
        return self._llm(LLM_TAIL, hidden, positions)["logits"]
