"""Devices plan predicts for: NVIDIA's published figures of Jetsons and desktop GPUs, this machine's
measured ones (`cpu`), or the user's (--bandwidth, --tflops, --memory).

Throughputs are dense (no sparsity) and of the GPU alone: NVIDIA's Jetson headlines are sparse INT8
TOPS of the GPU and its DLAs together, so the GPU's dense FP16 rate here is its tensor cores x 512
FLOP per clock x its top clock (which reproduces NVIDIA's published GPU-only figures where they
exist), INT8 twice that. Each figure's source and derivation: docs/plan.md. A figure NVIDIA does
not publish is None, and a precision that needs it is not predicted there.

Memory a process can use: a Jetson's memory is shared by the CPU, the GPU and the operating
system, so `reserved_gb` (JetPack and its services) comes off the total; a desktop GPU keeps some
for the driver and display.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import MllmEdgeError
from . import costs

JETSON_RESERVED_GB = 1.5  # JetPack with its desktop and services (assumed; not measured here)
DESKTOP_RESERVED_GB = 0.5  # the driver and a display
GPU_OVERHEAD_GB = 0.8  # a process's CUDA context, cuBLAS/cuDNN and TensorRT's kernels (assumed)
CPU_OVERHEAD_GB = 0.35  # ONNX Runtime and Python, beside the weights (bench on the built-in model)


@dataclass(frozen=True)
class Device:
    name: str
    label: str
    memory_gb: float
    bandwidth_gb_s: float
    fp16_tflops: float | None
    int8_tops: float | None = None
    fp8_tflops: float | None = None
    sm: str | None = None  # CUDA compute capability; None: a CPU
    unified: bool = False  # memory shared with the CPU and the OS (a Jetson)
    fp32_tflops: float | None = None  # the CPU's (measured): its bundles run in fp32
    source: str = ""

    @property
    def kind(self) -> str:
        """Whose fitted efficiency factors apply (efficiency.json): "gpu" or "cpu"."""
        return "cpu" if self.sm is None else "gpu"

    @property
    def reserved_gb(self) -> float:
        if self.sm is None:
            return 1.0  # the OS and other processes
        return JETSON_RESERVED_GB if self.unified else DESKTOP_RESERVED_GB

    @property
    def available_gb(self) -> float:
        return round(self.memory_gb - self.reserved_gb, 3)

    @property
    def overhead_gb(self) -> float:
        return CPU_OVERHEAD_GB if self.sm is None else GPU_OVERHEAD_GB

    @property
    def float_type(self) -> str:
        """The bundle's float type here: fp16 on GPUs, fp32 on the CPU (ONNX Runtime's CPU
        provider has no fp16 matrix kernels)."""
        return "fp32" if self.sm is None else "fp16"

    @property
    def precisions(self) -> tuple[str, ...]:
        """What plan predicts here: the CPU's are the onnxruntime target's, the GPUs' TensorRT's."""
        return costs.CPU_PRECISIONS if self.sm is None else costs.PRECISIONS

    def peak_flops(self, precision: str) -> float:
        """FLOP/s of the precision's products (int4-awq: fp16, its weights dequantized). The CPU's
        int8 and int4 kernels (MatMulNBits, int8 activations) are rated against its measured fp32
        FLOP/s: their fitted efficiency factors (efficiency.json) carry the difference."""
        if self.sm is None and precision in costs.CPU_PRECISIONS:
            return self.fp32_tflops * 1e12
        figure = {
            "fp32": self.fp32_tflops,
            "fp16": self.fp16_tflops if self.sm else self.fp32_tflops,
            "int4-awq": self.fp16_tflops if self.sm else self.fp32_tflops,
            "int8": self.int8_tops,
            "fp8": self.fp8_tflops,
        }[precision]
        if figure is None:
            raise MllmEdgeError(f"{self.label}: no published {precision} throughput, so it is not predicted")
        return figure * 1e12

    def min_sm_for(self, precision: str) -> str | None:
        """Why the device cannot run the precision, or None."""
        if self.sm is None:  # the CPU runs fp32 bundles, and calibrate's onnxruntime target (MatMulNBits)
            if precision in costs.CPU_PRECISIONS:
                return None
            return f"the CPU runs {', '.join(costs.CPU_PRECISIONS)} (export --quantize int8|int4), not {precision}"
        if precision not in costs.PRECISIONS:  # int4: the onnxruntime target's
            return f"{self.label}: {precision} is the CPU's (ONNX Runtime's MatMulNBits); GPUs run int4-awq"
        major, _, minor = self.sm.partition(".")
        if precision == "fp8" and (int(major), int(minor)) < (8, 9):
            return f"{self.label} (SM {self.sm}) has no FP8: it needs SM 8.9 or newer"
        if precision == "fp32":
            return f"{self.label}: plan GPUs in fp16 or a quantized precision"
        return None

    def can_predict(self, precision: str) -> bool:
        if self.min_sm_for(precision) is not None:
            return False
        try:
            self.peak_flops(precision)
        except MllmEdgeError:
            return False
        return True


ORIN = "NVIDIA Jetson Orin module data sheets (DS-10662, DS-10712, DS-11105); GPU-only dense rates derived"
DEVICES = {
    d.name: d
    for d in [
        Device("orin-nano-4gb", "Jetson Orin Nano 4GB", 4, 34, 5.12, 10.24, None, "8.7", True, source=ORIN),
        Device(
            "orin-nano-4gb-super",
            "Jetson Orin Nano 4GB (Super)",
            4,
            51,
            8.36,
            16.71,
            None,
            "8.7",
            True,
            source=ORIN,
        ),
        Device("orin-nano-8gb", "Jetson Orin Nano 8GB", 8, 68, 10.24, 20.48, None, "8.7", True, source=ORIN),
        Device(
            "orin-nano-8gb-super",
            "Jetson Orin Nano 8GB (Super)",
            8,
            102,
            16.71,
            33.42,
            None,
            "8.7",
            True,
            source=ORIN,
        ),
        Device("orin-nx-8gb", "Jetson Orin NX 8GB", 8, 102.4, 12.53, 25.07, None, "8.7", True, source=ORIN),
        Device(
            "orin-nx-16gb", "Jetson Orin NX 16GB", 16, 102.4, 15.04, 30.08, None, "8.7", True, source=ORIN
        ),
        Device(
            "orin-nx-16gb-super",
            "Jetson Orin NX 16GB (Super)",
            16,
            102.4,
            19.22,
            38.44,
            None,
            "8.7",
            True,
            source=ORIN,
        ),
        Device(
            "agx-orin-32gb", "Jetson AGX Orin 32GB", 32, 204.8, 26.67, 53.33, None, "8.7", True, source=ORIN
        ),
        Device(
            "agx-orin-64gb", "Jetson AGX Orin 64GB", 64, 204.8, 42.6, 85.2, None, "8.7", True, source=ORIN
        ),
        Device(
            "thor",
            "Jetson AGX Thor (T5000)",
            128,
            273,
            258.5,
            None,
            517,
            "11.0",
            True,
            source="NVIDIA's Jetson Thor blog table (FP8 dense); FP16 derived",
        ),
        Device(
            "rtx-4090",
            "GeForce RTX 4090",
            24,
            1008,
            165.2,
            660.6,
            330.3,
            "8.9",
            source="NVIDIA Ada whitepaper, appendix A",
        ),
        Device(
            "rtx-4080",
            "GeForce RTX 4080",
            16,
            716.8,
            97.5,
            389.9,
            194.9,
            "8.9",
            source="NVIDIA Ada whitepaper, appendix A",
        ),
        Device(
            "rtx-3090", "GeForce RTX 3090", 24, 936, 71, 284, None, "8.6", source="NVIDIA GA102 whitepaper"
        ),
        Device(
            "rtx-a6000",
            "RTX A6000",
            48,
            768,
            154.8,
            309.7,
            None,
            "8.6",
            source="NVIDIA GA102 whitepaper, RTX A6000 data sheet",
        ),
        Device(
            "rtx-5090",
            "GeForce RTX 5090",
            32,
            1792,
            209.5,
            838,
            419,
            "12.0",
            source="NVIDIA RTX Blackwell whitepaper, table 3",
        ),
        Device(
            "l4", "NVIDIA L4", 24, 300, 121, 242.5, 242.5, "8.9", source="NVIDIA L4 data sheet (sparse / 2)"
        ),
        Device("l40s", "NVIDIA L40S", 48, 864, 362.05, 733, 733, "8.9", source="NVIDIA L40S data sheet"),
        Device(
            "a100-80gb",
            "NVIDIA A100 80GB SXM",
            80,
            2039,
            312,
            624,
            None,
            "8.0",
            source="NVIDIA A100 data sheet",
        ),
        Device(
            "h100-sxm",
            "NVIDIA H100 SXM",
            80,
            3350,
            989.4,
            1978.9,
            1978.9,
            "9.0",
            source="NVIDIA H100 data sheet, Hopper whitepaper",
        ),
    ]
}


def device(name: str) -> Device:
    if name == "cpu":
        return measure_cpu()
    found = DEVICES.get(name)
    if found is None:
        raise MllmEdgeError(
            f"unknown --device '{name}' (see --list-devices; or give --bandwidth, --tflops and --memory)"
        )
    return found


def custom(
    base: Device | None, bandwidth: float | None, tflops: float | None, memory: float | None
) -> Device:
    """A device from the user's figures, or a listed one with some of them replaced."""
    for value, what in ((bandwidth, "--bandwidth"), (tflops, "--tflops"), (memory, "--memory")):
        if value is not None and value <= 0:
            raise MllmEdgeError(f"{what} must be positive, got {value}")
    if base is None:
        if None in (bandwidth, tflops, memory):
            raise MllmEdgeError(
                "a device of your own needs all of --bandwidth GB/s, --tflops (dense fp16) and --memory GB"
            )
        return Device("custom", "your device", memory, bandwidth, tflops, 2 * tflops, None, "8.7", False)
    changes = {}
    if bandwidth is not None:
        changes["bandwidth_gb_s"] = bandwidth
    if memory is not None:
        changes["memory_gb"] = memory
    if tflops is not None:
        scale = tflops / (base.fp16_tflops or base.fp32_tflops)
        changes.update(
            fp16_tflops=base.fp16_tflops and tflops,
            fp32_tflops=base.fp32_tflops and base.fp32_tflops * scale,
            int8_tops=base.int8_tops and base.int8_tops * scale,
            fp8_tflops=base.fp8_tflops and base.fp8_tflops * scale,
        )
    return replace(base, label=base.label + " (your figures)", **changes) if changes else base


def measure_cpu() -> Device:
    """This machine: its memory, the bandwidth of a 256 MB fp32 matrix times a vector and the FLOP/s
    of a 1024 x 1024 fp32 matrix product (numpy's BLAS, all its threads), each the best of five
    runs (about a second). The CPU's efficiency factors (efficiency.json's "cpu", fitted by
    benchmarks/plan_vs_bench.py) are relative to these."""
    import os
    import time

    import numpy as np

    def best(run, times: int) -> float:
        t = []
        for _ in range(times):
            start = time.perf_counter()
            run()
            t.append(time.perf_counter() - start)
        return min(t)

    # a decode step's work: a matrix (256 MB) times a vector, in BLAS's threads
    matrix, vector = np.ones((16384, 4096), np.float32), np.ones(4096, np.float32)
    bandwidth = matrix.nbytes / best(lambda: matrix @ vector, 5) / 1e9
    a = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    flops = 2 * 1024**3 / best(lambda: a @ a, 5) / 1e12
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return Device(
        "cpu",
        f"this machine ({os.cpu_count()} cores, measured)",
        round(memory, 2),
        round(bandwidth, 2),
        None,
        fp32_tflops=round(flops, 4),
        source="measured now",
    )
