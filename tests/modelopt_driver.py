"""NVIDIA Model Optimizer's own whole-graph ONNX PTQ driver on one graph of a bundle: the reference
calibrate's lean paths (calibration/awq.py, calibration/qdq.py) are tested against, on the same
recorded calls. Not used by calibrate itself: on the ~1B model it held the graph many times over
(docs/calibration.md).

Only the selected weight MatMuls are quantized (attention's activation x activation MatMuls, norms
and the rest keep the bundle's float type).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from mllm_edge.calibration.modelopt import quiet, require_modelopt
from mllm_edge.calibration.precisions import Precision
from mllm_edge.calibration.record import load_call
from mllm_edge.calibration.rewrite import gemms_to_matmuls, load_weights, save_graph
from mllm_edge.errors import MllmEdgeError

HIGH_PRECISION = {"float32": "fp32", "float16": "fp16"}  # Model Optimizer's names for the float part


def quantize_graph(
    source: Path,
    dest: Path,
    name: str,
    precision: Precision,
    select: Callable[[str], bool],
    calls: list[Path],
    block_size: int | None,
    dtype: str,
    work: Path,
) -> dict:
    """source/name.onnx quantized on its recorded calls into dest/name.onnx; returns the manifest's entry."""
    version = require_modelopt()
    from modelopt.onnx.quantization import quantize
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    model = onnx.load(str(source / f"{name}.onnx"), load_external_data=False)
    selected = gemms_to_matmuls(model, source, select)
    if not selected:
        raise MllmEdgeError(f"the {name} graph has no weight matrix to quantize (all excluded?)")
    load_weights(model, source)
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / "in.onnx"), save_as_external_data=True, location="in.onnx.data")
    others = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.name not in selected]
    del model

    reader = type("Reader", (RecordedReader, CalibrationDataReader), {})(calls)
    exact = lambda names: [f"^{re.escape(n)}$" for n in names]  # its node lists are regular expressions
    options = dict(
        quantize_mode="int4" if precision.name == "int4-awq" else precision.name,
        calibration_method=precision.method,
        calibration_data_reader=reader,
        calibration_eps=["cpu"],
        output_path=str(folder / "out.onnx"),
        use_external_data_format=True,
        high_precision_dtype=HIGH_PRECISION[dtype],
        log_level="ERROR",
        nodes_to_exclude=exact(others),
    )
    if precision.name == "int4-awq":
        options["block_size"] = block_size
    else:  # the selected MatMuls only; attention's are not quantized (TensorRT fuses them itself)
        options.update(
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=exact(selected),
            disable_mha_qdq=True,
            dq_only=True,  # weights stored quantized (DequantizeLinear of an int8 or fp8 initializer)
        )
    try:
        with quiet():
            quantize(str(folder / "in.onnx"), **options)
    except Exception as e:  # the library's many kinds; its version is what a user can act on
        raise MllmEdgeError(
            f"NVIDIA Model Optimizer {version} failed on the {name} graph: {type(e).__name__}: {e}"
        ) from e
    quantized = onnx.load(str(folder / "out.onnx"))
    save_graph(quantized, dest, name)
    del quantized
    shutil.rmtree(folder, ignore_errors=True)
    return {"weights": sorted(set(selected.values())), "library": f"nvidia-modelopt {version}"}


class RecordedReader:
    """The recorded inputs of one graph, in ONNX Runtime's CalibrationDataReader interface (what the
    driver reads): get_next() until None, rewind(), get_first()."""

    def __init__(self, files: list[Path]):
        if not files:
            raise MllmEdgeError("no recorded calls to calibrate on")
        self.files, self.position = list(files), 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.files):
            return None
        self.position += 1
        return load_call(self.files[self.position - 1])[0]

    def get_first(self) -> dict[str, np.ndarray]:
        return load_call(self.files[0])[0]

    def rewind(self) -> None:
        self.position = 0
