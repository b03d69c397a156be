"""Backends open a bundle's graphs behind one small interface (`base.Backend`, `base.Engine`)."""

from __future__ import annotations

from pathlib import Path

from ...errors import MllmEdgeError
from ...manifest import Manifest, verify_bundle_files
from .base import Backend, Engine

BACKENDS = ("onnxruntime", "tensorrt")

__all__ = ["BACKENDS", "Backend", "Engine", "choose_backend", "open_backend"]


def choose_backend(folder: Path) -> str:
    """What `auto` means: TensorRT where it imports, a GPU answers and engines for it exist; else ONNX Runtime."""
    from .tensorrt import engines_for_this_machine

    return "tensorrt" if engines_for_this_machine(folder) else "onnxruntime"


def open_backend(
    name: str, folder: Path, manifest: Manifest, device: str = "cpu", low_memory: bool = False
) -> Backend:
    """Open the bundle with the named backend, after checking the files it reads against the
    manifest's sha256 (a TensorRT run reads no ONNX file: its engines are checked against engines.json
    instead). Heavy imports happen only here. low_memory (ONNX Runtime only): sessions that keep
    the weights mapped from their files, slower (calibrate's recording of a big fp16 bundle)."""
    if name == "auto":
        name = choose_backend(folder)
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend as chosen
    elif name == "tensorrt":
        from .tensorrt import TensorRTBackend as chosen
    else:
        raise MllmEdgeError(f"unknown backend '{name}' (choose from auto, {', '.join(BACKENDS)})")
    verify_bundle_files(folder, manifest, chosen.files_read(manifest))
    if low_memory:
        if name != "onnxruntime":
            raise MllmEdgeError(f"low-memory sessions are ONNX Runtime's, not {name}'s")
        return chosen(folder, manifest, device, low_memory=True)
    return chosen(folder, manifest, device)
