"""LLaVA-NeXT (LLaVA-1.6, llava-hf layout): LLaVA's tower, projector and language model over "anyres"
views of a picture: a base view and tiles of the best pinpoint resolution, packed into one image span
(the tiles' patch grid unpadded, an `image_newline` token after each row; runtime/anyres.py).

Our modules run it as transformers does (models/llava.py's LlavaNext), FasterVLM per view and FastV
over the packed span; a bundle's vision graph runs over the views, a pack graph packs them
(export/graphs.py), and plan sizes it for its largest picture.
"""

from __future__ import annotations

from dataclasses import replace

from ...errors import UnsupportedModelError
from ..config import LlavaSpec
from . import ModelFamily
from . import llava as llava_family

# The one packing transformers implements (its LlavaNextModel.pack_image_features); the original
# LLaVA code's configs name it mm_patch_merge_type.
MERGE = "spatial_unpad"


def canonical_key(key: str) -> str:
    if key in ("image_newline", "model.image_newline"):
        return "image_newline"
    return llava_family.canonical_key(key)


def spec(cfg) -> LlavaSpec:
    from ...errors import MllmEdgeError
    from ...runtime.anyres import AnyRes

    merge = getattr(cfg, "mm_patch_merge_type", MERGE)
    if merge != MERGE:
        raise UnsupportedModelError(
            f"LLaVA-NeXT's mm_patch_merge_type='{merge}': only '{MERGE}' is supported"
        )
    base = llava_family.spec(cfg)
    try:
        anyres = AnyRes.from_config(cfg.image_grid_pinpoints, base.vision.image_size, base.vision.patch_size)
    except MllmEdgeError as e:
        raise UnsupportedModelError(f"LLaVA-NeXT config: {e}") from None
    return replace(base, model_type="llava_next", image_grid_pinpoints=anyres.pinpoints)


def build(spec: LlavaSpec):
    from ..llava import LlavaNext

    return LlavaNext(spec)


def image_tokens(spec: LlavaSpec) -> int:
    """The most image tokens a picture can give: the base view's patches and the whole grid of the
    largest pinpoint (a picture of its exact shape loses no row or column to unpadding), a newline
    after each row."""
    side = spec.vision.grid
    tile = spec.vision.image_size
    return side * side + max(
        (h // tile * side) * (w // tile * side + 1) for h, w in spec.image_grid_pinpoints
    )


FAMILY = ModelFamily(
    "llava_next",
    "llava-hf/llava-v1.6-vicuna-7b-hf",
    "LlavaNextConfig",
    spec,
    build,
    canonical_key,
    llava_family.unused_weight,
    image_tokens,
)
