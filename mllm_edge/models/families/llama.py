"""Llama (and Vicuna): LLaVA-1.5's language model."""

from __future__ import annotations

from ..config import read_text_spec
from . import TextFamily


def spec(cfg):
    attention_bias = bool(getattr(cfg, "attention_bias", False))
    return read_text_spec(
        cfg,
        attention_bias=attention_bias,
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        o_proj_bias=attention_bias,  # transformers' Llama gives o_proj the same bias as q/k/v
    )


FAMILY = TextFamily("llama", spec)
