"""Mistral: Llama's layers without biases (LLaVA-NeXT's llava-v1.6-mistral-7b).

Sliding-window attention is honoured by keeping every context within the window: there each token
sees all the tokens before it, so full causal attention computes exactly what the model does. A
bundle's max context is therefore at most `sliding_window` (TextSpec.max_context).
"""

from __future__ import annotations

from ...errors import UnsupportedModelError
from ..config import read_text_spec
from . import TextFamily


def spec(cfg):
    window = getattr(cfg, "sliding_window", None)
    if window is not None and (not isinstance(window, int) or window < 1):
        raise UnsupportedModelError(f"Mistral's sliding_window={window!r} is not a positive number of tokens")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise UnsupportedModelError("Mistral with biases in its attention or MLP is not supported")
    return read_text_spec(cfg, attention_bias=False, mlp_bias=False, o_proj_bias=False, sliding_window=window)


FAMILY = TextFamily("mistral", spec)
