"""The graphs of a bundle as torch modules with flat, named tensor inputs and outputs.

Each wrapper holds a slice of one loaded `Llava` and nothing else, so every weight ends up in
exactly one graph (ARCHITECTURE.md, "The graphs in a bundle"). Tensor names are the contract with
the runtime and the TensorRT engines; they are spelled here once.

  vision    pixel_values -> image_embeds (+ kept_patches: FasterVLM's top-k inside)
  embed     input_ids, image_embeds, image_start -> inputs_embeds
  llm_head  inputs_embeds, position_ids, past of layers [0, K) -> hidden_states, last_row, new K/V
  prune     hidden_states, last_row, position_ids, image_start -> kept hidden, kept position ids, kept_image
  llm_tail  hidden_states, position_ids, past of layers [K, L) -> logits (last token), new K/V
"""

from __future__ import annotations

import torch
from torch import nn

from ..manifest import NO_IMAGE  # noqa: F401  (part of the embed graph's contract)
from ..models.llava import Llava
from ..pruning import fastervlm_select, fastv_select, gather_tokens


def past_names(start: int, stop: int) -> list[str]:
    return [name for i in range(start, stop) for name in (f"past_key.{i}", f"past_value.{i}")]


def new_names(start: int, stop: int) -> list[str]:
    return [name for i in range(start, stop) for name in (f"new_key.{i}", f"new_value.{i}")]


def _pairs(flat: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(flat[0::2], flat[1::2]))


def _interleave(keys: list[torch.Tensor], values: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t for kv in zip(keys, values) for t in kv]


class VisionGraph(nn.Module):
    """pixel_values [B, 3, H, W] -> image_embeds [B, n, C]; with FasterVLM also kept_patches [B, n] (raster order)."""

    input_names = ["pixel_values"]

    def __init__(self, llava: Llava, keep: int | None):
        super().__init__()
        self.vision, self.projector, self.keep = llava.vision, llava.projector, keep

    @property
    def output_names(self) -> list[str]:
        return ["image_embeds"] + (["kept_patches"] if self.keep is not None else [])

    def forward(self, pixel_values: torch.Tensor):
        if self.keep is None:
            features, _ = self.vision(pixel_values)
            return self.projector(features)
        features, cls_row = self.vision(pixel_values, want_cls_row=True)
        kept = fastervlm_select(cls_row, self.keep)
        # Only the kept patches go through the projector (per token, so this equals project-then-select).
        return self.projector(gather_tokens(features, kept)), kept


class EmbedGraph(nn.Module):
    """input_ids [B, S], image_embeds [B, n, C], image_start [] -> inputs_embeds [B, S, C].

    Slots image_start .. image_start + n - 1 take the image embeddings, the rest the token table.
    Written with Range/Gather/Where, so no shape depends on data; pass NO_IMAGE and one zero row
    of image_embeds when the ids hold no image (decode).
    """

    input_names = ["input_ids", "image_embeds", "image_start"]
    output_names = ["inputs_embeds"]

    def __init__(self, llava: Llava):
        super().__init__()
        self.embed_tokens = llava.decoder.embed_tokens

    def forward(self, input_ids: torch.Tensor, image_embeds: torch.Tensor, image_start: torch.Tensor):
        text = self.embed_tokens(input_ids)
        slots = torch.arange(input_ids.shape[1], device=input_ids.device)
        n = image_embeds.shape[1]
        image = image_embeds[:, (slots - image_start).clamp(0, n - 1)].to(text.dtype)
        is_image = (slots >= image_start) & (slots < image_start + n)
        return torch.where(is_image[None, :, None], image, text)


class LlmHeadGraph(nn.Module):
    """Layers [0, K) on every prompt token; also the last token's head-mean attention row at layer K-1."""

    def __init__(self, llava: Llava, k: int):
        super().__init__()
        self.decoder, self.k = llava.decoder, k
        self.input_names = ["inputs_embeds", "position_ids"] + past_names(0, k)
        self.output_names = ["hidden_states", "last_row"] + new_names(0, k)

    def forward(self, inputs_embeds, position_ids, *past):
        out = self.decoder.run_layers(
            inputs_embeds, position_ids, 0, self.k, _pairs(past), row_layer=self.k - 1
        )
        return (out.hidden, out.last_row, *_interleave(out.new_keys, out.new_values))


class PruneGraph(nn.Module):
    """FastV's selection at layer K: TopK over the image span, back into order, gather. No weights."""

    input_names = ["hidden_states", "last_row", "position_ids", "image_start"]
    output_names = ["kept_hidden_states", "kept_position_ids", "kept_image"]

    def __init__(self, num_image: int, keep: int):
        super().__init__()
        self.num_image, self.keep = num_image, keep

    def forward(self, hidden_states, last_row, position_ids, image_start):
        kept_image, kept_positions = fastv_select(last_row, image_start, self.num_image, self.keep)
        return (
            gather_tokens(hidden_states, kept_positions),
            gather_tokens(position_ids, kept_positions),
            kept_image,
        )


class LlmTailGraph(nn.Module):
    """Layers [start, L), final norm and LM head on the last token only: logits [B, V] in fp32."""

    def __init__(self, llava: Llava, start: int):
        super().__init__()
        self.decoder, self.start = llava.decoder, start
        stop = llava.spec.text.num_layers
        self.input_names = ["hidden_states", "position_ids"] + past_names(start, stop)
        self.output_names = ["logits"] + new_names(start, stop)

    def forward(self, hidden_states, position_ids, *past):
        out = self.decoder.run_layers(
            hidden_states, position_ids, self.start, self.decoder.spec.num_layers, _pairs(past)
        )
        return (self.decoder.logits(out.hidden[:, -1]).float(), *_interleave(out.new_keys, out.new_values))
