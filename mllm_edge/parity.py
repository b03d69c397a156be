"""Graph outputs against reference outputs: the comparison export's verification and build's share.

Numpy only, so `mllm-edge build --verify` checks engines on a Jetson without torch. Error is
measured relative to the reference output's largest magnitude, because elementwise relative error
is meaningless where the reference is near zero; integer outputs must be equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Scale-relative tolerances: fp32 graphs must match to 1e-4; fp16 ones (two fp16 implementations
# rounding differently, reductions kept in fp32) to 2e-2 per graph, and 5e-2 over the decode chain,
# where the fp16 cache and residual stream carry each step's rounding into the next.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
CHAIN_TOLERANCE = {"float32": 1e-4, "float16": 5e-2}
# Weight-only int8 / int4 LLM graphs (export/quantize.py) against the float reference. Quantization
# error, not rounding, so these limits catch a broken graph (a wrong weight layout is off by ~100%
# of the scale) or a model the format ruins; they promise nothing about answers (`mllm-edge eval`
# measures those). Measured: the built-in model at most 1.8e-2 (int8) and 2.5e-1 (int4); the random
# test checkpoints, whose weights are far rougher than trained ones, up to 2.1e-1 (int8) and 1.2 (int4).
TOLERANCE.update({"int8": 0.3, "int4": 0.5})
CHAIN_TOLERANCE.update({"int8": 0.3, "int4": 0.5})
# TensorRT engines: fp32 ones may use TF32 matmuls (10-bit mantissa) unless told otherwise.
ENGINE_TOLERANCE = {"fp32": 5e-3, "fp16": 2e-2, "bf16": 5e-2}


@dataclass(frozen=True)
class OutputCheck:
    graph: str
    output: str
    max_abs: float
    rel: float  # max_abs / max |reference|; for integer outputs 0 when equal, 1 when not
    ok: bool
    tolerance: float = 0.0  # the limit rel was held to (0: integers, which must be equal)


def compare(graph: str, name: str, got: np.ndarray, ref: np.ndarray, tolerance: float) -> OutputCheck:
    if got.shape != ref.shape:
        return OutputCheck(graph, name, float("inf"), float("inf"), False, tolerance)
    if np.issubdtype(ref.dtype, np.integer):
        equal = bool(np.array_equal(got, ref))
        return OutputCheck(
            graph, name, 0.0 if equal else float(np.abs(got - ref).max()), 0.0 if equal else 1.0, equal
        )
    diff = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()) if got.size else 0.0
    scale = float(np.abs(ref.astype(np.float64)).max()) if ref.size else 0.0
    rel = diff / scale if scale > 0 else diff
    return OutputCheck(graph, name, diff, rel, rel <= tolerance, tolerance)


def load_sample(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A graph's saved sample: (inputs, reference outputs) by tensor name."""
    with np.load(path) as data:
        inputs = {k[3:]: data[k] for k in data.files if k.startswith("in.")}
        outputs = {k[4:]: data[k] for k in data.files if k.startswith("out.")}
    return inputs, outputs
