"""The built-in default model: a small LLaVA trained here on synthetic scenes (scenes.py, train.py).

Its checkpoint ships inside the package (checkpoint/, llava-hf layout), so `mllm-edge export` with no
--model works offline on a fresh machine.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MllmEdgeError

CHECKPOINT = Path(__file__).parent / "checkpoint"
NAME = "mllm-edge default (synthetic scenes)"


def checkpoint() -> Path:
    if not (CHECKPOINT / "config.json").is_file():
        raise MllmEdgeError(
            f"the built-in model is missing from {CHECKPOINT}: reinstall mllm-edge, or train it with "
            "`python -m mllm_edge.default_model.train`"
        )
    return CHECKPOINT
