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


CUDA_HINT = (
    "install the CUDA runtime (JetPack has it; on a desktop `pip install nvidia-cuda-runtime-cu12`) "
    "or put the folder holding libcudart.so on LD_LIBRARY_PATH"
)


def _cuda_failed(what: str, error: Exception) -> MllmEdgeError:
    """Polygraphy reports CUDA errors as its own exception (after logging them), ctypes as OSError."""
    detail = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return MllmEdgeError(f"CUDA failed {what}: {detail}")


class CudaMemory:
    """device_cache's memory interface on the GPU, ordered on one stream."""

    def __init__(self, stream=None):
        self.cuda = _cuda()
        try:
            self.wrapper = self.cuda.wrapper()
            self.stream = stream or self.cuda.Stream()
        except Exception as e:  # PolygraphyException, OSError: no libcudart, no driver, no GPU
            raise MllmEdgeError(
                f"the CUDA runtime cannot be used ({_cuda_failed('to start', e)}): {CUDA_HINT}"
            ) from None

    def malloc(self, nbytes: int) -> int:
        """nbytes of zeroed device memory (the device cache's null rows must read as zeros)."""
        try:
            address = self.wrapper.malloc(max(nbytes, 1))
        except Exception as e:
            raise MllmEdgeError(
                f"the GPU has no {max(nbytes, 1) / 2**20:.0f} MB left to allocate ({_cuda_failed('at cudaMalloc', e)}): "
                "close other programs on the GPU, or lower the context (mllm-edge build --max-context) "
                "or the weights (export --dtype fp16)"
            ) from None
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

    def copy(self, dst: int, src: int, nbytes: int, kind: str = "DeviceToDevice", stream=None) -> None:
        try:
            self.wrapper.memcpy(
                dst, src, nbytes, getattr(self.cuda.MemcpyKind, kind), (stream or self.stream).ptr
            )
        except Exception as e:
            raise _cuda_failed(f"copying {nbytes} bytes ({kind})", e) from None

    def synchronize(self) -> None:
        try:
            self.stream.synchronize()
        except Exception as e:
            raise _cuda_failed("on the stream (an engine's run or a copy)", e) from None


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


def numpy_dtype(trt, engine, name: str) -> np.dtype:
    """The numpy dtype of an engine tensor; bf16 has none (numpy lacks it), so it is refused plainly."""
    dtype = engine.get_tensor_dtype(name)
    if dtype == getattr(trt.DataType, "BF16", object()):
        raise MllmEdgeError(
            f"tensor {name} of the engine is bf16, which the runtime cannot pass (numpy has no bfloat16): "
            "export the bundle with --dtype fp16 (or fp32) and build again"
        )
    return np.dtype(trt.nptype(dtype))


def activation_bytes(engine) -> int:
    """The device memory one execution context of the engine needs for its activations."""
    size = getattr(engine, "device_memory_size_v2", None)  # TensorRT 10.1+
    return int(size if size is not None else getattr(engine, "device_memory_size", 0))


class TensorRTEngine:
    def __init__(
        self, path: Path, profiles: list[dict], memory: CudaMemory, context_per_profile: bool = True
    ):
        """context_per_profile: one execution context for each optimization profile, each set to its
        profile once, so switching between prefill and decode costs nothing; each context holds its
        own activation memory. Where that memory is not there, one context switches profiles."""
        self.trt, self.engine, self.logger = load_engine(path)
        self.name, self.profiles, self.memory = path.stem, profiles, memory
        self.contexts = [self._new_context(0)]
        if context_per_profile:
            for profile in range(1, max(len(profiles), 1)):
                context = self.engine.create_execution_context()
                if context is None:  # no memory for another: keep switching one context
                    self.logger.errors.clear()
                    self.contexts = self.contexts[:1]
                    break
                self._use_profile(context, profile)
                self.contexts.append(context)
        self.active_profile = 0  # of the shared context, when there is one
        mode = self.trt.TensorIOMode.INPUT
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.dtypes = {n: numpy_dtype(self.trt, self.engine, n) for n in names}  # fixed: not per call
        self.staging: dict[str, tuple[int, int]] = {}  # name -> (address, capacity in bytes)

    @property
    def activation_bytes(self) -> int:
        """Device memory the engine's execution contexts hold for activations."""
        return activation_bytes(self.engine) * len(self.contexts)

    def _new_context(self, profile: int):
        context = self.engine.create_execution_context()
        if context is None:  # TensorRT returns None when it cannot allocate the activation memory
            need = activation_bytes(self.engine) / 2**20
            raise MllmEdgeError(
                f"TensorRT cannot create an execution context for the {self.name} engine: it needs {need:.0f} MB of "
                f"device memory for activations ({self._why()}); close other programs on the GPU, or rebuild with a "
                "smaller --max-context"
            )
        if profile:
            self._use_profile(context, profile)
        return context

    def _use_profile(self, context, profile: int) -> None:
        if not context.set_optimization_profile_async(profile, self.memory.stream.ptr):
            raise MllmEdgeError(
                f"{self.name}: TensorRT refused optimization profile {profile} ({self._why()})"
            )

    def _context(self, profile: int):
        if len(self.contexts) > 1:
            return self.contexts[profile]
        context = self.contexts[0]
        if profile != self.active_profile:  # one context for every profile: switch (TensorRT re-plans)
            self._use_profile(context, profile)
            self.active_profile = profile
        return context

    def _why(self) -> str:
        return "; ".join(self.logger.errors[-3:]) or "no message from TensorRT"

    def _stage(self, name: str, nbytes: int) -> int:
        address, capacity = self.staging.get(name, (0, 0))
        if nbytes > capacity:
            if address:
                self.memory.free(address)
            address, capacity = self.memory.malloc(max(nbytes, 256)), max(nbytes, 256)
            self.staging[name] = (address, capacity)
        return address

    def run(self, inputs: dict, outputs: dict | None = None) -> dict[str, np.ndarray]:
        outputs = outputs or {}
        shapes = {n: tuple(inputs[n].shape) for n in self.input_names}
        context = self._context(pick_profile(self.profiles, shapes) if self.profiles else 0)

        def bind(name: str, address: int) -> None:
            if not context.set_tensor_address(name, address):  # unknown name or a misaligned address
                raise MllmEdgeError(f"{self.name}: TensorRT refused the address of {name} ({self._why()})")

        for name in self.input_names:
            value = inputs[name]
            if not context.set_input_shape(name, shapes[name]):
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
                self.memory.copy(address, host.ctypes.data, host.nbytes, "HostToDevice")
            bind(name, address)
        returned = {}
        for name in self.output_names:
            shape = tuple(context.get_tensor_shape(name))
            if name in outputs:
                target = outputs[name]
                if tuple(target.shape) != shape:
                    raise MllmEdgeError(
                        f"{self.name}: output {name} is {shape}, its binding {tuple(target.shape)}"
                    )  # our bug
                bind(name, target.address)
            else:
                returned[name] = np.empty(shape, self.dtypes[name])
                bind(name, self._stage(name, returned[name].nbytes))
        if not context.execute_async_v3(self.memory.stream.ptr):
            raise MllmEdgeError(f"TensorRT failed running the {self.name} engine ({self._why()})")
        for name, host in returned.items():
            self.memory.copy(host.ctypes.data, self.staging[name][0], host.nbytes, "DeviceToHost")
        self.memory.synchronize()
        return returned

    def close(self) -> None:
        for address, _ in self.staging.values():
            self.memory.free(address)
        self.staging = {}
        self.contexts, self.engine = [], None  # TensorRT frees them with their last reference


class TensorRTBackend(BackendResources):
    """The engines `mllm-edge build` made for this GPU and TensorRT, on one CUDA stream; the KV cache
    in device memory, 256-byte aligned as TensorRT wants addresses."""

    name, device = "tensorrt", "cuda"
    # the engines' profiles are prefill (empty past) and decode (one token): a follow-up prompt
    # prefills from scratch (its picture's vision output is still reused)
    extends_cache = False

    @staticmethod
    def files_read(manifest: Manifest) -> list[str]:
        """The tokenizer; the engines are checked against engines.json, and no ONNX file is read."""
        return manifest.tokenizer_files()

    def __init__(self, bundle: Path, manifest: Manifest, device: str = "cuda"):
        super().__init__()
        if "tensorrt" not in manifest.backends:
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
