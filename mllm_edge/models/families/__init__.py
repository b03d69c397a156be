"""Model families, one module each in this folder, found by the `model_type` they declare.

Adding a family means adding a module here that defines `FAMILY`, one of:
  TextFamily    a language model (llama, qwen2, mistral): its TextSpec from the Hugging Face text config
  VisionFamily  a vision tower (CLIP, SigLIP): its [CLS] token and the one feature selection supported
  ModelFamily   the whole VLM (llava, llava_next): its spec, its torch modules, the checkpoint's weight-key
                mapping, the weights it never runs, and how many image tokens an input gives (at most)
No other file branches on a model type. Modules are imported when a family is first looked up.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

from ...errors import UnsupportedModelError


@dataclass(frozen=True)
class TextFamily:
    model_type: str
    spec: Callable  # HF text config -> TextSpec (checks what the family cannot run)


@dataclass(frozen=True)
class VisionFamily:
    model_type: str
    has_cls: bool  # a [CLS] token, which FasterVLM ranks patches by
    select_strategy: str  # the vision_feature_select_strategy that makes image tokens = patches


@dataclass(frozen=True)
class ModelFamily:
    model_type: str
    example: str  # a checkpoint of the family, for messages
    config_class: str  # transformers' config class that parses config.json
    spec: Callable  # HF config -> LlavaSpec
    build: Callable  # LlavaSpec -> the torch modules (made on whatever device is current)
    canonical_key: Callable[[str], str]  # checkpoint key -> our parameter name (idempotent)
    unused_weight: Callable  # (canonical key, spec) -> whether the checkpoint's weight never runs
    image_tokens: (
        Callable  # spec -> image tokens the unpruned model puts into the LLM (the most, if it varies)
    )


_REGISTRY: dict[type, dict[str, object]] | None = None


def _families() -> dict[type, dict[str, object]]:
    global _REGISTRY
    if _REGISTRY is None:
        found: dict[type, dict[str, object]] = {TextFamily: {}, VisionFamily: {}, ModelFamily: {}}
        for info in pkgutil.iter_modules(__path__):
            family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
            if family is not None:
                found[type(family)][family.model_type] = family
        _REGISTRY = found
    return _REGISTRY


def supported(kind: type) -> list[str]:
    return sorted(_families()[kind])


def _find(kind: type, model_type: str, what: str):
    family = _families()[kind].get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"{what} '{model_type}' is not supported (supported: {', '.join(supported(kind))})"
        )
    return family


def text_family(model_type: str) -> TextFamily:
    return _find(TextFamily, model_type, "language model")


def vision_family(model_type: str) -> VisionFamily:
    return _find(VisionFamily, model_type, "vision tower")


def model_family(model_type: str | None) -> ModelFamily:
    family = _families()[ModelFamily].get(model_type)
    if family is None:
        expected = " or ".join(f"'{m}'" for m in supported(ModelFamily))
        raise UnsupportedModelError(f"model type '{model_type}' is not supported (expected {expected})")
    return family
