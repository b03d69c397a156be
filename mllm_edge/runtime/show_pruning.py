"""`--show-pruning OUT.png`: the picture the model saw, with the patches each method pruned dimmed
and the ones that reached the LLM's last layers outlined; the picture to look at when tuning a ratio.

FastV's kept indices point into the image tokens that entered the LLM, which after FasterVLM are
FasterVLM's kept patches in raster order; both are mapped back to patches of the grid here.

LLaVA-NeXT: every view is drawn, the base view on the left and the tiles in their grid beside it
(the resized, padded picture). The span that entered the LLM is rows of the views' tokens (the
pack graph's index, runtime/anyres.py), so FastV's indices map back through it; newline tokens
belong to no patch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import MllmEdgeError

KEPT_OUTLINE = (255, 214, 0)  # yellow
VISION_PRUNED_DIM = 0.25  # pruned by FasterVLM, before the LLM
LLM_PRUNED_DIM = 0.55  # entered the LLM, pruned by FastV at layer K


def model_view(pixel_values: np.ndarray, preprocessing: dict) -> Image.Image:
    """pixel_values [1, 3, H, W] (normalised) -> the RGB picture the vision tower saw."""
    x = pixel_values[0].astype(np.float64)
    if preprocessing.get("do_normalize", True):
        mean = np.asarray(preprocessing["image_mean"], np.float64)[:, None, None]
        std = np.asarray(preprocessing["image_std"], np.float64)[:, None, None]
        x = x * std + mean
    if preprocessing.get("do_rescale", True):
        x = x / preprocessing.get("rescale_factor", 1 / 255)
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8).transpose(1, 2, 0))


def kept_patches(
    num_patches: int, kept_vision: list[int] | None, kept_llm: list[int] | None
) -> tuple[set[int], set[int]]:
    """-> (patches that entered the LLM, patches that went on past FastV's layer)."""
    entered = list(kept_vision) if kept_vision is not None else list(range(num_patches))
    final = [entered[i] for i in kept_llm] if kept_llm is not None else entered
    return set(entered), set(final)


def draw_pruning(
    pixel_values: np.ndarray, preprocessing: dict, grid: int, kept_vision, kept_llm, out: str | Path
) -> Path:
    entered, final = kept_patches(grid * grid, kept_vision, kept_llm)
    return _save(_marked(model_view(pixel_values, preprocessing), grid, entered, final), out)


def view_patches(
    anyres, size: tuple[int, int], views: int, kept_vision, kept_llm, merge: str = "spatial"
) -> list[tuple[set[int], set[int]]]:
    """LLaVA-NeXT: per view, (patches that entered the LLM, patches that went on past FastV's layer).
    kept_vision: FasterVLM's kept patches per view (merged by `merge`), or None; kept_llm: FastV's
    indices into the span."""
    patches = (anyres.tile // anyres.patch) ** 2
    if kept_vision is None:
        kept = np.tile(np.arange(patches), (views, 1))
        rows = anyres.pack_index(*size)
    else:
        kept = np.asarray(kept_vision, np.int64)
        rows = anyres.merge_index(kept, *size, merge)
    per_view = kept.shape[1]
    entered = [set() for _ in range(views)]
    for row in rows:
        if row < views * per_view:  # not a newline token
            entered[row // per_view].add(int(kept[row // per_view, row % per_view]))
    if kept_llm is None:
        return [(e, e) for e in entered]
    final = [set() for _ in range(views)]
    for i in kept_llm:
        row = rows[i]
        if row < views * per_view:
            final[row // per_view].add(int(kept[row // per_view, row % per_view]))
    return list(zip(entered, final))


def draw_pruning_views(
    pixel_values: np.ndarray,
    preprocessing: dict,
    anyres,
    size: tuple[int, int],
    kept_vision,
    kept_llm,
    out: str | Path,
    merge: str = "spatial",
) -> Path:
    """LLaVA-NeXT's views [V, 3, S, S] of a picture of size (height, width), marked as draw_pruning
    marks one: the base view, a gap, then the tiles in their rows and columns."""
    views = pixel_values.shape[0]
    grid = anyres.tile // anyres.patch
    marks = view_patches(anyres, size, views, kept_vision, kept_llm, merge)
    panels = [
        _marked(model_view(pixel_values[v : v + 1], preprocessing), grid, *marks[v]) for v in range(views)
    ]
    tiles_h, tiles_w = anyres.tile_grid(*size)
    tile, gap = anyres.tile, max(anyres.tile // 8, 4)
    canvas = Image.new("RGB", (tile + gap + tiles_w * tile, max(tiles_h, 1) * tile), (255, 255, 255))
    canvas.paste(panels[0], (0, 0))
    for t, panel in enumerate(panels[1:]):
        row, col = divmod(t, tiles_w)
        canvas.paste(panel, (tile + gap + col * tile, row * tile))
    return _save(canvas, out)


def _marked(picture: Image.Image, grid: int, entered: set[int], final: set[int]) -> Image.Image:
    """The picture with its grid x grid patches dimmed where pruned, outlined where kept to the end."""
    width, height = picture.size
    pixels = np.asarray(picture, np.float32)
    ph, pw = height / grid, width / grid
    boxes = []
    for patch in range(grid * grid):
        row, col = divmod(patch, grid)
        y0, y1, x0, x1 = round(row * ph), round((row + 1) * ph), round(col * pw), round((col + 1) * pw)
        if patch not in entered:
            pixels[y0:y1, x0:x1] *= VISION_PRUNED_DIM
        elif patch not in final:
            pixels[y0:y1, x0:x1] *= LLM_PRUNED_DIM
        else:
            boxes.append((x0, y0, x1 - 1, y1 - 1))
    result = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(result)
    for box in boxes:
        draw.rectangle(box, outline=KEPT_OUTLINE)
    return result


def _save(result: Image.Image, out: str | Path) -> Path:
    out = Path(out)
    try:
        result.save(out)
    except (OSError, ValueError) as e:
        raise MllmEdgeError(f"cannot write {out}: {e}") from None
    return out
