"""Graph surgery before quantizing, and saving the result as export saves graphs.

Our Linear layers export as Gemm(A, W, transB=1) over the weight as stored, [N, K] (models/layers.py).
Both quantizers want MatMul(A, W^T): ONNX Runtime's takes only MatMul, and Model Optimizer's INT4
path blocks axis 0 as if every weight were [K, N] (on our Gemms it wrote DequantizeLinear scales of
the wrong shape, a graph ONNX Runtime refuses). So the weights to quantize become MatMuls over their
transposes; every other Gemm (the LM head, excluded weights) stays as it was, so a weight shared
with another graph is still stored once.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

from ..export.onnx_graph import ALIGN


def weight_gemms(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> weight name, for each Gemm(A, W, [C], transB=1) of ours with an initializer W."""
    inits = {t.name for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "Gemm" and _plain(node) and node.input[1] in inits:
            found[node.name or node.output[0]] = node.input[1]
    return found


def _plain(node: onnx.NodeProto) -> bool:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return (
        attrs.get("transA", 0) == 0
        and attrs.get("transB", 0) == 1
        and attrs.get("alpha", 1.0) == 1.0
        and attrs.get("beta", 1.0) == 1.0
    )


def gemms_to_matmuls(
    model: onnx.ModelProto, folder: Path | None = None, select: Callable[[str], bool] = lambda weight: True
) -> dict[str, str]:
    """Rewrite each plain Gemm whose weight `select` accepts as MatMul(A, W^T) [+ C]; a weight stored
    as external data (in `folder`) is read from its file straight into its transpose. Returns the new
    MatMul node name -> weight name."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    nodes, transposed, rewritten = [], {}, {}  # transposed: weight name -> its transpose's
    for node in graph.node:
        name = node.input[1] if len(node.input) > 1 else ""
        if node.op_type != "Gemm" or not _plain(node) or name not in inits or not select(name):
            nodes.append(node)
            continue
        if name not in transposed:
            weight = inits[name]
            tensor = numpy_helper.from_array(np.ascontiguousarray(_array(weight, folder).T), f"{name}.T")
            if uses[name] == 1:  # in place of a reference to external data: nothing else held
                weight.CopyFrom(tensor)
            else:
                graph.initializer.append(tensor)
            transposed[name] = tensor.name
        has_bias = len(node.input) > 2 and node.input[2] != ""
        base = node.name or node.output[0]  # node names must be unique, and may be empty
        product = f"{node.output[0]}.matmul" if has_bias else node.output[0]
        nodes.append(
            helper.make_node("MatMul", [node.input[0], transposed[name]], [product], name=f"{base}.matmul")
        )
        if has_bias:
            nodes.append(
                helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{base}.bias")
            )
        rewritten[f"{base}.matmul"] = name
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    if any(t.name not in used for t in graph.initializer):  # originals a shared weight left behind
        kept = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return rewritten


def load_weights(model: onnx.ModelProto, folder: Path) -> None:
    """Read every weight still stored as external data (in folder) into the model itself."""
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, str(folder))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]


def save_graph(model: onnx.ModelProto, folder: Path, name: str) -> None:
    """folder/name.onnx with its weights in name.onnx.data, every tensor page-aligned as export's are
    (so runtimes can map them)."""
    import onnx_ir

    onnx_ir.save(
        onnx_ir.from_proto(model),
        folder / f"{name}.onnx",
        external_data=f"{name}.onnx.data",
        alignment=ALIGN,
        align_threshold=0,
    )


def _array(tensor: onnx.TensorProto, folder: Path | None) -> np.ndarray:
    """A weight's values, mapped from its external data file when it has one (no copy until used)."""
    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return np.memmap(
        folder / info["location"],
        dtype=dtype,
        mode="r",
        offset=int(info.get("offset", 0)),
        shape=tuple(tensor.dims),
    )
