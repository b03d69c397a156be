"""Prompt and image inputs for the PyTorch reference path, made by the checkpoint's own HF processor."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MllmEdgeError
from ..runtime.image import load_image  # noqa: F401  (the runtime's loader, re-exported for the reference path)
from ..runtime.prompt import check_prompt_text


def prepare_inputs(model_dir: str | Path, image, prompt: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """-> (input_ids [1, T] with the unpruned image placeholder run, pixel_values [1, 3, S, S], rendered prompt).

    The prompt is one user turn holding the image and the text, rendered by the checkpoint's chat
    template with the generation prompt added.
    """
    batch, rendered = processor_inputs(model_dir, image, prompt)
    return batch["input_ids"], batch["pixel_values"], rendered


def processor_inputs(model_dir: str | Path, image, prompt: str) -> tuple[dict, str]:
    """The processor's whole batch (LLaVA-NeXT's also holds `image_sizes`; its pixel_values are the
    views [1, V, 3, S, S]) and the rendered prompt, as prepare_inputs makes them."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise MllmEdgeError(f"cannot load the processor of {model_dir}: {e}") from None
    check_prompt_text(prompt, getattr(processor, "image_token", ""))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if getattr(processor, "chat_template", None) is None:
        raise MllmEdgeError(f"{model_dir} has no chat template")
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=image, text=rendered, return_tensors="pt"), rendered
