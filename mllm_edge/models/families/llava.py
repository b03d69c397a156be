"""LLaVA (llava-hf layout): a vision tower, a two-layer projector, a language model; LLaVA-1.5 and
llava-interleave. One image gives one token per patch of the feature layer."""

from __future__ import annotations

import re
from dataclasses import asdict

from ..config import LlavaSpec, TextSpec, text_spec, vision_spec
from . import ModelFamily

# (checkpoint prefix, our prefix), first match wins; our keys map onto themselves. Seen: llava-hf on
# the Hub (language_model.model.*, vision_tower.vision_model.*), transformers 5's save_pretrained
# (vision_tower.* without vision_model), and its in-memory names (model.*).
PREFIXES = [
    ("model.language_model.", "decoder."),
    ("model.vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("language_model.model.", "decoder."),
    ("language_model.lm_head.", "decoder.lm_head."),
    ("vision_tower.vision_model.", "vision."),
    ("vision_tower.", "vision."),
    ("multi_modal_projector.", "projector."),
    ("lm_head.", "decoder.lm_head."),
]
# Weights that LLaVA never uses: the towers' pooling heads, the buffers some exports save.
NEVER_USED = re.compile(r"^vision\.(post_layernorm|head)\.|position_ids$|rotary_emb\.inv_freq$")


def canonical_key(key: str) -> str:
    """Map a checkpoint key to our module's parameter name (idempotent)."""
    for old, new in PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def unused_weight(key: str, spec: LlavaSpec) -> bool:
    """Weights a checkpoint may hold that never run: pooling heads and saved buffers, vision layers
    after the feature layer, a tied LM head."""
    if NEVER_USED.search(key) or (key == "decoder.lm_head.weight" and spec.text.tie_word_embeddings):
        return True
    prefix = "vision.encoder.layers."
    return key.startswith(prefix) and int(key[len(prefix) :].split(".")[0]) >= spec.vision.num_layers


def spec(cfg) -> LlavaSpec:
    text = text_spec(cfg.text_config)
    tie = text.tie_word_embeddings or bool(getattr(cfg, "tie_word_embeddings", False))
    if tie != text.tie_word_embeddings:
        text = TextSpec(**{**asdict(text), "tie_word_embeddings": tie})
    return LlavaSpec(
        vision=vision_spec(cfg.vision_config, cfg.vision_feature_layer, cfg.vision_feature_select_strategy),
        text=text,
        image_token_id=cfg.image_token_id,
        projector_hidden_act=cfg.projector_hidden_act,
        projector_bias=bool(getattr(cfg, "multimodal_projector_bias", True)),
        model_type="llava",
    )


def build(spec: LlavaSpec):
    from ..llava import Llava

    return Llava(spec)


def image_tokens(spec: LlavaSpec) -> int:
    """One token per patch of the one view of the whole image."""
    return spec.vision.num_patches


FAMILY = ModelFamily(
    "llava",
    "llava-hf/llava-1.5-7b-hf",
    "LlavaConfig",
    spec,
    build,
    canonical_key,
    unused_weight,
    image_tokens,
)
