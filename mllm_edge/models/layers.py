"""Building blocks shared by the vision tower and the decoder.

Shape letters, used the same way in every module:
  B batch, S new tokens, P past tokens, T = P + S all tokens, C channels (hidden size),
  H query heads, G key/value heads, R = H // G queries per key/value head, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedModelError(
            f"activation '{name}' is not supported ({', '.join(ACTIVATIONS)})"
        ) from None


class Linear(nn.Linear):
    """nn.Linear computed on 2-D rows, so it exports as Gemm(transB=1) over the weight as stored.

    The 3-D form exports as MatMul with a transposed copy of the weight, which the exporter's
    constant folding materialises: a second copy of every weight in memory while exporting, and
    names lost. Same parameters, same numbers.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias).reshape(
            *x.shape[:-1], self.out_features
        )


class RMSNorm(nn.Module):
    """Llama's RMSNorm, computed in fp32 whatever the input dtype (fp16 overflows in the square)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def group_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """q: [B, S, H, D] -> [B, G, R*S, D], so each key/value head is read once, never repeated.

    Query head h uses key/value head h // R, as in transformers' repeat_kv.
    """
    b, s, h, d = q.shape
    r = h // num_kv_heads
    return q.reshape(b, s, num_kv_heads, r, d).permute(0, 2, 3, 1, 4).reshape(b, num_kv_heads, r * s, d)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Softmax attention with grouped keys/values; the softmax runs in fp32.

    q: [B, S, H, D]; k, v: [B, T, G, D]; mask: additive, broadcastable to [S, T] or None.
    Returns [B, S, H*D].
    """
    b, s, h, d = q.shape
    g = k.shape[2]
    qg = group_queries(q, g)  # [B, G, R*S, D]
    kt = k.permute(0, 2, 3, 1)  # [B, G, D, T]
    scores = torch.matmul(qg, kt).float() * scale  # [B, G, R*S, T]
    scores = scores.reshape(b, g, h // g, s, -1)
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1).to(q.dtype).reshape(b, g, (h // g) * s, -1)
    out = torch.matmul(probs, v.transpose(1, 2))  # [B, G, R*S, D]
    return out.reshape(b, g, h // g, s, d).permute(0, 3, 1, 2, 4).reshape(b, s, h * d)


def attention_row(
    q_row: torch.Tensor, k: torch.Tensor, scale: float, mask_row: torch.Tensor | None = None
) -> torch.Tensor:
    """Post-softmax attention of one query position over all keys, averaged over the query heads.

    This is the single row FastV and FasterVLM rank tokens by, computed directly in O(T) so the
    full T x T map is never built. q_row: [B, H, D]; k: [B, T, G, D]; returns [B, T] in fp32.
    """
    b, h, d = q_row.shape
    g = k.shape[2]
    qg = q_row.reshape(b, g, h // g, d)  # head h -> kv head h // R
    # in fp32 from the start (fp16 graphs too): the ranking must not rest on fp16 rounding of q.k
    scores = torch.matmul(qg.float(), k.permute(0, 2, 3, 1).float()) * scale  # [B, G, R, T]
    if mask_row is not None:
        scores = scores + mask_row
    return torch.softmax(scores, dim=-1).reshape(b, h, -1).mean(dim=1)


def null_row_mask(num_past: int, device=None) -> torch.Tensor:
    """[P] additive mask over a past whose row 0 is the null row: -inf there, 0 elsewhere."""
    return torch.where(torch.arange(num_past, device=device) == 0, float("-inf"), 0.0)


QUERY_BLOCK = 256  # eager prefill attends this many query rows at a time (see cached_attention)


def is_exporting() -> bool:
    """True while torch.export (the ONNX exporter) or torch.compile traces the module."""
    return torch.compiler.is_exporting() or torch.compiler.is_compiling()


def cached_attention(q, past_k, past_v, new_k, new_v, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """cached_attention_block over blocks of QUERY_BLOCK query rows when run eagerly (the reference).

    Every query row's attention is its own, so blocks give the same rows; they bound the fp32 scores
    alive at once: a LLaVA-NeXT prompt of 2370 tokens holds [32, 2370, 2370] fp32 (0.72 GB) per copy
    in one block, and export's reference peaked at 2.45x the weights from them. Exported graphs keep
    the one-block form (a loop over a dynamic length is no graph for TensorRT).
    """
    s = q.shape[1]
    if is_exporting() or s <= QUERY_BLOCK:
        return cached_attention_block(q, past_k, past_v, new_k, new_v, mask, scale)
    return torch.cat(
        [
            cached_attention_block(
                q[:, i : i + QUERY_BLOCK], past_k, past_v, new_k, new_v, mask[i : i + QUERY_BLOCK], scale
            )
            for i in range(0, s, QUERY_BLOCK)
        ],
        dim=1,
    )


class CachedAttentionCore(nn.Module):
    """`cached_attention` as a module without weights: the exporter records its scope in the metadata
    of every node it becomes, which is how export finds it and writes a copy of the graph with ONNX
    Runtime's fused kernel in its place (export/fused_attention.py). The graph itself keeps the
    standard operators, for TensorRT."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, q, past_k, past_v, new_k, new_v, mask: torch.Tensor) -> torch.Tensor:
        return cached_attention(q, past_k, past_v, new_k, new_v, mask, self.scale)


def cached_attention_block(q, past_k, past_v, new_k, new_v, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of S new queries over a cache prefix and their own keys, without joining the two.

    q: [B, S, H, D]; past_k, past_v: [1 + P, B, G, D] and new_k, new_v: [S, B, G, D], sequence-first
    as the cache stores them; past row 0 is the null row (never attended: the past is never empty,
    see Decoder.run_layers); mask: additive [S, N] over the N new keys (every real past key is
    visible to every new query); S = N but in a block of cached_attention's. Returns [B, S, H*D].

    Keys and values are read where they lie: the permutes below move the sequence axis of a
    sequence-first tensor, which ONNX Runtime folds into its MatMul (transBatch) instead of copying,
    so a decode step never copies the context. Only the scores are joined for the softmax and the
    probabilities split again: [B, G, R*S, 1+P+S], small when decoding; in prefill (P = 0) an S x S
    copy per head, which costs less than joining the keys and values costs a long decode.
    """
    b, s, h, d = q.shape
    g, n = new_k.shape[2], new_k.shape[0]
    num_past = past_k.shape[0]
    qg = group_queries(q * scale, g)  # [B, G, R*S, D]
    scores_past = torch.matmul(qg, past_k.permute(1, 2, 3, 0)).float() + null_row_mask(
        num_past, q.device
    )  # [B, G, R*S, 1+P]
    scores_new = torch.matmul(qg, new_k.permute(1, 2, 3, 0)).float()  # [B, G, R*S, N]
    scores_new = (scores_new.reshape(b, g, h // g, s, n) + mask).reshape(b, g, (h // g) * s, n)
    probs = torch.softmax(torch.cat((scores_past, scores_new), dim=-1), dim=-1).to(q.dtype)
    out = torch.matmul(probs[..., :num_past], past_v.permute(1, 2, 0, 3)) + torch.matmul(
        probs[..., num_past:], new_v.permute(1, 2, 0, 3)
    )
    return out.reshape(b, g, h // g, s, d).permute(0, 3, 1, 2, 4).reshape(b, s, h * d)


def cached_attention_row(
    q_row: torch.Tensor, past_k: torch.Tensor, new_k: torch.Tensor, scale: float
) -> torch.Tensor:
    """attention_row of the last new query over the real past keys and the new keys: [B, P+S] fp32.

    past_k: [1 + P, B, G, D] with its null row first (masked, then dropped from the row).
    """
    b, h, d = q_row.shape
    g = new_k.shape[2]
    qg = (q_row.float() * scale).reshape(b, g, h // g, d)  # fp32 from the start, as attention_row
    scores_past = torch.matmul(qg, past_k.permute(1, 2, 3, 0).float()) + null_row_mask(
        past_k.shape[0], q_row.device
    )
    scores = torch.cat((scores_past, torch.matmul(qg, new_k.permute(1, 2, 3, 0).float())), dim=-1)
    return torch.softmax(scores, dim=-1).reshape(b, h, -1).mean(dim=1)[:, 1:]


def causal_mask(num_new: int, device=None) -> torch.Tensor:
    """[S, S] additive mask over the new keys: new token i sees new tokens 0 .. i."""
    index = torch.arange(num_new, device=device)
    visible = index[None, :] <= index[:, None]
    return torch.zeros(visible.shape, device=device).masked_fill(~visible, float("-inf"))
