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
