"""The graphs of a bundle joined with a KV cache, written once: encode_image, prefill, decode_step.

  encode_image pixel_values -> vision [-> pack: LLaVA-NeXT's views packed into one span]
  prefill      the image span -> embed -> [llm_head -> prune ->] llm_tail -> first logits
  decode_step  embed(one id) -> [llm_head ->] llm_tail -> next logits, each group appending to its cache

Any backend's engines (runtime.backends; export's torch modules behind the same interface for the
reference samples) and any cache with runtime.cache's interface run through this one chain: the
Pipeline, export verification (with its own concatenating cache, an independent check of the graphs'
cache contract) and the tests. Observers see every graph call's inputs and outputs (calibration
records activations this way). Batch-first numpy in and out; imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from ..errors import MllmEdgeError
from ..graphs import EMBED, HEAD, LLM_GRAPHS, LLM_HEAD, LLM_TAIL, NO_IMAGE, PACK, PRUNE, TAIL, VISION

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
    reused: int = 0  # prompt tokens whose K/V came from the cache (layers < K with FastV)
    reused_tail: int = 0  # of those, tokens the layers >= K reused too (all of them without FastV)


@dataclass
class History:
    """What the cache holds, so that a follow-up prompt reuses its exact prefix (batch 1)."""

    ids: list[int] = field(default_factory=list)  # every token the layers < K (all, without FastV) hold
    image: object = None  # the caller's key for the picture those ids hold, or None
    # FastV: each held token's hidden state entering layer K, and what the layers >= K hold
    hidden: np.ndarray | None = None  # [1, capacity, C], filled up to len(ids)
    tail_positions: list[int] = field(default_factory=list)
    kept_image: np.ndarray | None = None

    def hold(self, start: int, hidden: np.ndarray) -> np.ndarray:
        """Hidden states [1, S, C] of the tokens from `start` on -> those of every token up to them."""
        end = start + hidden.shape[1]
        if self.hidden is None or self.hidden.shape[1] < end:  # grown by doubling: decode appends one
            grown = np.zeros(
                (1, max(end, 2 * (0 if self.hidden is None else self.hidden.shape[1]), 64), hidden.shape[2]),
                hidden.dtype,
            )
            if self.hidden is not None:
                grown[:, :start] = self.hidden[:, :start]
            self.hidden = grown
        self.hidden[:, start:end] = hidden
        return self.hidden[:, :end]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class Chain:
    def __init__(
        self,
        engines: Mapping,
        cache,
        split: int,
        observers: list[Observer] | None = None,
        anyres=None,
        merge: str = "spatial",
    ):
        """engines: graph name -> anything with run(inputs, outputs=None) -> the outputs not given.
        split: FastV's layer K (0 without FastV: no llm_head, no prune). anyres: LLaVA-NeXT's
        geometry (runtime.anyres.AnyRes), whose bundles pack the views and prune spans of any
        length; merge: how its FasterVLM tokens go into the span (pruning.MERGES)."""
        self.engines, self.cache, self.split, self.anyres = engines, cache, split, anyres
        self.merge = merge
        self.observers: list[Observer] = [] if observers is None else observers
        self._no_image = None  # decode's image_embeds: one zero row of the prompt's dtype and width
        self.history = History()

    def run(self, graph: str, inputs: dict, outputs: dict | None = None) -> dict:
        returned = self.engines[graph].run(inputs, outputs)
        for observe in self.observers:
            observe(graph, inputs, {**(outputs or {}), **returned})
        return returned

    def encode_image(self, pixel_values: np.ndarray, image_size: tuple[int, int] | None = None) -> dict:
        """-> image_embeds [B, n, C] as the span enters the LLM (+ kept_patches with FasterVLM).

        LLaVA-NeXT: pixel_values [V, 3, S, S] are one picture's views (anyres.preprocess_views) and
        image_size its (height, width); the vision graph runs on the views (FasterVLM per view:
        kept_patches [V, keep]) and the pack graph packs them (anyres.pack_index, or FasterVLM's
        merge: anyres.merge_index) into image_embeds [1, n, C]."""
        vision = self.run(VISION, {"pixel_values": pixel_values})
        if self.anyres is None:
            return vision
        if image_size is None:
            raise MllmEdgeError("a LLaVA-NeXT picture needs its (height, width) to pack its views")
        height, width = image_size
        kept = vision.get("kept_patches")
        index = (
            self.anyres.pack_index(height, width)
            if kept is None
            else self.anyres.merge_index(kept, height, width, self.merge)
        )
        packed = self.run(PACK, {"image_embeds": vision["image_embeds"], "pack_index": index})
        return {**vision, "image_embeds": packed["packed_image_embeds"]}

    def _llm(self, graph: str, hidden: np.ndarray, positions: np.ndarray) -> dict:
        """One LLM graph over hidden [B, S, C] at positions [B, S], reading and extending its cache group."""
        definition = LLM_GRAPHS[graph]
        count = hidden.shape[1]
        inputs = {
            definition.inputs[0].name: np.ascontiguousarray(hidden),
            "position_ids": np.ascontiguousarray(positions),
            **self.cache.past(definition.cache),
        }
        out = self.run(graph, inputs, self.cache.slots(definition.cache, count))
        self.cache.advance(definition.cache, count, out)
        return out

    def prefill(
        self, ids: np.ndarray, image_embeds: np.ndarray, image_start: int, reuse: bool = False, image=None
    ) -> Prefilled:
        """ids [B, T] with the image run as long as image_embeds [B, n, C] (place_image_tokens); with
        no image in the ids, image_start NO_IMAGE and image_embeds any zero rows of the width -> the
        last token's logits.

        reuse (batch 1): keep what the cache holds of the longest exact prefix of ids (the same
        tokens and, where the image run is inside it, the same `image` key), and run the rest only.
        Layers < K always reuse it; with FastV the layers >= K hold only the kept tokens, so they
        reuse it only when this prompt keeps the same image tokens (the selection depends on the
        last prompt token), else they run again from the held hidden states entering layer K."""
        b, t = ids.shape
        n = image_embeds.shape[1]
        has_image = image_start != NO_IMAGE
        past = self._reusable(ids, image_start, n, image) if reuse and b == 1 else 0
        self._no_image = np.zeros((b, 1, image_embeds.shape[2]), image_embeds.dtype)
        if has_image and image_start >= past:
            chunk_embeds, chunk_start = image_embeds, image_start - past
        else:  # text only (or the image is in the reused part): a run starting after the last id
            # places nothing, and keeps the prefill's shapes (NO_IMAGE is for one row only)
            chunk_embeds, chunk_start = np.zeros_like(image_embeds), t - past
        hidden = self.run(
            EMBED,
            {
                "input_ids": np.ascontiguousarray(ids[:, past:]),
                "image_embeds": chunk_embeds,
                "image_start": np.array(chunk_start, np.int64),
            },
        )["inputs_embeds"]
        positions = np.ascontiguousarray(np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)))
        # Held aside until the cache holds this prompt: a call that fails half-way leaves an empty
        # history, so the next prompt prefills from scratch rather than over a cache out of step.
        history, self.history = self.history, History()
        kept_image, tail_past = None, past
        if self.split:
            self.cache.truncate(HEAD, past)
            head = self._llm(LLM_HEAD, hidden, positions[:, past:])
            if b == 1:  # held for a follow-up
                entering = history.hold(past, head["hidden_states"])
            else:
                entering = head["hidden_states"]
            if has_image:
                span = (  # LLaVA-NeXT's prune graph takes the span's positions, as long as it is
                    {"image_positions": np.arange(image_start, image_start + n, dtype=np.int64)}
                    if self.anyres is not None
                    else {"image_start": np.array(image_start, np.int64)}
                )
                pruned = self.run(
                    PRUNE,
                    {
                        "hidden_states": np.ascontiguousarray(entering),
                        "last_row": head["last_row"],
                        "position_ids": positions,
                        **span,
                    },
                )
                hidden, kept_positions, kept_image = (
                    pruned["kept_hidden_states"],
                    pruned["kept_position_ids"],
                    pruned["kept_image"],
                )
            else:
                hidden, kept_positions = entering, positions
            same_kept = (kept_image is None and history.kept_image is None) or (
                kept_image is not None
                and history.kept_image is not None
                and np.array_equal(kept_image, history.kept_image)
            )
            # a tail row is still right if the kept tokens up to it are: all of the prefix when this
            # prompt keeps the same image tokens, else the text before the image
            limit = past if same_kept else min(past, image_start) if has_image else 0
            tail_past = sum(1 for p in history.tail_positions if p < limit)
            self.cache.truncate(TAIL, tail_past)
            logits = self._llm(LLM_TAIL, hidden[:, tail_past:], kept_positions[:, tail_past:])["logits"]
            history.tail_positions = kept_positions[0].tolist()
            history.kept_image = kept_image
        else:
            self.cache.truncate(TAIL, past)
            logits = self._llm(LLM_TAIL, hidden, positions[:, past:])["logits"]
        history.ids = ids[0].tolist() if b == 1 else []
        history.image = image if has_image else None
        self.history = history
        return Prefilled(logits, t, kept_image, past, tail_past)

    def _reusable(self, ids: np.ndarray, image_start: int, n: int, image) -> int:
        """How many leading tokens of ids the cache holds as they are: never part of an image run,
        never the image of another picture, and never all of them (the last one gives the logits)."""
        held = self.history
        past = min(common_prefix(held.ids, ids[0].tolist()), self.cache.lengths[HEAD if self.split else TAIL])
        if image_start != NO_IMAGE and past > image_start:
            if held.image is None or image is None or held.image != image or past < image_start + n:
                past = image_start
        return min(past, ids.shape[1] - 1)

    def decode_step(self, tokens: np.ndarray, position: int) -> np.ndarray:
        """tokens [B] at `position` (the unpruned prompt length plus the step: FastV keeps original
        positions) -> logits [B, V]."""
        b = tokens.shape[0]
        inputs = {"input_ids": tokens.reshape(b, 1).astype(np.int64), "image_embeds": self._no_image}
        hidden = self.run(EMBED, {**inputs, "image_start": _NO_IMAGE_START})["inputs_embeds"]
        positions = np.full((b, 1), position, np.int64)
        held, self.history = self.history, History()  # as in prefill: back once both groups hold the step
        if self.split:
            hidden = self._llm(LLM_HEAD, hidden, positions)["hidden_states"]
            if b == 1:
                held.hold(len(held.ids), hidden)
        logits = self._llm(LLM_TAIL, hidden, positions)["logits"]
        if self.split:
            held.tail_positions.append(position)
        if b == 1:
            held.ids.append(int(tokens[0]))
        self.history = held
        return logits
