"""int4-awq for the tensorrt target: Model Optimizer's AWQ-clip, run one weight at a time on our
recorded calls.

Model Optimizer's own driver (`modelopt.onnx.quantization.quantize(quantize_mode="int4")`) holds
the whole graph several times over (the proto, its deep copy, the ONNX Runtime session's weights)
and runs the whole graph on every calibration call once per weight: on the ~1B model's 1.2 GB
`llm_tail` it took 10 GB and would have run about 2 hours on 2 cores (docs/calibration.md). Here
the same algorithm in three steps, none holding the graph's weights beyond their mapped file:

1. capture: one unoptimised ONNX Runtime session over the source graph (its weights stay mapped
   from the data file), the selected weights' input activations as extra outputs, each recorded
   call run once to count rows and once to keep of each activation only the rows AWQ-clip reads:
   `MAX_TOKENS` evenly spaced over all calls' rows, the library's choice (`_clip_search`); one
   call's activations are held at a time (a 7B's 600-token prefill: about 0.9 GB in fp16);
2. search: per weight, read from its file, the library's alpha grid and choice (`AWQClipHelper`)
   and its quantizer (`quant_tensor`, `dq_tensor`); only the loss is computed here, as one batched
   product over blocks of the weight's rounding error (the library's broadcast product holds
   columns x tokens x K floats at once and re-quantizes the whole weight per 1024 columns);
3. write: DequantizeLinear(int4 weight [K, N], scales [K / block, N], axis 0, block) -> MatMul,
   what the library writes (the int4 tensors, about a quarter of the fp16 bytes, held until
   then), with the unquantized weights copied from the source a few at a time.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import MllmEdgeError
from .record import replay
from .rewrite import gemms_to_matmuls, save_graph, selected_gemms, weight_array

MAX_TOKENS = 64  # rows of each weight's input the clip search reads (Model Optimizer's default)
OPSET = 21  # blocked DequantizeLinear and INT4

Progress = Callable[[str, int, int], None]


def quantize_graph(
    source: Path,
    dest: Path,
    name: str,
    block_size: int,
    select: Callable[[str], bool],
    calls: list[Path],
    progress: Progress = lambda stage, done, total: None,
) -> dict:
    """source/name.onnx with its selected weights in int4-awq, into dest/name.onnx; returns the
    manifest's entry."""
    from .modelopt import require_modelopt

    version = require_modelopt()
    if not calls:
        raise MllmEdgeError(f"no recorded calls of the {name} graph to calibrate on")
    model = onnx.load(str(source / f"{name}.onnx"), load_external_data=False)
    inits, gemms = selected_gemms(model, name, select)
    inputs = {}  # weight -> the activation it multiplies (its first Gemm's, if several share it)
    for x, weight in gemms:
        inputs.setdefault(weight, x)

    # [N, K] weights: each activation's K, and its type (a Gemm's A and B have one)
    types = {x: (inits[w].dims[1], inits[w].data_type) for w, x in inputs.items()}
    path = source / f"{name}.onnx"
    rows = capture(model, path, types, calls, lambda done, total: progress(f"capture {name}", done, total))

    quantized = {}  # weight -> its int4 [K, N] (packed two a byte) and scales [K / block, N]
    for i, (weight, x) in enumerate(inputs.items()):
        progress(f"quantize {name}", i, len(inputs))
        w = np.ascontiguousarray(weight_array(inits[weight], source).T)  # MatMul's [K, N]
        q, scales = quantize_weight(w, block_size, clip_search(rows[x], w, block_size))
        quantized[weight] = [
            numpy_helper.from_array(q, f"{weight}.T_i4"),
            numpy_helper.from_array(scales, f"{weight}.T_scale"),
        ]
        del w, q
    progress(f"quantize {name}", len(inputs), len(inputs))
    del rows

    def operand(weight: str):  # once per weight, however many Gemms share it
        tensors = quantized.pop(weight)
        out = f"{weight}.T_dequantized"
        dq = helper.make_node(
            "DequantizeLinear",
            [t.name for t in tensors],
            [out],
            name=f"{weight}.T_DequantizeLinear",
            axis=0,
            block_size=block_size,
        )
        return out, tensors, [dq]

    gemms_to_matmuls(model, source, lambda w: w in inputs, operand)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, OPSET)
    save_graph(model, dest, name, source)
    return {"weights": sorted(inputs), "library": f"nvidia-modelopt {version} (awq_clip, per weight)"}


def capture(
    model: onnx.ModelProto,
    path: Path,
    types: dict[str, tuple[int, int]],
    calls: list[Path],
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> dict[str, np.ndarray]:
    """Activation name -> the [rows, K] float32 rows AWQ-clip reads of it over all recorded calls:
    every step-th row of their concatenation, step = max(1, rows // MAX_TOKENS). types: activation
    name -> (K, ONNX element type)."""
    dims = {x: k for x, (k, _) in types.items()}
    elems = {x: elem for x, (_, elem) in types.items()}
    counts = []  # rows of each activation per call
    for i, got in enumerate(replay(model, path, elems, calls)):
        counts.append({x: got[x].size // k for x, k in dims.items()})
        progress(i + 1, 2 * len(calls))
    kept = {x: [] for x in dims}
    offset = dict.fromkeys(dims, 0)
    step = {x: max(1, sum(c[x] for c in counts) // MAX_TOKENS) for x in dims}
    for i, got in enumerate(replay(model, path, elems, calls)):
        for x, k in dims.items():
            values = got[x].reshape(-1, k)
            first = -offset[x] % step[x]  # the first row of this call on the global grid
            kept[x].append(values[first :: step[x]].astype(np.float32))
            offset[x] += values.shape[0]
        del got
        progress(len(calls) + i + 1, 2 * len(calls))
    return {x: np.concatenate(parts) for x, parts in kept.items()}


def clip_search(x: np.ndarray, w: np.ndarray, block_size: int) -> np.ndarray:
    """AWQ-clip: per block of w's columns, the alpha of Model Optimizer's grid whose clipped
    int4 rounding changes x @ w least (mean squared error over x's rows). x [t, K], w [K, N]."""
    from modelopt.onnx.quantization.int4 import AWQClipHelper
    from modelopt.onnx.quantization.quant_utils import dq_tensor, quant_tensor

    found = AWQClipHelper(w, block_size)
    k, n = w.shape
    blocks = k // block_size
    xb = x.reshape(-1, blocks, block_size).transpose(1, 2, 0)  # blocks, block, t
    exact = w.astype(np.float32)
    for alpha in found.loss:
        q, scales, _ = quant_tensor(w, block_size, alpha=alpha)
        error = exact - dq_tensor(q, scales, block_size).astype(np.float32)  # K, N
        per_block = np.matmul(error.reshape(blocks, block_size, n).transpose(0, 2, 1), xb)  # blocks, N, t
        found.loss[alpha] = np.mean(np.square(per_block), axis=2).T  # N, blocks: the library's layout
    found.update_best_params()
    return found.best_alpha


def quantize_weight(w: np.ndarray, block_size: int, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int4 [K, N], scales [K / block, N] in w's dtype) with the chosen clipping per block."""
    import ml_dtypes
    from modelopt.onnx.quantization.quant_utils import quant_tensor

    q, scales, _ = quant_tensor(w, block_size, alpha=alphas)
    if math.prod(q.shape) % 2:
        raise MllmEdgeError("an int4 weight needs an even number of elements (TensorRT packs two a byte)")
    return np.asarray(q).astype(ml_dtypes.int4), np.asarray(scales).astype(w.dtype)
