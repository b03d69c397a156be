"""SigLIP's vision tower (llava-interleave): no [CLS] token, every patch is an image token."""

from . import VisionFamily

FAMILY = VisionFamily("siglip_vision_model", has_cls=False, select_strategy="full")
