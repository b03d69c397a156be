"""int8 and fp8 (W8A8) for the tensorrt target: the selected weight MatMuls get Q/DQ on their input
activation (one scale per tensor, calibrated on the recorded calls) and DQ on their weight (stored
quantized, one scale per output channel), as Model Optimizer's driver writes them for TensorRT.

Its driver (`modelopt.onnx.quantization.quantize`, which hands ONNX Runtime's `quantize_static` the
whole graph) took 14 GB, 11.4x the largest graph, on the ~1B model's fp16 `llm_tail`, and converts
every fp32 island of an fp16 graph (norms, softmax) to fp16 on the way. Here, in two steps that
hold of the float weights only the one being quantized (the quantized ones, half or a quarter of
their float bytes, stay until the graph is written):

1. ranges: one unoptimised ONNX Runtime session over the source graph replays the recorded calls
   with the selected MatMuls' input activations as extra outputs, one call at a time; int8 feeds
   each call to ONNX Runtime's `HistogramCollector` (entropy, 128 bins, merged call by call, the
   settings the driver gives it: with as many quantized bins as bins, its search has one candidate
   until a later call widens the histogram, so the range is close to the largest magnitude and
   depends on the calls' order, as the driver's does), fp8 keeps the largest magnitude;
2. write: per weight, read from its file, symmetric per-channel scales and values; the activation
   Q/DQ pairs before their MatMuls; unquantized weights copied from the source a few at a time.

Scales: int8 r / 127 over the range r (ONNX Runtime's symmetric int8, [-127, 127]); fp8 r / 448, so
E4M3's whole range is used (the driver's fp8 multiplies its int8 scales by 448 / 127 instead, which
leaves quantized values within +-36: NVIDIA/Model-Optimizer#215).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import MllmEdgeError
from .modelopt import quiet
from .precisions import Precision
from .record import replay
from .rewrite import gemms_to_matmuls, save_graph, selected_gemms, weight_array

Progress = Callable[[str, int, int], None]
QMAX = {"int8": 127.0, "fp8": 448.0}  # the largest quantized magnitude used
ENTROPY_BINS = 128  # histogram and quantized bins: ONNX Runtime's entropy defaults, the driver's too


def quantize_graph(
    source: Path,
    dest: Path,
    name: str,
    precision: Precision,
    select: Callable[[str], bool],
    calls: list[Path],
    progress: Progress = lambda stage, done, total: None,
) -> dict:
    """source/name.onnx with its selected weight MatMuls in W8A8 `precision` (int8 or fp8), into
    dest/name.onnx; returns the manifest's entry."""
    import onnxruntime

    if not calls:
        raise MllmEdgeError(f"no recorded calls of the {name} graph to calibrate on")
    model = onnx.load(str(source / f"{name}.onnx"), load_external_data=False)
    inits, gemms = selected_gemms(model, name, select)
    weights = {weight for _, weight in gemms}
    # activation -> its ONNX element type, for every selected Gemm's input (a Gemm's A and B have one)
    activations = {x: inits[weight].data_type for x, weight in gemms}

    found = activation_ranges(
        model,
        source / f"{name}.onnx",
        activations,
        calls,
        precision.method,
        lambda done, total: progress(f"calibrate {name}", done, total),
    )
    kind = precision.name
    scales = {x: _scale(r, kind, activations[x]) for x, r in found.items()}

    def operand(weight: str):  # DequantizeLinear of the weight's quantized transpose, once per weight
        values, scale = quantize_weight(np.asarray(weight_array(inits[weight], source)).T, kind)
        tensors = [
            numpy_helper.from_array(values, f"{weight}.T"),
            numpy_helper.from_array(scale, f"{weight}.T_scale"),
            _zeros(f"{weight}.T_zero_point", kind, scale.shape),
        ]
        out = f"{weight}.T_DequantizeLinear_Output"
        dq = helper.make_node(
            "DequantizeLinear", [t.name for t in tensors], [out], name=f"{weight}.T_DequantizeLinear", axis=1
        )
        return out, tensors, [dq]

    progress(f"quantize {name}", 0, 1)
    rewritten = gemms_to_matmuls(model, source, lambda w: w in weights, operand)
    _quantize_activations(model, set(rewritten), scales, kind)
    save_graph(model, dest, name, source)
    progress(f"quantize {name}", 1, 1)
    library = f"onnxruntime {onnxruntime.__version__} ({precision.method} ranges, per weight)"
    return {"weights": sorted(weights), "library": library}


def activation_ranges(
    model: onnx.ModelProto,
    path: Path,
    activations: dict[str, int],
    calls: list[Path],
    method: str,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> dict[str, float]:
    """Activation name -> the magnitude its scale covers, over all recorded calls: the largest
    (method "max"), or ONNX Runtime's entropy threshold (method "entropy")."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    if method not in ("max", "entropy"):
        raise MllmEdgeError(f"unknown calibration method '{method}'")
    collector = HistogramCollector(
        method="entropy",
        symmetric=False,
        num_bins=ENTROPY_BINS,
        num_quantized_bins=ENTROPY_BINS,
        percentile=99.999,
        scenario="same",
    )
    largest = dict.fromkeys(activations, 0.0)
    for i, got in enumerate(replay(model, path, activations, calls)):
        for x in activations:
            values = got[x].astype(np.float32)
            if method == "max":
                largest[x] = max(largest[x], float(np.max(np.abs(values), initial=0.0)))
            else:
                with quiet():  # it prints what it does
                    collector.collect({x: values})
            del values
        del got
        progress(i + 1, len(calls))
    if method == "max":
        return largest
    with quiet():
        thresholds = collector.compute_collection_result()
    return {x: float(max(abs(thresholds[x][0]), abs(thresholds[x][1]))) for x in activations}


def quantize_weight(w: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """w [K, N] -> (values [K, N] in int8 or float8 E4M3, scales [N] in w's dtype): symmetric, one
    scale per output channel (column)."""
    import ml_dtypes

    w32 = w.astype(np.float32)
    scale = _scale(np.max(np.abs(w32), axis=0), kind, helper.np_dtype_to_tensor_dtype(w.dtype))
    scaled = np.clip(w32 / scale.astype(np.float32), -QMAX[kind], QMAX[kind])
    if kind == "int8":
        return np.rint(scaled).astype(np.int8), scale
    return scaled.astype(ml_dtypes.float8_e4m3fn), scale  # rounds to nearest even


def _scale(magnitude, kind: str, elem: int) -> np.ndarray:
    """The scale mapping +-magnitude onto the type's range, in the float type elem; 1 for an all-zero
    tensor or channel (its values quantize to 0 either way)."""
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    r = np.asarray(magnitude, dtype=np.float64)
    # a range too small for the type's smallest scale keeps that one (an fp16 scale must not round to 0)
    scale = np.where(r > 0, np.maximum(r / QMAX[kind], np.finfo(dtype).smallest_subnormal), 1.0)
    return scale.astype(dtype)


def _zeros(name: str, kind: str, shape) -> TensorProto:
    if kind == "int8":
        return numpy_helper.from_array(np.zeros(shape, np.int8), name)
    import ml_dtypes

    return numpy_helper.from_array(np.zeros(shape, ml_dtypes.float8_e4m3fn), name)


def _quantize_activations(model: onnx.ModelProto, matmuls: set[str], scales: dict, kind: str) -> None:
    """QuantizeLinear -> DequantizeLinear on each rewritten MatMul's input activation, once per
    activation, placed before its first consumer."""
    graph = model.graph
    nodes, made = [], {}  # activation -> its DequantizeLinear's output
    for node in graph.node:
        if node.name in matmuls:
            x = node.input[0]
            if x not in made:
                base = x
                scale = numpy_helper.from_array(np.asarray(scales[x]), f"{base}_scale")
                zero = _zeros(f"{base}_zero_point", kind, ())
                graph.initializer.extend([scale, zero])
                q, dq = f"{base}_QuantizeLinear_Output", f"{base}_DequantizeLinear_Output"
                nodes.append(
                    helper.make_node(
                        "QuantizeLinear", [x, scale.name, zero.name], [q], name=f"{base}_QuantizeLinear"
                    )
                )
                nodes.append(
                    helper.make_node(
                        "DequantizeLinear", [q, scale.name, zero.name], [dq], name=f"{base}_DequantizeLinear"
                    )
                )
                made[x] = dq
            node.input[0] = made[x]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
