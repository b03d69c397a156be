"""ONNX Runtime backend: CPU, or CUDA when onnxruntime-gpu is installed.

Inputs and preallocated outputs are bound by pointer (IO binding), so cache views are read and
written where they lie in host memory. On CUDA the buffers are still host numpy arrays: ONNX
Runtime copies them across; a device-resident cache is the TensorRT backend's job.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import MllmEdgeError


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise MllmEdgeError("the onnxruntime backend needs ONNX Runtime: pip install 'mllm-edge[onnxruntime]' (or [onnxruntime-gpu])") from None
    return onnxruntime


class OnnxRuntimeEngine:
    def __init__(self, path: Path, device: str = "cpu", low_memory: bool = False):
        """low_memory: no graph optimisation and no memory arena (export's verification on big
        fp16 graphs: the CPU provider would keep fp32 copies of the weights)."""
        ort = _import_onnxruntime()
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise MllmEdgeError("--device cuda needs onnxruntime-gpu with a CUDA GPU; this ONNX Runtime offers " + ", ".join(ort.get_available_providers()))
            providers.insert(0, "CUDAExecutionProvider")
        elif device != "cpu":
            raise MllmEdgeError(f"unknown device '{device}' (choose cpu or cuda)")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # A pipeline's graphs run one after another, each session with its own thread pool: a pool
        # that spins after its graph ends takes the cores from the next graph (FastV's decode ran 1.7x
        # slower that way), so none spins.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if low_memory:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.enable_cpu_mem_arena = False
        self.name = path.stem
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime has its own exception types
            raise MllmEdgeError(f"ONNX Runtime cannot load {path.name}: {e}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        outputs = outputs or {}
        binding = self.session.io_binding()
        for name in self.input_names:
            array = inputs[name]
            if not array.flags.c_contiguous:
                raise ValueError(f"{self.name}: input {name} must be C-contiguous")  # a bug of ours, not the user's
            binding.bind_input(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
        for name in self.output_names:
            if name in outputs:
                array = outputs[name]
                binding.bind_output(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
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
