"""Reference generation in PyTorch on our modules: greedy decoding with a KV cache, FastV and FasterVLM.

This is the yardstick the exported graphs and the runtime are checked against, so it is written
for clarity, and follows docs/methods.md step by step:
  FasterVLM  rank patches by the [CLS] row of the feature layer, keep the top ones in raster order,
             project only those; the shortened prompt gets contiguous position ids.
  FastV      run layers [0, K) on the whole prompt, rank image tokens by the last token's head-mean
             attention at layer K-1, run layers [K, L) on the kept tokens with their original
             position ids. Layers < K cache every prompt token, layers >= K only the kept ones; a token
             decoded at step t has position N_prompt + t everywhere. Pruning happens once, at prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..errors import MllmEdgeError
from ..pruning import PruningConfig, fastv_select, gather_tokens, keep_count
from .llava import Llava


class ReferenceCache:
    """The reference's KV cache, in torch: per layer one preallocated [1 + max_len, B, G, D] buffer for
    keys and one for values (the runtime's, in numpy or device memory, is runtime.cache).

    Row 0 is the null row (Decoder.run_layers). A layer group's past is the prefix view
    [:1 + length]; new rows are written in place into [1 + length:1 + length + S] (gpt-fast style),
    so a step copies nothing else.
    """

    def __init__(self, llava: Llava, batch: int, max_len: int, dtype: torch.dtype, device=None):
        t = llava.spec.text
        shape = (1 + max_len, batch, t.num_kv_heads, t.head_dim)
        self.max_len = max_len
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(t.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(t.num_layers)]
        self.lengths = [0] * t.num_layers

    def past(self, start: int, stop: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (self.keys[i][: 1 + self.lengths[i]], self.values[i][: 1 + self.lengths[i]])
            for i in range(start, stop)
        ]

    def append(self, start: int, new_keys: list[torch.Tensor], new_values: list[torch.Tensor]) -> None:
        for i, (k, v) in enumerate(zip(new_keys, new_values), start=start):
            n, s = self.lengths[i], k.shape[0]
            if n + s > self.max_len:
                raise MllmEdgeError(f"context of {n + s} tokens exceeds the cache's {self.max_len}")
            self.keys[i][1 + n : 1 + n + s] = k
            self.values[i][1 + n : 1 + n + s] = v
            self.lengths[i] = n + s


@dataclass
class Prefill:
    logits: torch.Tensor  # [B, V] at the last prompt token
    prompt_length: int  # tokens that entered the LLM (after FasterVLM): decode positions start here
    kept_vision: (
        torch.Tensor | None
    )  # [B, keep] patch indices FasterVLM kept, raster order (NeXT: [B, views, keep])
    kept_llm: torch.Tensor | None  # [B, keep] indices into the LLM's image span that FastV kept
    kept_positions: torch.Tensor | None  # [B, M] prompt positions that go on to layers >= K


@dataclass
class GenerationResult:
    token_ids: list[list[int]]
    prefill: Prefill
    steps_logits: list[torch.Tensor] = field(default_factory=list)  # [B, V] per generated token


def encode_image(llava: Llava, pixel_values: torch.Tensor, pruning: PruningConfig, image_sizes=None):
    """-> projected image embeddings [B, n, C] and FasterVLM's kept patch indices (or None).
    image_sizes: each picture's (height, width), for LLaVA-NeXT's views."""
    if pruning.fastervlm is None:
        return llava.image_embeds(pixel_values, image_sizes), None
    return llava.fastervlm_embeds(pixel_values, pruning.fastervlm.ratio, image_sizes, pruning.fastervlm.merge)


def prompt_embeddings(llava: Llava, input_ids: torch.Tensor, image_embeds: torch.Tensor, image_sizes=None):
    """Embed the prompt with the image span replaced by image_embeds.

    input_ids holds the unpruned placeholder run (as the HF processor gives it); when FasterVLM kept
    fewer tokens the run is shortened to match. Returns (embeddings [B, T, C], image_start).
    """
    start, n = llava.image_span(input_ids)
    expected = llava.unpruned_image_tokens(image_sizes)
    if n != expected:
        raise MllmEdgeError(f"the prompt holds {n} image tokens; this model puts {expected}")
    text = llava.decoder.embed(input_ids)
    embeds = torch.cat((text[:, :start], image_embeds.to(text.dtype), text[:, start + n :]), dim=1)
    return embeds, start


@torch.inference_mode()
def prefill(
    llava: Llava,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    pruning: PruningConfig,
    cache: ReferenceCache,
    image_sizes=None,
) -> Prefill:
    pruning.validate(llava.spec.text.num_layers, llava.spec.vision.has_cls, llava.spec.max_views)
    decoder = llava.decoder
    num_layers = llava.spec.text.num_layers
    image_embeds, kept_vision = encode_image(llava, pixel_values, pruning, image_sizes)
    hidden, image_start = prompt_embeddings(llava, input_ids, image_embeds, image_sizes)
    b, t, _ = hidden.shape
    positions = torch.arange(t, device=hidden.device).expand(b, t)
    kept_llm = kept_positions = None
    split = pruning.split_layer
    if pruning.fastv:
        out = decoder.run_layers(hidden, positions, 0, split, row_layer=split - 1)
        cache.append(0, out.new_keys, out.new_values)
        n_image = image_embeds.shape[1]
        keep = keep_count(n_image, pruning.fastv.ratio)  # of the span as it entered the LLM
        kept_llm, kept_positions = fastv_select(out.last_row, image_start, n_image, keep)
        hidden = gather_tokens(out.hidden, kept_positions)
        positions = gather_tokens(positions, kept_positions)  # original ids: gaps stay
    out = decoder.run_layers(hidden, positions, split, num_layers)
    cache.append(split, out.new_keys, out.new_values)
    logits = decoder.logits(out.hidden[:, -1])
    return Prefill(logits.float(), t, kept_vision, kept_llm, kept_positions)


@torch.inference_mode()
def decode_step(
    llava: Llava, token_ids: torch.Tensor, position: int, cache: ReferenceCache, split: int
) -> torch.Tensor:
    """One new token per sequence: token_ids [B] at `position` -> logits [B, V].

    The layer groups [0, split) and [split, L) read their own cache lengths.
    """
    decoder = llava.decoder
    hidden = decoder.embed(token_ids[:, None])
    positions = torch.full_like(token_ids[:, None], position)
    for start, stop in ((0, split), (split, llava.spec.text.num_layers)):
        if start == stop:
            continue
        out = decoder.run_layers(hidden, positions, start, stop, past=cache.past(start, stop))
        cache.append(start, out.new_keys, out.new_values)
        hidden = out.hidden
    return decoder.logits(hidden[:, -1]).float()


def generate_steps(
    llava: Llava,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    pruning: PruningConfig = PruningConfig(),
    max_new_tokens: int = 16,
    max_context: int | None = None,
    image_sizes=None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, Prefill]]:
    """Yield (next token ids [B], logits [B, V], prefill info) greedily, one step at a time."""
    if max_new_tokens < 1:
        raise MllmEdgeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    grown = llava.most_entering_tokens(pruning.fastervlm, image_sizes) - llava.unpruned_image_tokens(
        image_sizes
    )
    max_len = max_context or input_ids.shape[1] + max(grown, 0) + max_new_tokens
    dtype = next(llava.parameters()).dtype
    cache = ReferenceCache(llava, input_ids.shape[0], max_len, dtype, input_ids.device)
    first = prefill(llava, input_ids, pixel_values, pruning, cache, image_sizes)
    split = pruning.split_layer
    logits = first.logits
    for step in range(max_new_tokens):
        token = logits.argmax(dim=-1)
        yield token, logits, first
        if step + 1 < max_new_tokens:
            logits = decode_step(llava, token, first.prompt_length + step, cache, split)


def generate(
    llava: Llava,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    pruning: PruningConfig = PruningConfig(),
    max_new_tokens: int = 16,
    eos_token_id: int | list[int] | None = None,
    image_sizes=None,
) -> GenerationResult:
    """Greedy generation; a sequence stops at an end token (included), the batch when all have.

    eos_token_id may be one id or several, as Hugging Face generation configs give it. image_sizes:
    each picture's (height, width), which LLaVA-NeXT's views need (the processor's `image_sizes`).
    """
    stop = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    tokens: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    done = [False] * len(tokens)
    all_logits, first = [], None
    for token, logits, first in generate_steps(  # noqa: B007 (first is read after the loop)
        llava, input_ids, pixel_values, pruning, max_new_tokens, image_sizes=image_sizes
    ):
        all_logits.append(logits)
        for i, tok in enumerate(token.tolist()):
            if not done[i]:
                tokens[i].append(tok)
                done[i] = tok in stop
        if all(done):
            break
    return GenerationResult(tokens, first, all_logits)
