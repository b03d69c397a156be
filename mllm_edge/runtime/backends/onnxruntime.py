"""ONNX Runtime backend: CPU, or CUDA when onnxruntime-gpu is installed.

Inputs and preallocated outputs are bound by pointer (IO binding), so cache views are read and
written where they lie. Numpy arrays are host memory (on CUDA, ONNX Runtime copies them across:
the small per-step inputs and outputs); a `DeviceTensor` is memory of the session's device, bound
as it is. On CUDA the KV cache is such device memory (`OrtDeviceMemory` below, behind
runtime.device_cache), so a decode step neither uploads the past nor downloads the new rows.
"""

from __future__ import annotations

import functools
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ...errors import MllmEdgeError
from ...manifest import FUSED_SUFFIX, GraphSpec, Manifest
from ..cache import KVCache
from ..device_cache import DeviceKVCache, DeviceTensor
from .base import BackendResources


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise MllmEdgeError(
            "the onnxruntime backend needs ONNX Runtime: pip install 'mllm-edge[onnxruntime]' (or [onnxruntime-gpu])"
        ) from None
    return onnxruntime


ARENA_MAX_WEIGHTS = 128 * 2**20  # graphs with more weight bytes run without the CPU arena


def lacks_avx512(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo's text is an x86 CPU's with AVX2 but not AVX-512 (an AMD EPYC of the
    Zen 3 generation, for one)."""
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    names = set(flags[1].split()) if flags else set()
    return "avx2" in names and "avx512f" not in names


@functools.cache
def _x86_without_avx512() -> bool:
    try:
        return lacks_avx512(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux: pack, as ONNX Runtime does by default
        return False


def prepacks(manifest: Manifest, graph: str, device: str = "cpu") -> bool:
    """Whether ONNX Runtime prepacks this graph's weights when its session opens.

    On an x86 Linux CPU without AVX-512 an fp32 LLM graph goes without: its Gemms then read the
    weights where the data file is mapped instead of from a packed copy in fresh memory. On the AMD
    EPYC (Zen 3) measured, an fp32 bundle opened 4-4.7 s sooner and reached its first token about
    10% sooner, decoding no slower (docs/performance.md, "Weight prepacking"). Everything else
    packs: on the Intel Xeon (AVX-512) a one-row product over unpacked weights read 1.5x slower, the
    vision graph ran faster packed, quantized weights (MatMulNBits) decode 20x slower unpacked, and
    fp16 and CUDA were not measured. MLLM_EDGE_PREPACK=1 or 0 overrides the choice for fp32 LLM
    graphs."""
    chosen = os.environ.get("MLLM_EDGE_PREPACK", "")
    if chosen not in ("", "0", "1"):
        raise MllmEdgeError(f"MLLM_EDGE_PREPACK must be 0 or 1 (or unset), not '{chosen}'")
    if device != "cpu" or not graph.startswith("llm") or manifest.dtype != "float32" or manifest.quantization:
        return True
    return chosen == "1" if chosen else not _x86_without_avx512()


def graph_weight_bytes(path: Path) -> int:
    """The graph's weights on disk: its external data file (export's NAME.onnx.data, which the fused
    copy NAME.onnxruntime.onnx reads too), or the graph (a tied LM head's table, shared into
    embed.onnx.data, is not counted: it matters only near the threshold)."""
    data = path.with_name(graph_name(path) + ".onnx.data")
    return (data if data.exists() else path).stat().st_size if path.exists() else 0


def graph_name(path: Path) -> str:
    """NAME of NAME.onnx, or of its fused copy NAME.onnxruntime.onnx."""
    return path.name.removesuffix(FUSED_SUFFIX).removesuffix(".onnx")


def session_file(spec: GraphSpec, device: str = "cpu") -> str:
    """The file ONNX Runtime runs of a graph: on the CPU its copy with the CPU provider's fused
    attention where the bundle has one (export/fused_attention.py), else the graph TensorRT builds
    (on CUDA too: the copies were made and measured for the CPU provider and never ran on a GPU).
    MLLM_EDGE_UNFUSED_ATTENTION=1 runs the latter everywhere (to measure the fusion, or rule it out)."""
    unfused = os.environ.get("MLLM_EDGE_UNFUSED_ATTENTION", "0") not in ("", "0")
    return spec.onnxruntime_file if spec.onnxruntime_file and device == "cpu" and not unfused else spec.file


class OnnxRuntimeEngine:
    def __init__(
        self,
        path: Path,
        device: str = "cpu",
        low_memory: bool = False,
        graph: bytes | None = None,
        prepack: bool = True,
    ):
        """low_memory: no graph optimisation either (export's verification on big fp16 graphs: the
        CPU provider would keep fp32 copies of the weights). prepack: False reads the weights
        unpacked (prepacks() says when). graph: the serialized
        graph to run instead of the file at path, its external data still read beside path (ONNX
        Runtime refuses data files outside a model's folder, links included)."""
        ort = _import_onnxruntime()
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise MllmEdgeError(
                    "--device cuda needs onnxruntime-gpu with a CUDA GPU; this ONNX Runtime offers "
                    + ", ".join(ort.get_available_providers())
                )
            providers.insert(0, "CUDAExecutionProvider")
        elif device != "cpu":
            raise MllmEdgeError(f"unknown device '{device}' (choose cpu or cuda)")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # A pipeline's graphs run one after another, each session with its own thread pool: a pool
        # that spins after its graph ends takes the cores from the next graph (FastV's decode ran 1.7x
        # slower that way), so none spins.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        # ONNX Runtime's CPU arena keeps the largest call's activations (grown in doubling chunks) for
        # the session's life; it saves an allocation per operator. Big graphs go without: a 1 B fp32
        # bundle peaked at 4.55 GB instead of 5.19 GB (its weights 4.01), decoding and prefilling no
        # slower (benchmarks/runtime_memory.py). Small ones keep it: the built-in model decoded 13%
        # and prefilled 30% slower without (docs/performance.md).
        options.enable_cpu_mem_arena = not low_memory and graph_weight_bytes(path) < ARENA_MAX_WEIGHTS
        if low_memory:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            # Unoptimised, an fp16 Gemm on the CPU runs behind a Cast of its weight to fp32. The
            # default order runs those Casts (ready from the start) early and holds their outputs:
            # 1.8x the graph's weights at the peak of an fp16 llm_tail; by priority, 1.1x.
            options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        self.name, self.device = graph_name(path), device
        if graph is not None:
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(path.parent)
            )
        try:
            self.session = ort.InferenceSession(graph or str(path), options, providers=providers)
        except Exception as e:  # onnxruntime has its own exception types
            raise MllmEdgeError(f"ONNX Runtime cannot load {path.name}: {e}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(
        self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        outputs = outputs or {}
        binding = self.session.io_binding()
        for name in self.input_names:
            binding.bind_input(name, *self._where(name, inputs[name]))
        for name in self.output_names:
            if name in outputs:
                binding.bind_output(name, *self._where(name, outputs[name]))
            else:
                binding.bind_output(name, "cpu")
        try:
            self.session.run_with_iobinding(binding)
        except Exception as e:
            raise MllmEdgeError(f"ONNX Runtime failed running the {self.name} graph: {e}") from None
        returned = [n for n in self.output_names if n not in outputs]
        values = binding.get_outputs()
        by_name = dict(zip(self.output_names, values))
        return {n: by_name[n].numpy() for n in returned}

    def close(self) -> None:
        self.session = None  # ONNX Runtime frees a session with its last reference

    def _where(self, name: str, value) -> tuple:
        """IO binding's (device, device id, dtype, shape, address) for a host array or a DeviceTensor."""
        if isinstance(value, DeviceTensor):
            return self.device, 0, value.dtype, value.shape, value.address
        if not value.flags.c_contiguous:
            raise ValueError(f"{self.name}: {name} must be C-contiguous")  # a bug of ours, not the user's
        return "cpu", 0, value.dtype, value.shape, value.ctypes.data


class OrtDeviceMemory:
    """runtime.device_cache's memory interface on an ONNX Runtime device ("cuda"; "cpu" to test it).

    Each buffer is an OrtValue that ONNX Runtime allocates and fills from zeroed host pages once; no
    CUDA library beyond ONNX Runtime's own is needed. No copy(): ONNX Runtime binds any address it is
    given (no alignment rule stated), so its device cache uses alignment 1 and never needs one.
    """

    def __init__(self, device: str = "cuda"):
        self.ort, self.device = _import_onnxruntime(), device
        self.buffers: dict[int, tuple] = {}  # address -> (the OrtValue that owns it, its host source on CPU)

    def malloc(self, nbytes: int) -> int:
        zeros = np.zeros(max(nbytes, 1), np.uint8)  # pages mapped lazily; on CPU the OrtValue is this array
        value = self.ort.OrtValue.ortvalue_from_numpy(zeros, self.device, 0)
        self.buffers[value.data_ptr()] = (value, zeros if self.device == "cpu" else None)
        return value.data_ptr()

    def free(self, address: int) -> None:
        self.buffers.pop(address, None)


class OnnxRuntimeBackend(BackendResources):
    """A bundle's graphs in ONNX Runtime, one session each. On CUDA the KV cache lives in memory that
    ONNX Runtime allocates on the GPU (a host cache would be uploaded whole every step)."""

    name = "onnxruntime"
    extends_cache = True  # any shapes

    def __init__(self, folder: Path, manifest: Manifest, device: str = "cpu", low_memory: bool = False):
        super().__init__()
        self.device, self.max_context = device, manifest.max_context
        # Opening a session reads its weights into memory and prepacks them, about a second per GB
        # here, with the GIL released: the graphs open side by side (an fp32 ~0.8B bundle: 2.2 s
        # instead of 3.3 s on 2 cores). Low-memory sessions open one at a time, to keep the peak low.
        _import_onnxruntime()  # once, before the threads
        workers = 1 if low_memory else min(len(manifest.graphs), os.cpu_count() or 1)
        failed = None
        with ThreadPoolExecutor(workers) as pool:
            opening = {
                graph: pool.submit(
                    OnnxRuntimeEngine,
                    folder / session_file(spec, device),
                    device,
                    low_memory,
                    prepack=prepacks(manifest, graph, device),
                )
                for graph, spec in manifest.graphs.items()
            }
            for graph, future in opening.items():
                try:
                    self.engines[graph] = future.result()
                except BaseException as e:
                    failed = failed or e
                    pool.shutdown(cancel_futures=True)  # the graphs not started yet are not opened
        if failed is not None:
            self.close()
            raise failed
        self.memory = OrtDeviceMemory(device) if device == "cuda" else None

    @staticmethod
    def files_read(manifest: Manifest) -> list[str]:
        return manifest.graph_files() + manifest.tokenizer_files()

    def new_cache(self, num_layers: int, split: int, kv_heads: int, head_dim: int, dtype):
        shape = (num_layers, split, self.max_context, kv_heads, head_dim, dtype)
        if self.memory is None:
            return self._keep(KVCache(*shape))
        # ONNX Runtime states no alignment rule for bound buffers: never a scratch copy
        return self._keep(DeviceKVCache(self.memory, *shape, alignment=1, owner="bundle's"))
