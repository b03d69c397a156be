"""The TensorRT backend's behaviour around TensorRT and CUDA, with fakes of their objects.

No engine is built or run here (TensorRT cannot be installed on these machines): the fakes stand for
the API's documented answers (None from create_execution_context when memory runs out, Polygraphy's
exception on a CUDA error, ...) so that what our code does with them is checked.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mllm_edge.errors import MllmEdgeError
from mllm_edge.runtime.backends import tensorrt as backend

PROFILES = [
    {"name": "prefill", "shapes": {"x": [[1, 2], [1, 8], [1, 16]]}},  # decode shapes fit only decode
    {"name": "decode", "shapes": {"x": [[1, 1], [1, 1], [1, 1]]}},
]


class FakeTrt:
    class TensorIOMode:
        INPUT, OUTPUT = "input", "output"

    class DataType:
        FLOAT, BF16 = "float", "bf16"

    @staticmethod
    def nptype(dtype):
        return {"float": np.float32}[dtype]


class FakeContext:
    def __init__(self, log):
        self.log, self.shapes = log, {}

    def set_optimization_profile_async(self, profile, stream):
        self.log.append(("profile", id(self), profile))
        return True

    def set_input_shape(self, name, shape):
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name, address):
        return True

    def get_tensor_shape(self, name):
        return self.shapes["x"]

    def execute_async_v3(self, stream):
        self.log.append(("run", id(self)))
        return True


class FakeEngine:
    def __init__(self, contexts_available=9, dtype="float", memory=512 << 20):
        self.available, self.dtype, self.device_memory_size_v2 = contexts_available, dtype, memory
        self.log, self.num_io_tensors = [], 2

    def get_tensor_name(self, i):
        return ["x", "y"][i]

    def get_tensor_mode(self, name):
        return "input" if name == "x" else "output"

    def get_tensor_dtype(self, name):
        return self.dtype

    def create_execution_context(self):
        if self.available == 0:
            return None
        self.available -= 1
        return FakeContext(self.log)


class FakeMemory:
    stream = SimpleNamespace(ptr=7)

    def malloc(self, nbytes):
        return 4096

    def free(self, address):
        pass

    def copy(self, dst, src, nbytes, kind="DeviceToDevice"):
        pass

    def synchronize(self):
        pass


def engine_with(monkeypatch, fake: FakeEngine, **kwargs) -> backend.TensorRTEngine:
    logger = SimpleNamespace(errors=["out of memory"])
    monkeypatch.setattr(backend, "load_engine", lambda path: (FakeTrt, fake, logger))
    return backend.TensorRTEngine(Path("llm_tail.engine"), PROFILES, FakeMemory(), **kwargs)


def test_no_memory_for_an_execution_context_is_a_clear_error(monkeypatch):
    with pytest.raises(
        MllmEdgeError, match=r"llm_tail engine: it needs 512 MB of device memory.*out of memory"
    ):
        engine_with(monkeypatch, FakeEngine(contexts_available=0))


def test_one_context_per_profile_so_prefill_and_decode_never_switch(monkeypatch):
    fake = FakeEngine()
    engine = engine_with(monkeypatch, fake)
    assert len(engine.contexts) == 2 and engine.activation_bytes == 2 * (512 << 20)
    for length in (5, 1, 7, 1):  # prefill, decode, prefill, decode
        engine.run({"x": np.zeros((1, length), np.float32)})
    profiles = [e for e in fake.log if e[0] == "profile"]
    assert profiles == [("profile", id(engine.contexts[1]), 1)]  # set once, when made
    runs = [e[1] for e in fake.log if e[0] == "run"]
    assert runs == [id(engine.contexts[i]) for i in (0, 1, 0, 1)]


def test_where_memory_allows_one_context_only_it_switches_profiles(monkeypatch):
    fake = FakeEngine(contexts_available=1)
    engine = engine_with(monkeypatch, fake)
    assert len(engine.contexts) == 1 and engine.activation_bytes == 512 << 20
    for length in (5, 1, 1, 7):
        engine.run({"x": np.zeros((1, length), np.float32)})
    assert [e[2] for e in fake.log if e[0] == "profile"] == [1, 0]  # decode, then prefill again
    shared = engine_with(monkeypatch, FakeEngine(), context_per_profile=False)
    assert len(shared.contexts) == 1


def test_bf16_engine_tensors_are_refused_plainly(monkeypatch):
    with pytest.raises(MllmEdgeError, match="bf16.*numpy has no bfloat16.*--dtype fp16"):
        engine_with(monkeypatch, FakeEngine(dtype="bf16"))


class PolygraphyException(Exception):
    """What Polygraphy's logger raises after a critical message."""


def fake_cuda(wrapper):
    return SimpleNamespace(
        wrapper=wrapper, Stream=lambda: SimpleNamespace(ptr=1), MemcpyKind=SimpleNamespace()
    )


def test_cuda_failures_become_errors_that_say_what_to_do(monkeypatch):
    def no_libcudart():
        raise OSError("libcudart.so: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(backend, "_cuda", lambda: fake_cuda(no_libcudart))
    with pytest.raises(
        MllmEdgeError, match="CUDA runtime cannot be used.*libcudart.so: cannot open.*LD_LIBRARY_PATH"
    ):
        backend.CudaMemory()

    class OutOfMemory:
        def malloc(self, nbytes):
            raise PolygraphyException("CUDA Error: 2. To figure out what this means, ...")

    monkeypatch.setattr(backend, "_cuda", lambda: fake_cuda(OutOfMemory))
    memory = backend.CudaMemory()
    with pytest.raises(MllmEdgeError, match=r"no 3072 MB left.*CUDA Error: 2.*--max-context"):
        memory.malloc(3 << 30)


def test_the_driver_fallback_leaves_no_released_context_current(monkeypatch):
    """Target detection without cuda-python: the primary context is pushed for the memory query and
    popped before it is released (a released context left current would break later CUDA calls)."""
    from mllm_edge import engines

    calls = []

    class FakeLibcuda:
        def __getattr__(self, name):
            def call(*args):
                calls.append(name)
                if name == "cuDeviceGetName":
                    args[0].value = b"Orin"
                elif name == "cuDeviceGetAttribute":
                    args[0]._obj.value = 8 if args[1] == 75 else 7
                elif name == "cuMemGetInfo_v2":
                    args[0]._obj.value, args[1]._obj.value = 1 << 30, 8 << 30
                return 0

            return call

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibcuda())
    assert engines._cuda_device_ctypes() == ("Orin", (8, 7), 8 << 30, 1 << 30)
    query = calls[calls.index("cuDevicePrimaryCtxRetain") :]
    assert query == [
        "cuDevicePrimaryCtxRetain",
        "cuCtxPushCurrent_v2",
        "cuMemGetInfo_v2",
        "cuCtxPopCurrent_v2",
        "cuDevicePrimaryCtxRelease_v2",
    ]


def test_a_pip_installed_cuda_runtime_is_found(tmp_path, monkeypatch):
    """Desktop installs with CUDA from pip only: `nvidia-cuda-runtime-cu12` puts libcudart.so.12 under
    site-packages/nvidia/cuda_runtime/lib with no unversioned name. The Polygraphy we require
    (>= 0.53.4, pyproject) looks there; this loads its wrapper over a fake tree and sees which file
    it opens."""
    from polygraphy.cuda import cuda

    site = tmp_path / "site-packages"
    lib = site / "nvidia" / "cuda_runtime" / "lib"
    lib.mkdir(parents=True)
    (lib / "libcudart.so.12").write_bytes(b"")
    monkeypatch.setattr("sys.path", [str(site)])
    monkeypatch.setenv("LD_LIBRARY_PATH", "")
    opened = []
    monkeypatch.setattr(ctypes, "CDLL", lambda path: opened.append(path) or object())
    system = ("/usr/local/cuda/lib64", "/usr/lib", "/lib")  # a desktop with CUDA from pip only has none
    find = cuda.util.find_in_dirs
    monkeypatch.setattr(
        cuda.util, "find_in_dirs", lambda pattern, dirs: find(pattern, [d for d in dirs if d not in system])
    )
    cuda.Cuda()
    assert opened == [str(lib / "libcudart.so.12")]


def test_each_backend_checks_only_the_files_it_reads(export_cache, tmp_path):
    """A TensorRT run reads the tokenizer and its engines, never the ONNX files (about 14 GB for a 7B
    fp16 bundle): those are not hashed at its start. ONNX Runtime checks its graphs as before."""
    import shutil

    from mllm_edge.manifest import load_manifest, verify_bundle_files
    from mllm_edge.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from mllm_edge.runtime.pipeline import Pipeline

    source, _ = export_cache("llama_gqa", "fastv")
    folder = tmp_path / "bundle"
    shutil.copytree(source, folder)
    manifest = load_manifest(folder)
    trt_files = backend.TensorRTBackend.files_read(manifest)
    assert trt_files and all(f.startswith("tokenizer/") for f in trt_files)
    assert set(OnnxRuntimeBackend.files_read(manifest)) == set(trt_files) | set(manifest.graph_files())
    data = folder / manifest.graphs["llm_tail"].data_files[0]
    damaged = bytearray(data.read_bytes())
    damaged[0] ^= 1
    data.write_bytes(bytes(damaged))
    verify_bundle_files(folder, manifest, trt_files)  # TensorRT's start is not slowed by the ONNX files
    with pytest.raises(MllmEdgeError, match=r"llm_tail.onnx.data does not match its sha256"):
        Pipeline.load(folder, backend="onnxruntime")
    (folder / trt_files[0]).write_text("changed")
    with pytest.raises(MllmEdgeError, match=f"{trt_files[0]} does not match its sha256"):
        verify_bundle_files(folder, manifest, trt_files)
