"""Test helpers: tiny random LLaVA checkpoints built offline, and a deterministic sample image."""

from .checkpoints import FIXTURE_SPECS, TinyLlavaSpec, make_tiny_llava, sample_image

__all__ = ["FIXTURE_SPECS", "TinyLlavaSpec", "make_tiny_llava", "sample_image"]
