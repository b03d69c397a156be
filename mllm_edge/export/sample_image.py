"""The deterministic picture export's reference sample is made from (and the tests' pictures).

Numpy and Pillow only, so the tests and benchmarks can make it without torch.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def sample_image(width: int = 320, height: int = 240, seed: int = 0) -> Image.Image:
    """A deterministic RGB test picture: a colour gradient with a few filled shapes on it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    background = np.stack(
        [
            64 + 128 * x / max(width - 1, 1),
            64 + 128 * y / max(height - 1, 1),
            np.full_like(x, 96.0 + 64.0 * rng.random()),
        ],
        axis=-1,
    )
    image = Image.fromarray(background.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    palette = [(220, 30, 30), (30, 160, 60), (40, 60, 220), (240, 210, 30), (150, 40, 170), (250, 250, 250)]
    for i in range(6):
        w = int(rng.integers(width // 8, width // 3 + 1))
        h = int(rng.integers(height // 8, height // 3 + 1))
        x0 = int(rng.integers(0, max(width - w, 1)))
        y0 = int(rng.integers(0, max(height - h, 1)))
        box = (x0, y0, x0 + w, y0 + h)
        colour = palette[int(rng.integers(len(palette)))]
        kind = i % 3
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x0 + w // 2, y0), (x0 + w, y0 + h), (x0, y0 + h)], fill=colour)
    return image
