"""Graph surgery before quantizing, and saving the result as export saves graphs.

Our Linear layers export as Gemm(A, W, transB=1) over the weight as stored, [N, K] (models/layers.py).
Both quantizers want MatMul(A, W^T): ONNX Runtime's takes only MatMul, and Model Optimizer's INT4
path blocks axis 0 as if every weight were [K, N] (on our Gemms it wrote DequantizeLinear scales of
the wrong shape, a graph ONNX Runtime refuses). So the weights to quantize become MatMuls over their
transposes; every other Gemm (the LM head, excluded weights) stays as it was, so a weight shared
with another graph is still stored once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

from ..export.onnx_graph import ALIGN

IN_FLIGHT = 64 << 20  # bytes of weights save_graph holds at once beyond the model's own


def weight_gemms(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> weight name, for each Gemm(A, W, [C], transB=1) of ours with an initializer W."""
    inits = {t.name for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        weight = gemm_weight(node, inits)
        if weight:
            found[node.name or node.output[0]] = weight
    return found


def gemm_weight(node: onnx.NodeProto, inits) -> str | None:
    """W, when node is a plain Gemm(A, W, [C], transB=1) over an initializer W (a name in inits)."""
    if node.op_type == "Gemm" and len(node.input) > 1 and node.input[1] in inits and _plain(node):
        return node.input[1]
    return None


def selected_gemms(model: onnx.ModelProto, name: str, select: Callable[[str], bool]):
    """(initializers by name, [(activation, weight)] of every plain Gemm whose weight `select`
    accepts, in graph order); an error naming the graph when there is none."""
    from ..errors import MllmEdgeError

    inits = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        weight = gemm_weight(node, inits)
        if weight and select(weight):
            found.append((node.input[0], weight))
    if not found:
        raise MllmEdgeError(f"the {name} graph has no weight matrix to quantize (all excluded?)")
    return inits, found


def _plain(node: onnx.NodeProto) -> bool:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return (
        attrs.get("transA", 0) == 0
        and attrs.get("transB", 0) == 1
        and attrs.get("alpha", 1.0) == 1.0
        and attrs.get("beta", 1.0) == 1.0
    )


Operand = Callable[[str], "tuple[str, list[onnx.TensorProto], list[onnx.NodeProto]]"]


def gemms_to_matmuls(
    model: onnx.ModelProto,
    folder: Path | None = None,
    select: Callable[[str], bool] = lambda weight: True,
    operand: Operand | None = None,
) -> dict[str, str]:
    """Rewrite each plain Gemm whose weight `select` accepts as MatMul(A, B) [+ C], where B is
    `operand(weight name)`: the name of a [K, N] tensor, with the initializers and nodes that make it
    (by default the weight's transpose, read from its file in `folder`; int4-awq gives a
    DequantizeLinear). Returns the new MatMul node name -> weight name."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    operand = operand or _transposed(inits, folder)
    nodes, operands, rewritten = [], {}, {}  # operands: weight name -> B, made once per weight
    for node in graph.node:
        name = gemm_weight(node, inits)
        if name is None or not select(name):
            nodes.append(node)
            continue
        if name not in operands:
            operands[name], tensors, made = operand(name)
            graph.initializer.extend(tensors)
            nodes.extend(made)
        has_bias = len(node.input) > 2 and node.input[2] != ""
        base = node.name or node.output[0]  # node names must be unique, and may be empty
        product = f"{node.output[0]}.matmul" if has_bias else node.output[0]
        nodes.append(
            helper.make_node("MatMul", [node.input[0], operands[name]], [product], name=f"{base}.matmul")
        )
        if has_bias:
            nodes.append(
                helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{base}.bias")
            )
        rewritten[f"{base}.matmul"] = name
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    if any(t.name not in used for t in graph.initializer):  # the weights rewritten, unless still shared
        kept = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return rewritten


def _transposed(inits: dict[str, onnx.TensorProto], folder: Path | None) -> Operand:
    def operand(name: str):
        values = np.ascontiguousarray(weight_array(inits[name], folder).T)
        return f"{name}.T", [numpy_helper.from_array(values, f"{name}.T")], []

    return operand


def load_weights(model: onnx.ModelProto, folder: Path) -> None:
    """Read every weight still stored as external data (in folder) into the model itself."""
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, str(folder))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]


def save_graph(model: onnx.ModelProto, folder: Path, name: str, source: Path | None = None) -> None:
    """folder/name.onnx with its weights in name.onnx.data, every tensor page-aligned as export's are
    (so runtimes can map them). Weights still stored as external data are read from `source`, a few
    at a time, while they are written."""
    import onnx_ir

    ir_model = onnx_ir.from_proto(model)
    if source is not None:
        onnx_ir.external_data.set_base_dir(ir_model.graph, source)
    onnx_ir.save(
        ir_model,
        folder / f"{name}.onnx",
        external_data=f"{name}.onnx.data",
        alignment=ALIGN,
        align_threshold=0,
        max_in_flight_bytes=IN_FLIGHT,
    )


def weight_array(tensor: onnx.TensorProto, folder: Path | None) -> np.ndarray:
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
