"""Choosing the next token from the logits: greedy at temperature 0, else temperature + top-p (nucleus),
reproducible with a seed."""

from __future__ import annotations

import numpy as np

from ..errors import MllmEdgeError


class Sampler:
    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        if not isinstance(temperature, (int, float)) or not np.isfinite(temperature) or temperature < 0:
            raise MllmEdgeError(f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise MllmEdgeError(f"top-p must be in (0, 1], got {top_p!r}")
        if seed is not None and (not isinstance(seed, int) or seed < 0):
            raise MllmEdgeError(f"seed must be a whole number >= 0, got {seed!r}")
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        """logits: [V] -> token id."""
        if self.temperature == 0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / self.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # the smallest set of most likely tokens whose mass reaches top_p (at least one token)
        cut = int(np.searchsorted(cumulative, self.top_p, side="left")) + 1
        kept = order[:cut]
        return int(self.rng.choice(kept, p=probs[kept] / probs[kept].sum()))
