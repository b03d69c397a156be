"""Verification on CPU: each quantized graph against the source bundle's on held-out recorded calls,
then the whole bundle's answers against the source bundle's on the held-out items.

Per output: cosine similarity (the direction of logits, hidden states, K/V) and the signal-to-noise
ratio in dB, the worst over the held-out calls and export's own sample of the graph. Integer outputs
(FasterVLM's kept patches, when the vision graph is quantized) are left to the answers check. FP8 Q/DQ runs unfused
in ONNX Runtime on CPU (dequantized to float, multiplied in float): a check of the numerics only,
not of TensorRT's FP8 kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..evaluate import EvalItem
from .record import GENERATED_TOKENS, load_call


@dataclass(frozen=True)
class GraphCheck:
    graph: str
    output: str  # the worst output
    cosine: float  # least cosine similarity over held-out calls and outputs
    snr_db: float  # least signal-to-noise ratio, dB
    calls: int
    ok: bool
    limit: float


@dataclass(frozen=True)
class AnswerCheck:
    items: int
    agreement: float  # share of answers equal to the source bundle's
    limit: float

    @property
    def ok(self) -> bool:
        return self.agreement >= self.limit


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


def snr_db(reference: np.ndarray, got: np.ndarray) -> float:
    ref = reference.astype(np.float64)
    noise = float(((ref - got.astype(np.float64)) ** 2).sum())
    signal = float((ref**2).sum())
    return math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def check_graph(path: Path, graph: str, calls: list[Path], limit: float) -> GraphCheck:
    """The quantized graph at path, run on each held-out call, against the outputs recorded then."""
    from ..export.verify import session

    engine = session(path)
    scores = []  # (cosine, snr dB, output) per call and float output
    try:
        for call in calls:
            inputs, reference = load_call(call)
            got = engine.run(inputs)
            for name, ref in reference.items():
                if np.issubdtype(ref.dtype, np.integer):  # kept patches may move: the answers judge that
                    continue
                same = got[name].shape == ref.shape
                c, s = (cosine(ref, got[name]), snr_db(ref, got[name])) if same else (0.0, -math.inf)
                scores.append((c, s, name))
    finally:
        engine.close()
    worst = min(scores, default=(1.0, math.inf, ""))
    snr = min((s for _, s, _ in scores), default=math.inf)
    return GraphCheck(graph, worst[2], worst[0], snr, len(calls), worst[0] >= limit, limit)


def check_answers(
    bundle: Path,
    items: list[EvalItem],
    source_answers: list[str],
    limit: float,
    progress: Callable[[int], None] = lambda done: None,
) -> AnswerCheck:
    """The new bundle's answers to the held-out items against the source bundle's (recorded)."""
    from ..runtime.pipeline import Pipeline

    same = 0
    with Pipeline.load(bundle, backend="onnxruntime") as pipeline:
        for i, (item, expected) in enumerate(zip(items, source_answers)):
            picture = item.picture()
            same += (
                pipeline.generate(picture, item.question, max_new_tokens=GENERATED_TOKENS).text == expected
            )
            progress(i + 1)
    return AnswerCheck(len(items), same / len(items) if items else 1.0, limit)
