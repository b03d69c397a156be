"""Export-friendly PyTorch modules for LLaVA checkpoints in the Hugging Face layout."""

from .config import LlavaSpec, TextSpec, VisionSpec, load_llava_spec
from .generate import GenerationResult, ReferenceCache, generate, generate_steps
from .llava import Llava, load_llava

__all__ = [
    "GenerationResult",
    "ReferenceCache",
    "Llava",
    "LlavaSpec",
    "TextSpec",
    "VisionSpec",
    "generate",
    "generate_steps",
    "load_llava",
    "load_llava_spec",
]
