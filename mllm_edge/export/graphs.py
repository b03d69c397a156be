"""The graphs of a bundle as torch modules with flat, named tensor inputs and outputs.

Each wrapper holds a slice of one loaded `Llava` and nothing else, so every weight ends up in
exactly one graph (docs/design.md, "The graphs of a bundle"). Tensor names come from the graphs'
definitions (`mllm_edge.graphs`), the contract with the runtime and the TensorRT engines.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import graphs as g
from ..models.llava import Llava
from ..pruning import (
    PruningConfig,
    fastervlm_select,
    fastv_select,
    fastv_select_span,
    gather_tokens,
    keep_count,
    keep_table,
)


def _pairs(flat: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(flat[0::2], flat[1::2]))


def _interleave(keys: list[torch.Tensor], values: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t for kv in zip(keys, values) for t in kv]


def _names(module: nn.Module, graph: g.GraphDef, layers: range = range(0)) -> None:
    module.graph, module.input_names, module.output_names = (
        graph,
        graph.input_names(layers),
        graph.output_names(layers),
    )


class VisionGraph(nn.Module):
    """pixel_values [B, 3, H, W] -> image_embeds [B, n, C]; with FasterVLM also kept_patches [B, n]
    (raster order). LLaVA-NeXT: B is one picture's views, FasterVLM ranking each by its own [CLS] row."""

    def __init__(self, llava: Llava, keep: int | None):
        super().__init__()
        self.vision, self.projector, self.keep = llava.vision, llava.projector, keep
        anyres = llava.spec.max_views > 1
        _names(self, g.bundle_graphs(fastv=False, fastervlm=keep is not None, anyres=anyres)[g.VISION])

    def forward(self, pixel_values: torch.Tensor):
        if self.keep is None:
            features, _ = self.vision(pixel_values)
            return self.projector(features)
        features, cls_row = self.vision(pixel_values, want_cls_row=True)
        kept = fastervlm_select(cls_row, self.keep)
        # Only the kept patches go through the projector (per token, so this equals project-then-select).
        return self.projector(gather_tokens(features, kept)), kept


class PackGraph(nn.Module):
    """LLaVA-NeXT: image_embeds [V, m, C] of one picture's views and pack_index [n] -> its packed
    span [1, n, C]: rows of the views' embeddings, index V x m the image_newline vector."""

    def __init__(self, llava: Llava):
        super().__init__()
        self.image_newline = llava.image_newline
        _names(self, g.PACK_GRAPH)

    def forward(self, image_embeds: torch.Tensor, pack_index: torch.Tensor):
        rows = image_embeds.reshape(-1, image_embeds.shape[-1])
        rows = torch.cat((rows, self.image_newline.to(rows.dtype)[None]))
        return rows[pack_index][None]


class EmbedGraph(nn.Module):
    """input_ids [B, S], image_embeds [B, n, C], image_start [] -> inputs_embeds [B, S, C].

    Slots image_start .. image_start + n - 1 take the image embeddings, the rest the token table.
    Written with Range/Gather/Where, so no shape depends on data; pass NO_IMAGE and one zero row
    of image_embeds when the ids hold no image (decode).
    """

    def __init__(self, llava: Llava):
        super().__init__()
        self.embed_tokens = llava.decoder.embed_tokens
        _names(self, g.EMBED_GRAPH)

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
        _names(self, g.LLM_HEAD_GRAPH, range(0, k))

    def forward(self, inputs_embeds, position_ids, *past):
        out = self.decoder.run_layers(
            inputs_embeds, position_ids, 0, self.k, _pairs(past), row_layer=self.k - 1
        )
        return (out.hidden, out.last_row, *_interleave(out.new_keys, out.new_values))


class PruneGraph(nn.Module):
    """FastV's selection at layer K: TopK over the image span, back into order, gather. No weights."""

    def __init__(self, num_image: int, keep: int):
        super().__init__()
        self.num_image, self.keep = num_image, keep
        _names(self, g.PRUNE_GRAPH)

    def forward(self, hidden_states, last_row, position_ids, image_start):
        kept_image, kept_positions = fastv_select(last_row, image_start, self.num_image, self.keep)
        return (
            gather_tokens(hidden_states, kept_positions),
            gather_tokens(position_ids, kept_positions),
            kept_image,
        )


class PruneSpanGraph(nn.Module):
    """LLaVA-NeXT's FastV selection: PruneGraph's over an image span of any length up to
    max_span, keeping keep_count(n, R) of its n tokens (fastv_select_span). No weights: the
    keep counts are a small constant table."""

    def __init__(self, max_span: int, ratio: float):
        super().__init__()
        table = keep_table(max_span, ratio)
        self.register_buffer("keep_table", torch.tensor(table), persistent=False)
        self.keep_max = table[-1]
        _names(self, g.PRUNE_SPAN_GRAPH)

    def forward(self, hidden_states, last_row, position_ids, image_positions):
        kept_image, kept_positions = fastv_select_span(
            last_row, image_positions, self.keep_table, self.keep_max
        )
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
        _names(self, g.LLM_TAIL_GRAPH, range(start, llava.spec.text.num_layers))

    def forward(self, hidden_states, position_ids, *past):
        out = self.decoder.run_layers(
            hidden_states, position_ids, self.start, self.decoder.spec.num_layers, _pairs(past)
        )
        return (self.decoder.logits(out.hidden[:, -1]).float(), *_interleave(out.new_keys, out.new_values))


def graph_modules(llava: Llava, pruning: PruningConfig) -> dict[str, nn.Module]:
    """The torch module of each graph the bundle holds (mllm_edge.graphs.bundle_graphs), in order."""
    spec = llava.spec
    anyres = spec.max_views > 1
    if anyres:  # FasterVLM per view; FastV over a span of any length up to what the vision side gives
        patches = spec.vision.grid**2
        vision_keep = keep_count(patches, pruning.fastervlm.ratio) if pruning.fastervlm else patches
        max_span = spec.most_entering_tokens(pruning.fastervlm)
        prune = lambda: PruneSpanGraph(max_span, pruning.fastv.ratio)  # noqa: E731
    else:
        vision_keep, llm_keep = pruning.keep_counts(spec.num_image_tokens)
        prune = lambda: PruneGraph(vision_keep, llm_keep)  # noqa: E731
    build = {
        g.VISION: lambda: VisionGraph(llava, vision_keep if pruning.fastervlm else None),
        g.PACK: lambda: PackGraph(llava),
        g.EMBED: lambda: EmbedGraph(llava),
        g.LLM_HEAD: lambda: LlmHeadGraph(llava, pruning.split_layer),
        g.PRUNE: prune,
        g.LLM_TAIL: lambda: LlmTailGraph(llava, pruning.split_layer),
    }
    names = g.bundle_graphs(bool(pruning.fastv), bool(pruning.fastervlm), anyres)
    return {name: build[name]().eval() for name in names}
