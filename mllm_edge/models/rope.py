"""Rotary position embedding with the frequency table of the checkpoint's RoPE kind."""

from __future__ import annotations

import torch
from torch import nn

from .config import TextSpec


def rope_frequencies(spec: TextSpec) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [D/2] and the cos/sin scale, exactly as transformers computes them.

    The default kind is the classic formula; the scaled kinds (linear, llama3, yarn) are delegated to
    transformers' own init functions, so every constant of theirs is honoured.
    """
    params = spec.rope_parameters
    if params["rope_type"] == "default":
        dim = spec.head_dim
        inv_freq = 1.0 / (
            params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
        )
        return inv_freq, 1.0
    from transformers import LlamaConfig  # the RoPE fields are the same for every decoder we support
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters=dict(params),
    )
    inv_freq, scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, torch.device("cpu"))
    return inv_freq.float(), float(scale)


class RotaryEmbedding(nn.Module):
    def __init__(self, spec: TextSpec):
        super().__init__()
        self.spec = spec
        # Computed on the CPU explicitly, so the table is real even when the module is built on "meta".
        inv_freq, self.scale = rope_frequencies(spec)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: [B, S] -> cos, sin: [B, S, 1, D] (angles in fp32, then cast)."""
        angles = position_ids[..., None].float() * self.inv_freq.float()  # [B, S, D/2]
        emb = torch.cat((angles, angles), dim=-1)[:, :, None, :]
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, S, heads, D]; cos, sin: [B, S, 1, D]."""
    return x * cos + rotate_half(x) * sin
