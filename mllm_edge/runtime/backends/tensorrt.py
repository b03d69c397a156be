"""TensorRT backend: one engine per graph, run with execute_async_v3 on one CUDA stream.

Inputs and outputs are host numpy arrays (staged through device buffers of this engine) or
DeviceTensors, bound by address as they are: that is how the device KV cache (runtime.device_cache)
is read in place and written into its slots. The optimization profile is picked per call from the
input shapes (prefill or decode, see build.profiles). Device memory and copies go through
Polygraphy's CUDA wrapper (plain ctypes over libcudart): no torch, no PyCUDA.

Never run in this repository's CI: TensorRT and a GPU are needed (docs/tensorrt.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...engines import (
    ENGINES_DIR,
    ENGINES_META,
    engine_folder,
    gpu_info,
    import_tensorrt,
    load_engine,
    load_engine_set,
)
from ...errors import MllmEdgeError
from ...manifest import Manifest
from ..device_cache import DeviceKVCache, DeviceTensor
from .base import BackendResources


def _cuda():
    try:
        from polygraphy import cuda
    except ImportError:
        raise MllmEdgeError(
            "the TensorRT backend needs Polygraphy's CUDA wrapper: pip install 'mllm-edge[tensorrt]'"
        ) from None
    return cuda


class CudaMemory:
    """device_cache's memory interface on the GPU, ordered on one stream."""

    def __init__(self, stream=None):
        self.cuda = _cuda()
        self.wrapper = self.cuda.wrapper()
        self.stream = stream or self.cuda.Stream()

    def malloc(self, nbytes: int) -> int:
        """nbytes of zeroed device memory (the device cache's null rows must read as zeros)."""
        address = self.wrapper.malloc(max(nbytes, 1))
        self.memset(address, 0, max(nbytes, 1))
        return address

    def free(self, address: int) -> None:
        self.wrapper.free(address)

    def memset(self, address: int, value: int, nbytes: int) -> None:
        import ctypes  # typed arguments: untyped ctypes ints would be truncated to 32 bits

        status = self.wrapper.handle.cudaMemsetAsync(
            ctypes.c_void_p(address),
            ctypes.c_int(value),
            ctypes.c_size_t(nbytes),
            ctypes.c_void_p(self.stream.ptr),
        )
        if status != 0:
            raise MllmEdgeError(f"cudaMemsetAsync failed with CUDA error {status}")

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        self.wrapper.memcpy(dst, src, nbytes, self.cuda.MemcpyKind.DeviceToDevice, self.stream.ptr)


def pick_profile(profiles: list[dict], shapes: dict[str, tuple[int, ...]]) -> int:
    """The first profile (engines.json order) whose [min, max] holds every given input shape."""
    for i, p in enumerate(profiles):
        ok = True
        for name, (low, _, high) in p["shapes"].items():
            shape = shapes.get(name)
            if (
                shape is None
                or len(shape) != len(low)
                or any(not lo <= d <= hi for d, lo, hi in zip(shape, low, high))
            ):
                ok = False
                break
        if ok:
            return i
    raise MllmEdgeError(
        f"no optimization profile of the engine takes these shapes {shapes}: rebuild with a larger --max-context"
    )


class TensorRTEngine:
    def __init__(self, path: Path, profiles: list[dict], memory: CudaMemory):
        self.trt, self.engine, self.logger = load_engine(path)
        self.name, self.profiles, self.memory = path.stem, profiles, memory
        self.context = self.engine.create_execution_context()
        mode = self.trt.TensorIOMode.INPUT
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.dtypes = {
            n: np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(n))) for n in names
        }  # fixed: not per call
        self.staging: dict[str, tuple[int, int]] = {}  # name -> (address, capacity in bytes)
        self.active_profile = 0

    def _why(self) -> str:
        return "; ".join(self.logger.errors[-3:]) or "no message from TensorRT"

    def _bind(self, name: str, address: int) -> None:
        if not self.context.set_tensor_address(name, address):  # unknown name or a misaligned address
            raise MllmEdgeError(f"{self.name}: TensorRT refused the address of {name} ({self._why()})")

    def _stage(self, name: str, nbytes: int) -> int:
        address, capacity = self.staging.get(name, (0, 0))
        if nbytes > capacity:
            if address:
                self.memory.free(address)
            address, capacity = self.memory.malloc(max(nbytes, 256)), max(nbytes, 256)
            self.staging[name] = (address, capacity)
        return address

    def run(self, inputs: dict, outputs: dict | None = None) -> dict[str, np.ndarray]:
        cuda, stream = self.memory.cuda, self.memory.stream
        outputs = outputs or {}
        shapes = {n: tuple(inputs[n].shape) for n in self.input_names}
        profile = pick_profile(self.profiles, shapes) if self.profiles else 0
        if profile != self.active_profile:
            self.context.set_optimization_profile_async(profile, stream.ptr)
            self.active_profile = profile
        for name in self.input_names:
            value = inputs[name]
            if not self.context.set_input_shape(name, shapes[name]):
                raise MllmEdgeError(
                    f"{self.name}: TensorRT refused shape {shapes[name]} for {name} ({self._why()})"
                )
            dtype = self.dtypes[name]
            if np.dtype(value.dtype) != dtype:
                raise MllmEdgeError(
                    f"{self.name}: input {name} is {np.dtype(value.dtype)}, the engine takes {dtype}"
                )  # our bug
            if isinstance(value, DeviceTensor):
                address = value.address
            else:
                host = np.ascontiguousarray(value)
                address = self._stage(name, host.nbytes)
                self.memory.wrapper.memcpy(
                    address, host.ctypes.data, host.nbytes, cuda.MemcpyKind.HostToDevice, stream.ptr
                )
            self._bind(name, address)
        returned = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if name in outputs:
                target = outputs[name]
                if tuple(target.shape) != shape:
                    raise MllmEdgeError(
                        f"{self.name}: output {name} is {shape}, its binding {tuple(target.shape)}"
                    )  # our bug
                self._bind(name, target.address)
            else:
                returned[name] = np.empty(shape, self.dtypes[name])
                self._bind(name, self._stage(name, returned[name].nbytes))
        if not self.context.execute_async_v3(stream.ptr):
            raise MllmEdgeError(f"TensorRT failed running the {self.name} engine ({self._why()})")
        for name, host in returned.items():
            address = self.staging[name][0]
            self.memory.wrapper.memcpy(
                host.ctypes.data, address, host.nbytes, cuda.MemcpyKind.DeviceToHost, stream.ptr
            )
        stream.synchronize()
        return returned

    def close(self) -> None:
        for address, _ in self.staging.values():
            self.memory.free(address)
        self.staging = {}
        self.context = self.engine = None  # TensorRT frees them with their last reference


class TensorRTBackend(BackendResources):
    """The engines `mllm-edge build` made for this GPU and TensorRT, on one CUDA stream; the KV cache
    in device memory, 256-byte aligned as TensorRT wants addresses."""

    name, device = "tensorrt", "cuda"

    def __init__(self, bundle: Path, manifest: Manifest):
        super().__init__()
        if manifest.quantization:
            raise MllmEdgeError(
                f"{bundle} holds {manifest.weights} weights for ONNX Runtime only: run it with --backend onnxruntime"
            )
        target = gpu_info(import_tensorrt().__version__)
        folder = engine_folder(bundle, target)
        if not (folder / ENGINES_META).is_file():
            others = sorted(p.parent.name for p in (bundle / ENGINES_DIR).glob(f"*/{ENGINES_META}"))
            found = f" (it has engines for {', '.join(others)} only)" if others else ""
            raise MllmEdgeError(
                f"{bundle} has no engines for this machine, {target.folder_name}{found}: run `mllm-edge build {bundle}`"
            )
        meta = load_engine_set(folder, bundle, target)
        missing = set(manifest.graphs) - set(meta.engines)
        if missing:
            raise MllmEdgeError(
                f"the engines in {folder} lack {', '.join(sorted(missing))}: rebuild with `mllm-edge build {bundle}`"
            )
        self.max_context, self.memory = meta.max_context, CudaMemory()
        try:
            for graph, entry in meta.engines.items():
                self.engines[graph] = TensorRTEngine(folder / entry.file, entry.profiles, self.memory)
        except BaseException:
            self.close()
            raise

    def new_cache(self, num_layers: int, split: int, kv_heads: int, head_dim: int, dtype) -> DeviceKVCache:
        return self._keep(
            DeviceKVCache(self.memory, num_layers, split, self.max_context, kv_heads, head_dim, dtype)
        )


def engines_for_this_machine(bundle: Path) -> bool:
    """Whether `auto` should pick TensorRT: it imports, a GPU answers, and engines for it exist."""

    try:
        import tensorrt

        return (engine_folder(bundle, gpu_info(tensorrt.__version__)) / ENGINES_META).is_file()
    except Exception:  # no TensorRT, no GPU, a CUDA library that fails: not this backend's machine
        return False
