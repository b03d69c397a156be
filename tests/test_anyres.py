"""LLaVA-NeXT's anyres views and token counts (runtime/anyres.py) against transformers: the slow
image processor's pixel values and image sizes, and the model's own packing of the features."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mllm_edge.errors import MllmEdgeError
from mllm_edge.runtime.anyres import AnyRes, preprocess_views, view_config
from mllm_edge.runtime.image import ImagePreprocessor

transformers = pytest.importorskip("transformers", reason="compared with transformers' LLaVA-NeXT")
torch = pytest.importorskip("torch")

PINPOINTS = {  # llava-v1.6's, and a set with 3x3 tiles and thin strips
    "llava-v1.6": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "wide": [[336, 336], [336, 1344], [1344, 336], [1008, 1008], [672, 1008]],
}
SIZES = [
    (336, 336),
    (480, 640),
    (640, 480),
    (100, 1500),
    (1500, 100),
    (1, 1),
    (3, 7),
    (337, 673),
    (1000, 999),
    (2000, 60),
    (50, 50),
]


def processor(pinpoints):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=pinpoints
    )


def picture(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("points", list(PINPOINTS))
def test_views_equal_the_slow_processors(points):
    hf = processor(PINPOINTS[points])
    ours = ImagePreprocessor.from_config(view_config(hf.to_dict()))
    anyres = AnyRes.from_config(PINPOINTS[points], 336, 14)
    for i, (h, w) in enumerate(SIZES):
        image = picture(h, w, i)
        wanted = hf(images=[image], return_tensors="np", do_pad=False)
        pixels, size = preprocess_views(image, anyres, ours)
        assert size == tuple(int(v) for v in wanted["image_sizes"][0]) == (h, w)
        assert pixels.shape == wanted["pixel_values"][0].shape, (h, w)
        np.testing.assert_allclose(pixels, wanted["pixel_values"][0], atol=1e-6, err_msg=str((h, w)))


@pytest.mark.parametrize("points", list(PINPOINTS))
def test_token_counts_equal_the_models_packing(points):
    """The model's pack_image_features on features of the processor's views: base patches, the
    unpadded grid and a newline per row."""
    from transformers.models.llava_next import modeling_llava_next as m

    anyres = AnyRes.from_config(PINPOINTS[points], 336, 14)
    rng = np.random.default_rng(0)
    sizes = SIZES + [(int(rng.integers(1, 3000)), int(rng.integers(1, 3000))) for _ in range(200)]
    for h, w in sizes:
        rows, cols = m.get_anyres_image_grid_shape((h, w), PINPOINTS[points], 336)
        grid = torch.zeros(1, rows * 24, cols * 24)
        unpadded = m.unpad_image(grid, (h, w))
        wanted = 24 * 24 + unpadded.shape[1] * (unpadded.shape[2] + 1)
        assert anyres.packed_grid(h, w) == tuple(unpadded.shape[1:]), (h, w)
        assert anyres.image_tokens(h, w) == wanted, (h, w)
        assert len(anyres.views(picture(min(h, 64), min(w, 64), 0).resize((w, h)))) == 1 + rows * cols
    assert anyres.max_views == 1 + max(a * b for a, b in PINPOINTS[points]) // 336**2


def test_bad_pinpoints_are_refused():
    with pytest.raises(MllmEdgeError, match="not a whole number of 336-pixel tiles"):
        AnyRes.from_config([[336, 500]], 336, 14)
    with pytest.raises(MllmEdgeError, match="empty"):
        AnyRes.from_config([], 336, 14)
    with pytest.raises(MllmEdgeError, match="pairs"):
        AnyRes.from_config([[336]], 336, 14)
