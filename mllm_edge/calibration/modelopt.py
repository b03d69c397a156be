"""The tensorrt target: NVIDIA Model Optimizer's ONNX post-training quantization, calibrated on CPU
through ONNX Runtime on the recorded calls. Its output is standard ONNX Q/DQ that TensorRT parses:

  int4-awq  DequantizeLinear(int4 weight, blocked scales) -> MatMul; opset 21; no zero points
  int8      Q/DQ on each selected MatMul's activation (per tensor) and weight (per channel)
  fp8       the same in FLOAT8E4M3FN

calibrate runs int4-awq through awq.py (the library's algorithm, one weight at a time: its driver
here holds the whole graph several times over); the driver's int4 path stays for the test that
compares the two.

Only the selected weight MatMuls are quantized (attention's activation x activation MatMuls, norms
and the rest keep the bundle's float type), and the graph keeps the bundle's dtype at its inputs and
outputs. Installed by the `calibrate` extra, without Model Optimizer's `[onnx]` extra (that pins
onnxruntime-gpu and CUDA wheels on x86): see pyproject.toml.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
from pathlib import Path
from typing import Callable

import onnx

from ..errors import MllmEdgeError
from .precisions import Precision
from .record import RecordedReader
from .rewrite import gemms_to_matmuls, load_weights, save_graph

HIGH_PRECISION = {"float32": "fp32", "float16": "fp16"}  # Model Optimizer's names for the float part
INSTALL = "pip install 'mllm-edge[calibrate]'"


def require_modelopt() -> str:
    """Model Optimizer's version, or a clear error naming the install."""
    try:
        with _quiet():
            import modelopt
            import modelopt.onnx.quantization  # noqa: F401  (its [onnx] dependencies import here)
    except ImportError as e:
        raise MllmEdgeError(
            f"--target tensorrt needs NVIDIA Model Optimizer's ONNX quantizer ({e}): {INSTALL}"
        ) from None
    return modelopt.__version__


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
        with _quiet():
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


@contextlib.contextmanager
def _quiet():
    """Model Optimizer logs through its own handlers and draws tqdm bars; our progress bar is the user's."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        # its prints of histogram bins and its tqdm bars
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
