"""torch module -> one ONNX file with external weight data, and the bookkeeping around it.

The dynamo exporter (torch.export + onnxscript) is used: the TorchScript one is deprecated, and
this one keeps weights as references to the torch tensors until it streams them to disk, so a graph
costs little memory beyond the loaded model.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import warnings
from pathlib import Path

import onnx
import torch
from onnx.external_data_helper import uses_external_data

from ..errors import MllmEdgeError
from ..manifest import GraphSpec, TensorSpec

OPSET = 20  # the newest TensorRT 10's ONNX parser reads
ALIGN = 4096  # external tensors page-aligned, so runtimes can map them


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints its steps and warns about things that do not concern our graphs."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_graph(module: torch.nn.Module, args: tuple, dynamic_shapes, folder: Path, name: str) -> GraphSpec:
    """Export module(*args) as folder/name.onnx (+ name.onnx.data) and describe its inputs and outputs."""
    path = folder / f"{name}.onnx"
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=OPSET,
                input_names=module.input_names,
                output_names=module.output_names,
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
            program.save(path, external_data=True)
    except Exception as e:  # the exporter raises many kinds; all mean the same to a user
        root = e
        while root.__cause__ is not None:  # the exporter wraps the real reason in its own advice
            root = root.__cause__
        first = next((line for line in str(root).splitlines() if line.strip()), "")
        raise MllmEdgeError(f"exporting the {name} graph failed: {type(root).__name__}: {first}") from e
    del program
    return graph_spec(path)


def graph_spec(path: Path) -> GraphSpec:
    model = onnx.load(str(path), load_external_data=False)
    data_files = sorted({_location(t) for t in model.graph.initializer if uses_external_data(t)})
    return GraphSpec(
        path.name,
        [_tensor_spec(v) for v in model.graph.input],
        [_tensor_spec(v) for v in model.graph.output],
        data_files,
    )


def _tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
    shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor_type.shape.dim]
    return TensorSpec(value.name, dtype, shape)


def _external(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _location(tensor: onnx.TensorProto) -> str:
    return _external(tensor)["location"]


def _read_range(path: Path, offset: int, length: int, chunk: int = 1 << 22):
    with open(path, "rb") as f:
        f.seek(offset)
        while length > 0:
            block = f.read(min(chunk, length))
            if not block:
                raise MllmEdgeError(f"{path} is shorter than its graph says")
            length -= len(block)
            yield block


def _digest(path: Path, offset: int, length: int) -> str:
    h = hashlib.sha256()
    for block in _read_range(path, offset, length):
        h.update(block)
    return h.hexdigest()


def share_duplicate_weights(folder: Path, names: list[str]) -> int:
    """Store each weight once across graphs: a tensor identical to one an earlier graph holds
    (a tied LM head reads the embedding table) is pointed at that graph's data file, and its own
    copy is dropped. Returns the bytes saved.
    """
    seen: dict[tuple, tuple[str, int]] = {}  # (dtype, dims, sha256) of earlier graphs -> (file, offset)
    saved = 0
    for name in names:
        path = folder / f"{name}.onnx"
        model = onnx.load(str(path), load_external_data=False)
        own = f"{name}.onnx.data"
        redirected, kept = [], []  # kept: (tensor, key, offset, length)
        for t in model.graph.initializer:
            if not uses_external_data(t) or _location(t) != own:
                continue
            ext = _external(t)
            offset, length = int(ext.get("offset", 0)), int(ext["length"])
            key = (t.data_type, tuple(t.dims), _digest(folder / own, offset, length))
            if key in seen:
                _set_external(t, *seen[key], length)
                redirected.append(t)
                saved += length
            else:
                kept.append((t, key, offset, length))
        if redirected:
            offsets = _rewrite_data_file(folder / own, [(offset, length) for _, _, offset, length in kept])
            for (t, _, _, length), new in zip(kept, offsets):
                _set_external(t, own, new, length)
            kept = [(t, key, new, length) for (t, key, _, length), new in zip(kept, offsets)]
            if not kept:
                (folder / own).unlink()
            onnx.save(model, str(path))
        for _, key, offset, _ in kept:
            seen.setdefault(key, (own, offset))
    return saved


def _set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _rewrite_data_file(path: Path, ranges: list[tuple[int, int]]) -> list[int]:
    """Keep only `ranges` (offset, length) of a data file, page-aligned; returns their new offsets."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    offsets = []
    with open(tmp, "wb") as out:
        for offset, length in ranges:
            pad = -out.tell() % ALIGN
            out.write(b"\0" * pad)
            offsets.append(out.tell())
            for block in _read_range(path, offset, length):
                out.write(block)
    os.replace(tmp, path)
    return offsets
