"""Backends open a bundle's graphs behind one small interface (`base.Backend`, `base.Engine`)."""

from __future__ import annotations

from pathlib import Path

from ...errors import MllmEdgeError
from ...manifest import Manifest
from .base import Backend, Engine

BACKENDS = ("onnxruntime", "tensorrt")

__all__ = ["BACKENDS", "Backend", "Engine", "choose_backend", "open_backend"]


def choose_backend(folder: Path) -> str:
    """What `auto` means: TensorRT where it imports, a GPU answers and engines for it exist; else ONNX Runtime."""
    from .tensorrt import engines_for_this_machine

    return "tensorrt" if engines_for_this_machine(folder) else "onnxruntime"


def open_backend(name: str, folder: Path, manifest: Manifest, device: str = "cpu") -> Backend:
    """Open the bundle with the named backend; heavy imports happen only here."""
    if name == "auto":
        name = choose_backend(folder)
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(folder, manifest, device)
    if name == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(folder, manifest)
    raise MllmEdgeError(f"unknown backend '{name}' (choose from auto, {', '.join(BACKENDS)})")
