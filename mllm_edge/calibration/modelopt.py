"""NVIDIA Model Optimizer, installed by the `calibrate` extra without its `[onnx]` extra (that pins
onnxruntime-gpu and CUDA wheels on x86): see pyproject.toml. int4-awq uses its AWQ-clip pieces
(awq.py); int8 and fp8 need only ONNX Runtime (qdq.py). Its whole-graph driver is the reference the
tests compare both with (tests/modelopt_driver.py).
"""

from __future__ import annotations

import contextlib
import io
import logging

from ..errors import MllmEdgeError

INSTALL = "pip install 'mllm-edge[calibrate]'"


def require_modelopt() -> str:
    """Model Optimizer's version, or a clear error naming the install."""
    try:
        with quiet():
            import modelopt
            import modelopt.onnx.quantization  # noqa: F401  (its [onnx] dependencies import here)
    except ImportError as e:
        raise MllmEdgeError(
            f"--target tensorrt needs NVIDIA Model Optimizer's ONNX quantizer ({e}): {INSTALL}"
        ) from None
    return modelopt.__version__


@contextlib.contextmanager
def quiet():
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
