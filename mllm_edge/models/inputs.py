"""Prompt and image inputs for the PyTorch reference path, made by the checkpoint's own HF processor."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MllmEdgeError


def load_image(path: str | Path):
    """Open an image file as RGB, with a clear error for a missing, empty or unreadable file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.is_dir():
        raise MllmEdgeError(f"image {path} is a folder, not an image file")
    if not path.is_file():
        raise MllmEdgeError(f"image {path} does not exist")
    if path.stat().st_size == 0:
        raise MllmEdgeError(f"image {path} is empty")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise MllmEdgeError(f"image {path} cannot be read: {e}") from None


def prepare_inputs(model_dir: str | Path, image, prompt: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """-> (input_ids [1, T] with the unpruned image placeholder run, pixel_values [1, 3, S, S], rendered prompt).

    The prompt is one user turn holding the image and the text, rendered by the checkpoint's chat
    template with the generation prompt added.
    """
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise MllmEdgeError(f"cannot load the processor of {model_dir}: {e}") from None
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if getattr(processor, "chat_template", None) is None:
        raise MllmEdgeError(f"{model_dir} has no chat template")
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(images=image, text=rendered, return_tensors="pt")
    return batch["input_ids"], batch["pixel_values"], rendered
