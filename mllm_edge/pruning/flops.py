"""Prefill cost of the LLM by the FastV paper's per-layer formula (Eq. 5), pruned against unpruned.

C(n) = 4·n·d² + 2·n²·d + 2·n·d·m for n tokens, hidden size d, FFN size m. Vision tower, projector
and LM head are left out, as in the paper. Pure Python: the runtime and benchmarks use it too.
"""

from __future__ import annotations

from dataclasses import dataclass


def layer_flops(n: int, d: int, m: int) -> float:
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


@dataclass(frozen=True)
class PrefillFlops:
    """Per-layer averages, as the paper reports them: [K·C(n) + (L-K)·C(n̂)] / L."""

    unpruned: float  # every layer on the full prompt
    pruned: float  # layers < K on the prompt after FasterVLM, layers >= K on FastV's kept tokens

    @property
    def ratio(self) -> float:
        return self.pruned / self.unpruned


def prefill_flops(
    num_layers: int,
    d: int,
    m: int,
    text_tokens: int,
    image_tokens: int,
    vision_keep: int,
    llm_keep: int,
    k: int,
) -> PrefillFlops:
    """text_tokens: prompt tokens that are not image tokens; k: FastV's layer (0 without FastV)."""
    full = layer_flops(text_tokens + image_tokens, d, m)
    pruned = k * layer_flops(text_tokens + vision_keep, d, m) + (num_layers - k) * layer_flops(
        text_tokens + llm_keep, d, m
    )
    return PrefillFlops(full, pruned / num_layers)
