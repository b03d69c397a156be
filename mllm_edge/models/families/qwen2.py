"""Qwen2: q/k/v projections with a bias, none on the output projection or the MLP."""

from __future__ import annotations

from ...errors import UnsupportedModelError
from ..config import read_text_spec
from . import TextFamily


def spec(cfg):
    if getattr(cfg, "use_sliding_window", False):
        raise UnsupportedModelError("Qwen2 with sliding-window attention is not supported")
    return read_text_spec(cfg, attention_bias=True, mlp_bias=False, o_proj_bias=False)


FAMILY = TextFamily("qwen2", spec)
