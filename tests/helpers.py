"""Loading a tiny checkpoint both ways (transformers and ours) and making its inputs, cached per session."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from mllm_edge.models import load_llava
from mllm_edge.models.inputs import prepare_inputs
from mllm_edge.testing.checkpoints import TinyLlavaSpec, sample_image

PROMPT = "what colour is the circle?"


@functools.lru_cache(maxsize=None)
def hf_model(path: Path):
    from transformers import LlavaForConditionalGeneration

    # eager attention: the only implementation that returns the attention maps the tests rank by
    return LlavaForConditionalGeneration.from_pretrained(str(path), attn_implementation="eager").eval()


@functools.lru_cache(maxsize=None)
def our_model(path: Path):
    return load_llava(path)


@functools.lru_cache(maxsize=None)
def inputs(path: Path, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids, pixel_values, _ = prepare_inputs(path, sample_image(seed=seed), PROMPT)
    return input_ids, pixel_values


def has_cls(path: Path) -> bool:
    """FasterVLM needs a [CLS] token: CLIP towers have one, SigLIP towers do not."""
    return our_model(path).spec.vision.has_cls


def hf_fastv_keep(path: Path, input_ids, pixel_values, k: int, keep: int) -> list[int]:
    """FastV's kept image tokens by docs/methods.md, from transformers' own eager attention maps."""
    hf = hf_model(path)
    with torch.no_grad():
        out = hf(input_ids=input_ids, pixel_values=pixel_values, output_attentions=True)
    image_pos = (input_ids[0] == hf.config.image_token_id).nonzero().flatten()
    row = out.attentions[k - 1][0, :, -1, :].mean(dim=0)  # layer K-1, last query, head mean
    return stable_top_k(row[image_pos].tolist(), keep)


def hf_fastervlm_keep(path: Path, pixel_values, keep: int) -> list[int]:
    """FasterVLM's kept patches by docs/methods.md, from the CLIP tower's eager attention maps."""
    hf = hf_model(path)
    with torch.no_grad():
        out = hf.model.vision_tower(pixel_values, output_attentions=True)
    row = out.attentions[hf.config.vision_feature_layer][0, :, 0, 1:].mean(dim=0)  # CLS query, patch keys
    return stable_top_k(row.tolist(), keep)


def stable_top_k(scores: list[float], keep: int) -> list[int]:
    """Plain-Python top-k: highest score first, lower index first on ties; returned in index order."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:keep])


# LLaVA-NeXT fixtures (test_llava_next*.py), and pictures and processor inputs for them
QUESTION = "What colour is the circle?"
NEXT_SPECS = {
    # Llama, 56-pixel tiles of 14-pixel patches (16 per view), llava-v1.6's kind of pinpoints
    "llama": TinyLlavaSpec(
        name="next_llama",
        image_size=56,
        patch_size=14,
        image_grid_pinpoints=((56, 112), (112, 56), (112, 112), (168, 56), (56, 168)),
    ),
    # Mistral with grouped-query attention, 48-pixel tiles of 16-pixel patches (9 per view), 3x3 tiles
    "mistral": TinyLlavaSpec(
        name="next_mistral",
        text_arch="mistral",
        num_kv_heads=2,
        image_size=48,
        patch_size=16,
        image_grid_pinpoints=((48, 48), (48, 144), (144, 48), (144, 144), (96, 144)),
        seed=1,
    ),
}


def picture(height: int, width: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def hf_inputs(processor, image):
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True,
    )
    return processor(images=[image], text=prompt, return_tensors="pt")
