"""Backends that run one graph each behind the same small interface (`base.Engine`)."""

from __future__ import annotations

from pathlib import Path

from ...errors import MllmEdgeError
from .base import Engine

BACKENDS = ("onnxruntime", "tensorrt")


def load_engine(backend: str, path: Path, device: str = "cpu") -> Engine:
    """Open one graph file with the named backend; heavy imports happen only here."""
    if backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(path, device)
    if (
        backend == "tensorrt"
    ):  # engines come as a set, with their device cache: see Pipeline and backends.tensorrt
        raise MllmEdgeError(
            "TensorRT engines are opened per bundle (Pipeline.load(bundle, backend='tensorrt')), not per graph"
        )
    raise MllmEdgeError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
