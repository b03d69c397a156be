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


@pytest.fixture(scope="module")
def tiny_next(tmp_path_factory):
    """A tiny random LlavaNextForConditionalGeneration (56-pixel tiles of 14-pixel patches: 16 per
    view), its processor saved beside it."""
    from mllm_edge.testing.checkpoints import TinyLlavaSpec, make_tiny_llava

    spec = TinyLlavaSpec(
        name="tiny_next",
        image_size=56,
        patch_size=14,
        image_grid_pinpoints=((56, 112), (112, 56), (112, 112), (56, 168)),
    )
    return make_tiny_llava(tmp_path_factory.mktemp("next") / "ckpt", spec), spec


NEXT_SIZES = [(56, 56), (40, 90), (90, 40), (3, 5), (200, 60), (57, 113), (300, 300)]


def test_prompt_ids_and_views_equal_the_next_processors_and_fill_the_models_features(tiny_next):
    """For square, wide, tall and tiny pictures: our prompt ids (the placeholder run as long as
    AnyRes counts) equal the processor's, our views its pixel values, and the real model's packed
    features are exactly that many."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from mllm_edge.runtime.prompt import PromptBuilder

    folder, spec = tiny_next
    processor = AutoProcessor.from_pretrained(str(folder))
    model = LlavaNextForConditionalGeneration.from_pretrained(str(folder)).eval()
    anyres = AnyRes.from_config(spec.image_grid_pinpoints, spec.image_size, spec.patch_size)
    image_token_id = model.config.image_token_id
    builder = PromptBuilder.from_folder(folder, None, "<image>", image_token_id, spec.num_image_tokens)
    per_view = ImagePreprocessor.from_config(view_config(processor.image_processor.to_dict()))
    rendered = builder.render("What is in the picture?")
    for i, (h, w) in enumerate(NEXT_SIZES):
        image = picture(h, w, i)
        wanted = processor(images=[image], text=rendered, return_tensors="pt", do_pad=False)
        n = anyres.image_tokens(h, w)
        assert builder.encode(rendered, 1, image_tokens=n) == wanted["input_ids"][0].tolist(), (h, w)
        pixels, size = preprocess_views(image, anyres, per_view)
        np.testing.assert_allclose(pixels, wanted["pixel_values"][0].numpy(), atol=1e-6)
        with torch.no_grad():
            features = model.model.get_image_features(
                wanted["pixel_values"],
                wanted["image_sizes"],
                vision_feature_layer=-2,
                vision_feature_select_strategy="default",
            )
        packed = features.pooler_output if hasattr(features, "pooler_output") else features
        assert sum(f.shape[0] for f in packed) == n, (h, w)
