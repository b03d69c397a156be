"""The vision tower as LLaVA uses it (CLIP, or SigLIP for llava-interleave), and the projector.

Only the encoder layers up to the feature layer exist here (LLaVA-1.5 takes the second-to-last
layer's output, so its last layer is never loaded). A CLIP tower can also return the [CLS] query's
attention row of that same layer, which FasterVLM ranks patches by. The two towers differ only in
the [CLS] token, CLIP's extra LayerNorm before the encoder, and SigLIP's bias on the patch conv.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .config import LlavaSpec, VisionSpec
from .layers import Linear, activation, attention, attention_row


class VisionEmbeddings(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.has_cls = spec.has_cls
        if spec.has_cls:
            self.class_embedding = nn.Parameter(torch.zeros(spec.hidden_size))
        c, p = spec.hidden_size, spec.patch_size
        self.patch_embedding = nn.Conv2d(3, c, p, stride=p, bias=not spec.has_cls)
        self.position_embedding = nn.Embedding(spec.num_patches + int(spec.has_cls), c)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: [B, 3, size, size] -> [B, (1 +) N, C], CLS first if any, patches in raster order."""
        weight = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
        if self.has_cls:
            x = torch.cat((self.class_embedding.expand(x.shape[0], 1, -1), x), dim=1)
        return x + self.position_embedding.weight


class VisionAttention(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.num_heads = spec.num_heads
        self.head_dim = spec.hidden_size // spec.num_heads
        self.scale = self.head_dim**-0.5
        c = spec.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Linear(c, c) for _ in range(4))

    def forward(self, x: torch.Tensor, want_cls_row: bool = False):
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        out = self.out_proj(attention(q, k, v, None, self.scale))
        return out, (attention_row(q[:, 0], k, self.scale) if want_cls_row else None)


class VisionMLP(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.fc1 = Linear(spec.hidden_size, spec.intermediate_size)
        self.fc2 = Linear(spec.intermediate_size, spec.hidden_size)
        self.act = activation(spec.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.self_attn = VisionAttention(spec)
        self.layer_norm2 = nn.LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.mlp = VisionMLP(spec)

    def forward(self, x: torch.Tensor, want_cls_row: bool = False):
        attn, row = self.self_attn(self.layer_norm1(x), want_cls_row)
        x = x + attn
        x = x + self.mlp(self.layer_norm2(x))
        return x, row


class VisionTower(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.spec = spec
        self.embeddings = VisionEmbeddings(spec)
        # sic: CLIP's spelling. SigLIP has no norm before the encoder.
        self.pre_layrnorm = (
            nn.LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps) if spec.has_cls else nn.Identity()
        )
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(VisionLayer(spec) for _ in range(spec.num_layers))

    def forward(self, pixel_values: torch.Tensor, want_cls_row: bool = False):
        """-> patch features [B, N, C] of the feature layer, and its CLS row [B, N] over patches (or None).

        The CLS->CLS entry is dropped from the row and the rest is not renormalised (ranking is unchanged).
        """
        if want_cls_row and not self.spec.has_cls:
            raise UnsupportedModelError(
                f"FasterVLM ranks patches by [CLS] attention; {self.spec.arch} has no [CLS] token"
            )
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        row = None
        last = len(self.encoder.layers) - 1
        for i, layer in enumerate(self.encoder.layers):
            x, r = layer(x, want_cls_row and i == last)
            row = r if r is not None else row
        if not self.spec.has_cls:
            return x, None
        return x[:, 1:], (row[:, 1:] if row is not None else None)


class Projector(nn.Module):
    """LLaVA's two-layer MLP from vision features to the LLM's embedding space (per token)."""

    def __init__(self, spec: LlavaSpec):
        super().__init__()
        self.linear_1 = Linear(spec.vision.hidden_size, spec.text.hidden_size, bias=spec.projector_bias)
        self.act = activation(spec.projector_hidden_act)
        self.linear_2 = Linear(spec.text.hidden_size, spec.text.hidden_size, bias=spec.projector_bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))
