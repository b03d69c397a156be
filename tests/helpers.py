"""Loading a tiny checkpoint both ways (transformers and ours) and making its inputs, cached per session."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from mllm_edge.models import load_llava
from mllm_edge.models.inputs import prepare_inputs
from mllm_edge.testing.checkpoints import sample_image

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
