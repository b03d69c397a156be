"""The one interface every backend implements, in the spirit of Polygraphy's runners.

A graph runs with named numpy inputs, used in place (C-contiguous), and optional preallocated output
buffers that the backend writes into directly. That is how a graph's new K/V rows land in their
cache slot without a copy; outputs not given are allocated by the backend and returned.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Engine(Protocol):
    name: str
    input_names: list[str]
    output_names: list[str]

    def run(
        self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Run once; returns every output not passed in `outputs` (those are written in place)."""
        ...
