"""CLIP's vision tower (LLaVA-1.5): a [CLS] token first; the features are the patches without it."""

from . import VisionFamily

FAMILY = VisionFamily("clip_vision_model", has_cls=True, select_strategy="default")
