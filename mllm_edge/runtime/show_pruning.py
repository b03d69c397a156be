"""`--show-pruning OUT.png`: the picture the model saw, with the patches each method pruned dimmed
and the ones that reached the LLM's last layers outlined; the picture to look at when tuning a ratio.

FastV's kept indices point into the image tokens that entered the LLM, which after FasterVLM are
FasterVLM's kept patches in raster order; both are mapped back to patches of the grid here.
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
    picture = model_view(pixel_values, preprocessing)
    width, height = picture.size
    entered, final = kept_patches(grid * grid, kept_vision, kept_llm)
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
    out = Path(out)
    try:
        result.save(out)
    except (OSError, ValueError) as e:
        raise MllmEdgeError(f"cannot write {out}: {e}") from None
    return out
