"""The LLaVA language model (Llama / Vicuna, Qwen2) with explicit KV-cache inputs and outputs.

Each layer takes the past keys/values of its own cache as a prefix view and returns only the new
tokens' keys/values, so the caller writes S rows into a preallocated slot and copies nothing else
(docs/design.md, "The KV cache"). Parameter names follow transformers' so checkpoints load as-is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextSpec
from .layers import CachedAttentionCore, Linear, RMSNorm, activation, cached_attention_row, causal_mask
from .rope import RotaryEmbedding, apply_rope


class Rope(NamedTuple):
    """cos, sin [B, S, 1, D] for the queries; the same sequence-first, [S, B, 1, D], for the keys."""

    cos: torch.Tensor
    sin: torch.Tensor
    cos_seq: torch.Tensor
    sin_seq: torch.Tensor


class SelfAttention(nn.Module):
    def __init__(self, spec: TextSpec):
        super().__init__()
        h, g, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, g, d
        self.scale = d**-0.5
        self.q_proj = Linear(spec.hidden_size, h * d, bias=spec.attention_bias)
        self.k_proj = Linear(spec.hidden_size, g * d, bias=spec.attention_bias)
        self.v_proj = Linear(spec.hidden_size, g * d, bias=spec.attention_bias)
        self.o_proj = Linear(h * d, spec.hidden_size, bias=spec.o_proj_bias)
        self.core = CachedAttentionCore(self.scale)

    def forward(self, x, rope: Rope, past_k, past_v, mask, want_last_row: bool = False):
        """x: [B, S, C]; past_k, past_v: [1+P, B, G, D] -> out [B, S, C], new k, v [S, B, G, D], row [B, P+S] | None."""
        b, s, _ = x.shape
        q = apply_rope(self.q_proj(x).view(b, s, self.num_heads, self.head_dim), rope.cos, rope.sin)
        # Keys and values come out sequence-first, the cache's layout: the rows are reordered once.
        x_seq = x.transpose(0, 1)
        k_new = apply_rope(
            self.k_proj(x_seq).view(s, b, self.num_kv_heads, self.head_dim), rope.cos_seq, rope.sin_seq
        )
        v_new = self.v_proj(x_seq).view(s, b, self.num_kv_heads, self.head_dim)
        out = self.o_proj(self.core(q, past_k, past_v, k_new, v_new, mask))
        # The last query sees every key (causal), so its row needs no mask.
        row = cached_attention_row(q[:, -1], past_k, k_new, self.scale) if want_last_row else None
        return out, k_new, v_new, row


class MLP(nn.Module):
    def __init__(self, spec: TextSpec):
        super().__init__()
        self.gate_proj = Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.up_proj = Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.down_proj = Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)
        self.act = activation(spec.hidden_act)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: TextSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = SelfAttention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(self, x, rope: Rope, past_k, past_v, mask, want_last_row: bool = False):
        attn, k_new, v_new, row = self.self_attn(
            self.input_layernorm(x), rope, past_k, past_v, mask, want_last_row
        )
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k_new, v_new, row


@dataclass
class LayersOutput:
    hidden: torch.Tensor  # [B, S, C]
    new_keys: list[torch.Tensor]  # per layer run: [S, B, G, D]
    new_values: list[torch.Tensor]
    last_row: torch.Tensor | None  # [B, T] head-mean attention of the last token at `row_layer`


class Decoder(nn.Module):
    def __init__(self, spec: TextSpec):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = (
            None if spec.tie_word_embeddings else Linear(spec.hidden_size, spec.vocab_size, bias=False)
        )
        self.rotary = RotaryEmbedding(spec)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def run_layers(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        start: int,
        stop: int,
        past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        row_layer: int | None = None,
    ) -> LayersOutput:
        """Run layers [start, stop) on hidden [B, S, C] at position_ids [B, S].

        past[i] is the (keys, values) prefix [1 + P, B, G, D] of layer start + i, sequence-first, its
        row 0 a null row that attention masks out; all layers of a group share P. The null row keeps
        the past from ever being empty: ONNX Runtime's fused transposed MatMul crashes on an empty
        operand, and TensorRT needs no zero-size tensors. The mask is causal in cache order, which is
        position order: pruned tokens leave gaps in the position ids but never reorder them.
        """
        b, s, _ = hidden.shape
        if past is None:
            null = hidden.new_zeros(1, b, self.spec.num_kv_heads, self.spec.head_dim)
            past = [(null, null)] * (stop - start)
        # Built for S = 1 too: a graph traced with one shape must stay right for every other.
        mask = causal_mask(s, device=hidden.device)
        cos, sin = self.rotary(position_ids, hidden.dtype)
        rope = Rope(cos, sin, cos.transpose(0, 1), sin.transpose(0, 1))
        keys, values, row = [], [], None
        for i, layer_idx in enumerate(range(start, stop)):
            want = layer_idx == row_layer
            hidden, k, v, r = self.layers[layer_idx](hidden, rope, past[i][0], past[i][1], mask, want)
            keys.append(k)
            values.append(v)
            if want:
                row = r
        return LayersOutput(hidden, keys, values, row)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., C] -> logits [..., V]; a tied head reads the embedding table as stored."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        x = self.norm(hidden)
        return F.linear(x.reshape(-1, x.shape[-1]), weight).reshape(*x.shape[:-1], weight.shape[0])
