"""LLaVA-NeXT's "anyres" views of a picture, and the number of image tokens the model packs them into.

Torch-free, equal to transformers' `LlavaNextImageProcessorPil` (the slow processor) and to
`LlavaNextModel.pack_image_features`:

views    the pinpoint resolution that keeps most of the picture and wastes least; the picture resized
         into it keeping its aspect (the longer side fills it, the other rounded up), padded with
         black around the centre, cut into tiles of the tower's image size in row-major order; the
         whole picture squeezed to one tile goes first (the base view). Each view then goes through
         the checkpoint's per-image preprocessing (runtime/image.py).
tokens   the base view's patches, then the tiles' patch grids stitched into one grid, unpadded with
         the model's rounding (`round(x, 7)`, then equal cuts from both sides), one newline token
         after each row.

pack_index and spatial_index give the packed span as rows of the views' features: LlavaNext
(models/llava.py) packs by them, and so does a NeXT bundle's pack graph (export/graphs.py's
PackGraph), so the order has one definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import MllmEdgeError
from .image import to_rgb


@dataclass(frozen=True)
class AnyRes:
    pinpoints: tuple[tuple[int, int], ...]  # (height, width) resolutions, multiples of the tile
    tile: int  # the vision tower's image size (336)
    patch: int  # its patch size (14)

    @classmethod
    def from_config(cls, pinpoints, tile: int, patch: int) -> AnyRes:
        try:
            points = tuple((int(h), int(w)) for h, w in pinpoints)
        except (TypeError, ValueError):
            raise MllmEdgeError(
                f"image_grid_pinpoints must be [height, width] pairs, got {pinpoints!r}"
            ) from None
        if not points:
            raise MllmEdgeError("image_grid_pinpoints is empty")
        bad = [p for p in points if p[0] <= 0 or p[1] <= 0 or p[0] % tile or p[1] % tile]
        if bad:
            raise MllmEdgeError(f"image_grid_pinpoints {bad[0]} is not a whole number of {tile}-pixel tiles")
        return cls(points, int(tile), int(patch))

    @classmethod
    def of_bundle(cls, manifest) -> AnyRes | None:
        """A LLaVA-NeXT bundle's geometry, from its manifest; None for a bundle of one view."""
        if not manifest.anyres:
            return None
        arch = manifest.architecture
        return cls.from_config(
            arch["image_grid_pinpoints"], arch["vision"]["image_size"], arch["vision"]["patch_size"]
        )

    @property
    def max_views(self) -> int:
        return 1 + max(h * w for h, w in self.pinpoints) // (self.tile * self.tile)

    def largest_picture(self) -> tuple[int, int]:
        """(height, width) of the picture that gives the most image tokens: a pinpoint's own shape
        (nothing is unpadded), the one with the most tokens (bench and plan size for it)."""
        return max(self.pinpoints, key=lambda p: self.image_tokens(*p))

    def best_resolution(self, height: int, width: int) -> tuple[int, int]:
        """The pinpoint that shows most of the picture at its own scale, then wastes least."""
        best, most, waste = None, 0, math.inf
        for h, w in self.pinpoints:
            scale = min(w / width, h / height)
            shown = min(int(width * scale) * int(height * scale), width * height)
            wasted = w * h - shown
            if shown > most or (shown == most and wasted < waste):
                best, most, waste = (h, w), shown, wasted
        return best

    def views(self, image: Image.Image, resample=Image.Resampling.BICUBIC) -> list[Image.Image]:
        """The base view, then the tiles in row-major order (RGB images of tile x tile)."""
        width, height = image.size
        target_h, target_w = self.best_resolution(height, width)
        new_h, new_w = _fit(height, width, target_h, target_w)
        canvas = Image.new("RGB", (target_w, target_h))  # black, as zero padding of the pixels
        canvas.paste(
            image.resize((new_w, new_h), resample=resample),
            ((target_w - new_w) // 2, (target_h - new_h) // 2),
        )
        tiles = [
            canvas.crop((left, top, left + self.tile, top + self.tile))
            for top in range(0, target_h, self.tile)
            for left in range(0, target_w, self.tile)
        ]
        return [image.resize((self.tile, self.tile), resample=resample), *tiles]

    def packed_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of the tiles' stitched patch grid after the model unpads it."""
        target_h, target_w = self.best_resolution(height, width)
        side = self.tile // self.patch
        rows, cols = target_h // self.tile * side, target_w // self.tile * side
        if width / height > cols / rows:
            kept = int(round(height * (cols / width), 7))
            rows -= 2 * ((rows - kept) // 2)
        else:
            kept = int(round(width * (rows / height), 7))
            cols -= 2 * ((cols - kept) // 2)
        return rows, cols

    def tile_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of tiles the picture is cut into."""
        target_h, target_w = self.best_resolution(height, width)
        return target_h // self.tile, target_w // self.tile

    def view_count(self, height: int, width: int) -> int:
        """The picture's views: the base view and its tiles."""
        tiles_h, tiles_w = self.tile_grid(height, width)
        return 1 + tiles_h * tiles_w

    def pack_index(self, height: int, width: int) -> np.ndarray:
        """The packed span as rows of the views' patch features flattened [V * N] (base view first,
        N patches each), with V * N for the newline token: the base view's patches, then the tiles'
        stitched grid row by row, unpadded (packed_grid, equal cuts from both sides), a newline
        after each row. -> int64 [image_tokens(height, width)]."""
        tiles_h, tiles_w = self.tile_grid(height, width)
        side = self.tile // self.patch
        n = side * side
        rows, cols = self.packed_grid(height, width)
        top, left = (tiles_h * side - rows) // 2, (tiles_w * side - cols) // 2
        r = np.arange(top, top + rows)[:, None]
        c = np.arange(left, left + cols)[None, :]
        tile = (r // side) * tiles_w + c // side
        grid = (1 + tile) * n + (r % side) * side + c % side  # [rows, cols]
        newline = np.full((rows, 1), (1 + tiles_h * tiles_w) * n)
        return np.concatenate((np.arange(n), np.concatenate((grid, newline), axis=1).ravel())).astype(
            np.int64
        )

    def spatial_index(self, kept: np.ndarray, height: int, width: int) -> np.ndarray:
        """FasterVLM's `spatial` merge (the official code's) of the views' kept patches kept [V, keep]
        (patch indices, raster order within each view, base view first), as rows of the kept
        tokens flattened [V * keep]: the base view's in order, then the tiles' sorted by their
        (row, column) in the stitched tile grid; no unpadding, no newline. -> int64 [V * keep]."""
        _, tiles_w = self.tile_grid(height, width)
        side = self.tile // self.patch
        views, keep = kept.shape
        tiles = kept[1:]
        t = np.arange(views - 1)[:, None]
        rows = (t // tiles_w) * side + tiles // side
        cols = (t % tiles_w) * side + tiles % side
        spatial = np.argsort((rows * tiles_w * side + cols).ravel(), kind="stable")
        return np.concatenate((np.arange(keep), keep + spatial)).astype(np.int64)

    def unpad_index(self, kept: np.ndarray, height: int, width: int) -> np.ndarray:
        """FasterVLM's `unpad` merge (the official code's spatial_unpad branch) of the views' kept
        patches kept [V, keep] (raster order within each view), as rows of the kept tokens flattened
        [V * keep] with V * keep for the newline token: the unpruned span (pack_index) with every
        pruned patch left out and every newline kept. -> int64 [n], n depending on the kept sets."""
        views, keep = kept.shape
        n = (self.tile // self.patch) ** 2
        rows = self.pack_index(height, width)  # into [V * n], V * n the newline
        row_of = np.full((views, n), -1, np.int64)  # (view, patch) -> its row among the kept, or -1
        row_of[np.arange(views)[:, None], kept] = np.arange(views * keep).reshape(views, keep)
        newline = rows == views * n
        mapped = np.where(newline, views * keep, row_of[np.minimum(rows // n, views - 1), rows % n])
        return mapped[mapped >= 0]

    def merge_index(self, kept: np.ndarray, height: int, width: int, merge: str = "spatial") -> np.ndarray:
        """The span FasterVLM's kept tokens of the views make, by the merge (pruning.MERGES)."""
        if merge == "spatial":
            return self.spatial_index(kept, height, width)
        if merge == "unpad":
            return self.unpad_index(kept, height, width)
        raise MllmEdgeError(f"unknown merge '{merge}'")

    def image_tokens(self, height: int, width: int) -> int:
        """Tokens the picture puts into the LLM unpruned: the base view's patches, then each row of
        the unpadded grid and its newline token."""
        rows, cols = self.packed_grid(height, width)
        return (self.tile // self.patch) ** 2 + rows * (cols + 1)


def _fit(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """The picture's size inside the target, aspect kept: the tighter side fills it, the other is
    rounded up (never past the target)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


NEXT_ONLY = ("image_grid_pinpoints", "do_pad")  # the processor's settings of the views themselves


def view_config(cfg: dict) -> dict:
    """A LlavaNextImageProcessor's settings as those of the CLIP processor each view goes through
    (the same resize, crop, rescale and normalize), without the anyres ones."""
    return {
        **{k: v for k, v in cfg.items() if k not in NEXT_ONLY},
        "image_processor_type": "CLIPImageProcessor",
    }


def preprocess_views(image: Image.Image, anyres: AnyRes, preprocess) -> tuple[np.ndarray, tuple[int, int]]:
    """pixel_values [views, 3, tile, tile] (each view through `preprocess`, the checkpoint's
    per-image steps) and the picture's (height, width), as the processor's `image_sizes`."""
    image = to_rgb(image)  # as the processor's convert_rgb (transparency on white, high bit depths scaled)
    views = anyres.views(image, preprocess.resample)
    return np.concatenate([preprocess(v) for v in views]), (image.height, image.width)
