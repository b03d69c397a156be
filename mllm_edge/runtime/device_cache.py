"""The KV cache in device memory, for TensorRT and ONNX Runtime on CUDA: addresses instead of arrays.

The same layout and bookkeeping as the host cache (runtime.cache: sequence-first [1 + max_len, B, G, D]
per layer, row 0 the null row, the two layer groups with their own lengths), but past() and slots() give
DeviceTensors: a base address plus an offset, which the engine binds as it is (TensorRT's
set_tensor_address, ONNX Runtime's IO binding). A step writes its S new rows straight into the slot.
TensorRT wants 256-byte aligned addresses (`alignment`); when a row is not a multiple of that a
slot can be misaligned, and then the rows are written to an aligned scratch buffer and copied into
the slot (S rows, device to device) when the step is committed with advance(). ONNX Runtime states
no such rule for bound buffers (alignment 1: never a copy); a real model's rows are a multiple of 256
bytes anyway (head_dim 64 or 128, fp16, two or more key/value heads).

`memory` is anything with malloc(nbytes) -> the address of nbytes zeroed bytes, free(address), and,
where alignment > 1, copy(dst, src, nbytes): `CudaMemory` (TensorRT's backend) and `OrtDeviceMemory`
(ONNX Runtime's) on a GPU, `HostMemory` (plain host bytes) to check the bookkeeping where there is none.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from .cache import KINDS, CacheBookkeeping

ALIGNMENT = 256  # bytes, TensorRT's rule for tensor addresses


@dataclass(frozen=True)
class DeviceTensor:
    address: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class HostMemory:
    """Host bytes behind the device-memory interface (keeps every buffer alive until freed)."""

    def __init__(self):
        self.buffers: dict[int, np.ndarray] = {}

    def malloc(self, nbytes: int) -> int:
        buf = np.zeros(nbytes + ALIGNMENT, np.uint8)  # zeroed, as the interface promises
        address = -(-buf.ctypes.data // ALIGNMENT) * ALIGNMENT  # aligned like cudaMalloc's
        self.buffers[address] = buf
        return address

    def free(self, address: int) -> None:
        self.buffers.pop(address, None)

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        ctypes.memmove(dst, src, nbytes)


class DeviceKVCache(CacheBookkeeping):
    def __init__(
        self,
        memory,
        num_layers: int,
        split: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        dtype,
        batch: int = 1,
        alignment: int = ALIGNMENT,
        owner: str = "engines'",
    ):
        super().__init__(num_layers, split, max_len, owner)
        self.memory, self.dtype, self.alignment = memory, np.dtype(dtype), alignment
        self.row_shape = (batch, kv_heads, head_dim)
        self.row_bytes = batch * kv_heads * head_dim * self.dtype.itemsize
        # One allocation for every layer's keys and values (an allocator's arena may round each
        # request up), zeroed, so the null rows are ready; each buffer starts on an ALIGNMENT boundary.
        stride = -(-(1 + max_len) * self.row_bytes // ALIGNMENT) * ALIGNMENT
        self.block = memory.malloc(2 * num_layers * stride)
        self.bases = {
            kind: [self.block + (k * num_layers + i) * stride for i in range(num_layers)]
            for k, kind in enumerate(KINDS)
        }
        self.scratch: dict[str, int] = {}  # output name -> aligned buffer, for misaligned slots
        self.scratch_rows = 0
        self.pending: list[tuple[int, int, int]] = []  # (dst, src, nbytes) to copy on advance()

    def _view(self, kind: str, layer: int, first: int, rows: int) -> DeviceTensor:
        return DeviceTensor(
            self.bases[kind][layer] + first * self.row_bytes, (rows, *self.row_shape), self.dtype
        )

    def slots(self, name: str, count: int) -> dict[str, DeviceTensor]:
        """As the host cache's, but a misaligned slot is swapped for an aligned scratch buffer,
        copied into the slot when the step is committed."""
        out = super().slots(name, count)
        self.pending = []
        for output, slot in out.items():
            if slot.address % self.alignment:
                scratch = self._scratch(output, count)
                out[output] = DeviceTensor(scratch, slot.shape, self.dtype)
                self.pending.append((slot.address, scratch, slot.nbytes))
        return out

    def _scratch(self, name: str, rows: int) -> int:
        if rows > self.scratch_rows:  # grow every scratch buffer together
            for address in self.scratch.values():
                self.memory.free(address)
            self.scratch, self.scratch_rows = {}, rows
        if name not in self.scratch:
            self.scratch[name] = self.memory.malloc(self.scratch_rows * self.row_bytes)
        return self.scratch[name]

    def advance(self, name: str, count: int, outputs: dict | None = None) -> None:
        """Commit a step: the rows written to scratch go to their slot."""
        for dst, src, nbytes in self.pending:
            self.memory.copy(dst, src, nbytes)
        self.pending = []
        super().advance(name, count)

    def reset(self) -> None:
        super().reset()
        self.pending = []

    def truncate(self, name: str, length: int) -> None:
        super().truncate(name, length)
        self.pending = []  # copies of a step that never committed (it failed) are not replayed

    def close(self) -> None:
        if self.bases:
            for address in (self.block, *self.scratch.values()):
                self.memory.free(address)
        self.bases, self.scratch = {}, {}
