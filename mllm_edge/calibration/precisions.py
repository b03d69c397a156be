"""The precisions `calibrate` makes, each defined once: how, for which backend, and how close it must stay.

tensorrt target (standard ONNX Q/DQ, NVIDIA Model Optimizer):
  int4-awq  weight-only INT4, blocks along the input dimension, AWQ-clip scales from the recorded
            activations; activations stay in the bundle's float type. Jetson Orin's format.
  int8      W8A8: per-channel int8 weights, per-tensor int8 activations calibrated on the recordings.
  fp8       W8A8 in FP8 E4M3: needs SM 8.9 or newer (Ada, Hopper, Blackwell, Thor), never an Orin.
onnxruntime target (ONNX Runtime's MatMulNBits, what `export --quantize` made):
  int8, int4  weight-only, round to nearest in blocks of 32, fast CPU kernels; ONNX Runtime only.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import graphs as mg
from ..errors import MllmEdgeError

TARGETS = ("tensorrt", "onnxruntime")
_LLM = tuple(g.name for g in mg.LLM_GRAPHS.values() if g.quantizable)
GRAPH_CHOICES = {"llm": _LLM, "vision": (mg.VISION,), "all": (mg.VISION, *_LLM)}  # in the order they run


@dataclass(frozen=True)
class Precision:
    name: str
    target: str
    method: str  # the library's calibration method
    activations: str  # "float": the bundle's dtype; else what matmul inputs are quantized to
    block_size: int | None  # weights per scale along the input dimension; None: per channel
    min_sm: str | None = None  # the oldest GPU architecture TensorRT runs it on
    opset: int = 20  # the ONNX opset the quantized graph needs (blocked int4 DequantizeLinear: 21)
    # held-out checks against the source bundle: the least cosine similarity of any output of a
    # quantized graph, and the least share of answers equal to the source bundle's
    min_cosine: float = 0.98
    min_agreement: float = 0.9

    @property
    def backends(self) -> list[str]:
        return ["onnxruntime", "tensorrt"] if self.target == "tensorrt" else ["onnxruntime"]

    @property
    def needs_calibration(self) -> bool:
        return self.target == "tensorrt"


PRECISIONS = {
    ("tensorrt", "int4-awq"): Precision("int4-awq", "tensorrt", "awq_clip", "float", 128, opset=21),
    ("tensorrt", "int8"): Precision("int8", "tensorrt", "entropy", "int8", None),
    ("tensorrt", "fp8"): Precision("fp8", "tensorrt", "max", "fp8", None, min_sm="8.9"),
    ("onnxruntime", "int8"): Precision("int8", "onnxruntime", "rtn", "float", 32),
    ("onnxruntime", "int4"): Precision("int4", "onnxruntime", "rtn", "float", 32),
}


def precision(name: str, target: str) -> Precision:
    if target not in TARGETS:
        raise MllmEdgeError(f"unknown --target '{target}' (choose from {', '.join(TARGETS)})")
    found = PRECISIONS.get((target, name))
    if found is None:
        offered = [p for t, p in PRECISIONS if t == target]
        others = [t for t, p in PRECISIONS if p == name and t != target]
        hint = f"; --target {others[0]} makes {name}" if others else ""
        raise MllmEdgeError(
            f"unknown --precision '{name}' for --target {target} (choose from {', '.join(offered)}){hint}"
        )
    return found


def sm_at_least(sm: str, minimum: str) -> bool:
    """'8.7' >= '8.9'? Compute capabilities compare as (major, minor)."""

    def key(s: str) -> tuple[int, int]:
        major, _, minor = s.partition(".")
        return int(major), int(minor or 0)

    return key(sm) >= key(minimum)
