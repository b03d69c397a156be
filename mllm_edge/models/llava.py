"""LLaVA as our own modules: vision tower, projector, decoder, loaded from a Hugging Face checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import MllmEdgeError
from .checkpoint import iter_weights, resolve_checkpoint
from .config import LlavaSpec, load_llava_spec
from .decoder import Decoder
from .families import model_family
from .vision import Projector, VisionTower


class Llava(nn.Module):
    def __init__(self, spec: LlavaSpec):
        super().__init__()
        self.spec = spec
        self.vision = VisionTower(spec.vision)
        self.projector = Projector(spec)
        self.decoder = Decoder(spec.text)

    def image_features(self, pixel_values: torch.Tensor, want_cls_row: bool = False):
        """-> unprojected patch features [B, N, Cv] and the [CLS] row [B, N] (or None)."""
        return self.vision(pixel_values, want_cls_row)

    def image_embeds(self, pixel_values: torch.Tensor, image_sizes=None) -> torch.Tensor:
        """-> the unpruned image span's embeddings [B, n, C] as they enter the LLM."""
        features, _ = self.image_features(pixel_values)
        return self.projector(features)

    def fastervlm_embeds(self, pixel_values: torch.Tensor, ratio: float, image_sizes=None, merge=None):
        """FasterVLM: -> the kept patches' embeddings [B, keep, C] and their indices [B, keep] (raster
        order), ranked by the [CLS] row of the feature layer. The projector is per token, so
        projecting only the kept patches equals project-then-select."""
        from ..pruning import fastervlm_select, gather_tokens, keep_count

        features, cls_row = self.image_features(pixel_values, want_cls_row=True)
        kept = fastervlm_select(cls_row, keep_count(features.shape[1], ratio))
        return self.projector(gather_tokens(features, kept)), kept

    def unpruned_image_tokens(self, image_sizes=None) -> int:
        """How many placeholder tokens the processor puts in the prompt for the picture."""
        return self.spec.num_image_tokens

    def most_entering_tokens(self, fastervlm, image_sizes=None) -> int:
        """The most image tokens the picture puts into the LLM (fastervlm: a FasterVLMConfig or
        None): every one, or FasterVLM's keep."""
        from ..pruning import keep_count

        n = self.unpruned_image_tokens(image_sizes)
        return n if fastervlm is None else keep_count(n, fastervlm.ratio)

    def image_span(self, input_ids: torch.Tensor) -> tuple[int, int]:
        """(start, length) of the image placeholder run; the same in every row of the batch."""
        is_image = input_ids == self.spec.image_token_id
        counts = is_image.sum(dim=1)
        if int(counts.min()) == 0:
            raise MllmEdgeError("the prompt holds no image placeholder token")
        if int(counts.min()) != int(counts.max()):
            raise MllmEdgeError("every prompt of a batch must hold the same number of image tokens")
        n = int(counts[0])
        starts = is_image.int().argmax(dim=1)
        start = int(starts[0])
        if bool((starts != start).any()) or not bool(is_image[:, start : start + n].all()):
            raise MllmEdgeError(
                "image placeholder tokens must form one run at the same place in every prompt"
            )
        return start, n


NEEDS_VIEWS = "LLaVA-NeXT needs its views [B, V, 3, S, S] and each picture's (height, width)"


class LlavaNext(Llava):
    """LLaVA-NeXT: each picture as its anyres views (base view, then tiles), packed as transformers'
    LlavaNextModel.pack_image_features packs them: the base view's patches, then the tiles' patch
    grid stitched, unpadded (runtime/anyres.py's arithmetic) and one image_newline after each row."""

    def __init__(self, spec: LlavaSpec):
        from ..runtime.anyres import AnyRes

        super().__init__(spec)
        self.image_newline = nn.Parameter(torch.empty(spec.text.hidden_size))
        self.anyres = AnyRes.from_config(
            spec.image_grid_pinpoints, spec.vision.image_size, spec.vision.patch_size
        )

    def image_embeds(self, pixel_values: torch.Tensor, image_sizes=None) -> torch.Tensor:
        """pixel_values [B, V, 3, S, S] (the processor's, views padded to the most), image_sizes
        [B, 2] (height, width) -> [B, n, C]; every picture of a batch must give the same n."""
        packed = []
        for views, height, width in self._pictures(pixel_values, image_sizes):
            features, _ = self.vision(views)
            packed.append(self._pack(self.projector(features), height, width))
        return _same_count(packed)

    def _pictures(self, pixel_values: torch.Tensor, image_sizes):
        """Per picture: its real views (the padding ones dropped) and (height, width)."""
        if image_sizes is None or pixel_values.dim() != 5 or len(image_sizes) != pixel_values.shape[0]:
            raise MllmEdgeError(NEEDS_VIEWS)
        for views, size in zip(pixel_values, image_sizes):
            height, width = (int(v) for v in size)
            yield views[: self.anyres.view_count(height, width)], height, width

    def _pack(self, embeds: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """embeds [V, N, C] of one picture's views -> its packed span [n, C], by the index the
        runtime packs with (anyres.pack_index: one definition of the order)."""
        rows = torch.cat((embeds.reshape(-1, embeds.shape[-1]), self.image_newline.to(embeds.dtype)[None]))
        return rows[torch.from_numpy(self.anyres.pack_index(height, width))]

    def unpruned_image_tokens(self, image_sizes=None) -> int:
        if image_sizes is None:
            raise MllmEdgeError(NEEDS_VIEWS)
        counts = {self.anyres.image_tokens(int(h), int(w)) for h, w in image_sizes}
        if len(counts) != 1:
            raise MllmEdgeError(SAME_COUNT)
        return counts.pop()

    def most_entering_tokens(self, fastervlm, image_sizes=None) -> int:
        """FasterVLM keeps its count of every view, so with the spatial merge a picture whose grid
        unpadding leaves few rows (a thin strip) enters the LLM with more tokens than unpruned; the
        unpad merge keeps at most the unpruned count."""
        from ..pruning import keep_count

        unpruned = self.unpruned_image_tokens(image_sizes)  # the same for every picture, or an error
        if fastervlm is None or fastervlm.merge == "unpad":
            return unpruned
        height, width = (int(v) for v in image_sizes[0])
        return self.anyres.view_count(height, width) * keep_count(self.spec.vision.grid**2, fastervlm.ratio)

    def fastervlm_embeds(self, pixel_values: torch.Tensor, ratio: float, image_sizes=None, merge="spatial"):
        """FasterVLM per view (the official code's semantics): each view ranked by its own [CLS] row,
        round(N * (1 - R)) patches kept per view, then merged (runtime/anyres.py): "spatial" (the
        official default) the base view's kept tokens in raster order, then the tiles' in the raster
        order of the stitched tile grid, no unpadding, no newline tokens; "unpad" the base view's,
        then the unpadded grid's kept tokens row by row with a newline after each row. -> [B, n, C]
        and the kept patch indices per view [B, views, keep] (raster order, base view first)."""
        from ..pruning import fastervlm_select, gather_tokens, keep_count

        embeds, kept_sets = [], []
        for views, height, width in self._pictures(pixel_values, image_sizes):
            features, cls_row = self.vision(views, want_cls_row=True)  # [V, N, Cv], [V, N]
            kept = fastervlm_select(cls_row, keep_count(features.shape[1], ratio))  # [V, keep]
            index = self.anyres.merge_index(kept.cpu().numpy(), height, width, merge)
            kept_features = gather_tokens(features, kept).reshape(-1, features.shape[-1])  # [V * keep, Cv]
            rows = self.projector(kept_features)  # per token: projecting first equals selecting first
            rows = torch.cat((rows, self.image_newline.to(rows.dtype)[None]))  # row V * keep: a newline
            embeds.append(rows[torch.from_numpy(index)])
            kept_sets.append(kept)
        return _same_count(embeds), torch.stack(kept_sets)


SAME_COUNT = "every picture of a batch must give the same number of image tokens"


def _same_count(spans: list[torch.Tensor]) -> torch.Tensor:
    if len({span.shape[0] for span in spans}) != 1:
        raise MllmEdgeError(SAME_COUNT)
    return torch.stack(spans)


def load_llava(model: str | Path, dtype: torch.dtype = torch.float32) -> Llava:
    """Load a checkpoint (folder or hub id) of a LLaVA family into our modules.

    Modules are built on the meta device and weights assigned as they are read, so peak memory is
    about one copy of the weights. Missing or unexpected weights are an error naming them.
    """
    folder = resolve_checkpoint(model)
    spec = load_llava_spec(folder)
    family = model_family(spec.model_type)
    with torch.device("meta"):
        llava = family.build(spec)
    expected = set(llava.state_dict())
    state, unexpected = {}, []
    for key, tensor in iter_weights(folder, family.canonical_key):
        if key in expected:
            state[key] = tensor.to(dtype)
        elif not family.unused_weight(key, spec):
            unexpected.append(key)
    missing = sorted(expected - set(state))
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} weights (first: {', '.join(missing[:3])})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (first: {', '.join(sorted(unexpected)[:3])})")
        raise MllmEdgeError(f"checkpoint {folder} does not match its config: " + "; ".join(detail))
    try:
        llava.load_state_dict(state, assign=True, strict=True)
    except RuntimeError as e:  # shapes that disagree with config.json
        raise MllmEdgeError(f"checkpoint {folder} does not match its config: {e}") from None
    return llava.eval()
