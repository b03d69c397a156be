"""Checks that an ONNX graph is one TensorRT 10.3 (JetPack 6) can parse, before any engine build.

Why each rule exists:
- opset <= 20, default domain only: TensorRT 10's ONNX parser implements opsets 9-20 and no custom domains.
- no model-local functions: inline them at export, so every node is a plain op this lint and the parser can see.
- op_type in trt10_onnx_ops.json: the parser's own list of supported operators (onnx-tensorrt docs).
- BANNED_OPS: listed by the parser, but data-dependent shapes or control flow we do not ship; or opset 23.
- TopK k constant and < 3840: TensorRT's TopK needs k at build time and caps it below 3840.
- Slice/Squeeze/Unsqueeze/Pad/Reduce* axes constant: TensorRT needs the axes at build time.
- TopK sorted=1: the parser supports only sorted output.
- subgraphs are walked too: a banned op in an If or Loop body must not go unseen.
- external data is never loaded: linting a multi-GB export must read only the graph.

Q/DQ (calibrated graphs; onnx-tensorrt's QuantizeLinear/DequantizeLinear importer, and TensorRT's
IQuantizeLayer/IDequantizeLayer rules from 10.3 on):
- opset 21 only for graphs holding INT4 or blocked DequantizeLinear (those need it); else <= 20.
- scales constant, float32/float16/bfloat16; zero points absent or constant zeros, of int8 or
  fp8 E4M3 type (TensorRT is symmetric only, and has no uint4 or E5M2).
- a scale per tensor, per channel (1-D, along axis, weights only), or blocked (same rank as the
  input): blocked only in DequantizeLinear of a constant INT4 2-D weight, one blocked axis, each
  dimension a whole number of blocks (the parser infers the block as dimension / scale count).
- INT4 only for constant weights (DequantizeLinear of an initializer), with an even element count.
- no output_dtype together with a zero point in DequantizeLinear.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

MAX_OPSET = 20
MAX_OPSET_QUANTIZED = 21  # INT4 and block_size need opset 21
MAX_TOPK = 3840  # k must be strictly below this

BANNED_OPS: dict[str, str] = {
    "NonZero": "output shape depends on the data",
    "CumSum": "TensorRT builds it as a loop (control flow)",
    "ScatterND": "writes at indices that depend on the data",
    "Loop": "control flow: unroll it at export",
    "If": "control flow: resolve the branch at export",
    "Attention": "opset-23 op, not in TensorRT 10.3",
    "RotaryEmbedding": "opset-23 op, not in TensorRT 10.3",
    "RMSNormalization": "opset-23 op, not in TensorRT 10.3",
}

_DEFAULT_DOMAINS = ("", "ai.onnx")
# input index of the axes that must be known at build time
_REDUCE_OPS = (
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSum",
    "ReduceSumSquare",
)
_CONST_AXES_INPUT = {"Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "Pad": 3, **{op: 1 for op in _REDUCE_OPS}}


@dataclass(frozen=True)
class LintFinding:
    node: str  # node name, or "" for model-level findings
    op: str  # op_type, or "" for model-level findings
    message: str

    def __str__(self) -> str:
        label = self.op + (f" '{self.node}'" if self.node else "")
        return f"{label}: {self.message}" if label else self.message


@functools.cache
def supported_ops() -> frozenset[str]:
    """The op types TensorRT 10's ONNX parser supports, from the packaged json."""
    text = resources.files("mllm_edge.export").joinpath("trt10_onnx_ops.json").read_text("utf-8")
    return frozenset(json.loads(text)["supported"])


def _load(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(os.fspath(model), load_external_data=False)


def lint_model(model: onnx.ModelProto | str | os.PathLike) -> list[LintFinding]:
    """Every reason TensorRT 10.3 would refuse (or we do not want) this graph; [] when it is fine."""
    model = _load(model)
    messages = []
    limit = MAX_OPSET_QUANTIZED if _needs_opset_21(model.graph) else MAX_OPSET
    for imp in model.opset_import:
        if imp.domain not in _DEFAULT_DOMAINS:
            messages.append(f"opset import of domain '{imp.domain}': TensorRT parses only the default domain")
        elif imp.version > limit:
            messages.append(
                f"opset {imp.version} > {limit}: TensorRT 10 parses opsets up to {MAX_OPSET} "
                f"({MAX_OPSET_QUANTIZED} for INT4 Q/DQ)"
            )
    messages += [
        f"model-local function '{fn.domain}:{fn.name}': inline it at export" for fn in model.functions
    ]
    return [LintFinding("", "", m) for m in messages] + list(_lint_graph(model.graph, {}, ""))


def op_counts(model: onnx.ModelProto | str | os.PathLike) -> dict[str, int]:
    """op_type -> number of nodes, subgraphs included, sorted by op_type."""
    counts = Counter(node.op_type for node, _ in _walk(_load(model).graph))
    return dict(sorted(counts.items()))


def _walk(graph: onnx.GraphProto) -> Iterator[tuple[onnx.NodeProto, onnx.GraphProto]]:
    """Every node with the graph it sits in, depth first into attribute subgraphs."""
    for node in graph.node:
        yield node, graph
        for sub in _subgraphs(node):
            yield from _walk(sub)


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _constants(graph: onnx.GraphProto, outer: Mapping[str, object]) -> dict[str, object]:
    """Names known at build time -> TensorProto or Constant's AttributeProto, outer scopes included."""
    consts = dict(outer)
    for inp in graph.input:  # a subgraph input shadows an outer name
        consts.pop(inp.name, None)
    consts.update((t.name, t) for t in graph.initializer)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and node.attribute:
            consts[node.output[0]] = node.attribute[0]
        elif node.op_type == "QuantizeLinear" and node.input[0] in consts:  # a weight quantized at build time
            consts[node.output[0]] = consts[node.input[0]]
    return consts


def _const_int(source: object) -> int | None:
    """The single integer a constant holds, or None when it cannot be read without its data."""
    if isinstance(source, onnx.AttributeProto):
        if source.type == onnx.AttributeProto.INT:
            return source.i
        if source.type == onnx.AttributeProto.INTS:
            return source.ints[0] if len(source.ints) == 1 else None
        if source.type != onnx.AttributeProto.TENSOR:
            return None
        source = source.t
    if uses_external_data(source):  # never loaded: see module docstring
        return None
    values = numpy_helper.to_array(source).reshape(-1)
    return int(values[0]) if values.size == 1 else None


def _lint_graph(graph: onnx.GraphProto, outer: Mapping[str, object], where: str) -> Iterator[LintFinding]:
    consts = _constants(graph, outer)
    for node in graph.node:
        for message in _lint_node(node, consts):
            yield LintFinding(node.name, node.op_type, message + where)
        for sub in _subgraphs(node):
            yield from _lint_graph(sub, consts, f" (inside {node.op_type} '{node.name}')")


def _lint_node(node: onnx.NodeProto, consts: Mapping[str, object]) -> Iterator[str]:
    op = node.op_type
    if node.domain not in _DEFAULT_DOMAINS:
        yield f"custom domain '{node.domain}': TensorRT parses only the default domain"
        return
    if op in BANNED_OPS:
        yield f"banned: {BANNED_OPS[op]}"
        return
    if op not in supported_ops():
        yield "not supported by TensorRT 10's ONNX parser"
        return
    if op == "TopK":
        yield from _lint_topk(node, consts)
    if op in ("QuantizeLinear", "DequantizeLinear"):
        yield from _lint_qdq(node, consts)
    axes = _CONST_AXES_INPUT.get(op)
    if axes is not None and len(node.input) > axes and node.input[axes] and node.input[axes] not in consts:
        yield f"axes '{node.input[axes]}' must be a constant (initializer or Constant node)"


def _lint_topk(node: onnx.NodeProto, consts: Mapping[str, object]) -> Iterator[str]:
    if any(a.name == "sorted" and a.i == 0 for a in node.attribute):
        yield "sorted=0: TensorRT's TopK always sorts; the parser requires sorted=1"
    if len(node.input) > 1:  # opset >= 10: k is input 1
        if node.input[1] not in consts:
            yield f"k '{node.input[1]}' must be a constant (initializer or Constant node)"
            return
        k = _const_int(consts[node.input[1]])
    else:  # opset < 10: k is an attribute
        k = next((a.i for a in node.attribute if a.name == "k"), None)
    if k is None:
        yield f"k cannot be read (external data or not one integer); it must be < {MAX_TOPK}"
    elif k >= MAX_TOPK:
        yield f"k={k} must be < {MAX_TOPK} (TensorRT's TopK limit)"


_SCALE_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
_ZERO_POINT_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.INT4)


def _needs_opset_21(graph: onnx.GraphProto) -> bool:
    inits = {t.name: t for t in graph.initializer}
    for node, _ in _walk(graph):
        if node.op_type == "DequantizeLinear":
            source = inits.get(node.input[0])
            if any(a.name == "block_size" and a.i for a in node.attribute) or (
                source is not None and source.data_type == onnx.TensorProto.INT4
            ):
                return True
    return False


def _tensor(source: object) -> onnx.TensorProto | None:
    if isinstance(source, onnx.AttributeProto):
        return source.t if source.type == onnx.AttributeProto.TENSOR else None
    return source if isinstance(source, onnx.TensorProto) else None


def _lint_qdq(node: onnx.NodeProto, consts: Mapping[str, object]) -> Iterator[str]:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    dq = node.op_type == "DequantizeLinear"
    value = _tensor(consts.get(node.input[0]))
    scale = _tensor(consts.get(node.input[1])) if len(node.input) > 1 else None
    if scale is None:
        yield f"scale '{node.input[1] if len(node.input) > 1 else ''}' must be a constant (initializer or Constant node)"
        return
    if scale.data_type not in _SCALE_TYPES:
        yield f"scale of type {onnx.TensorProto.DataType.Name(scale.data_type)}: TensorRT takes float32, float16 or bfloat16 scales"
    zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if zero is not None:
        zp = _tensor(consts.get(zero))
        if zp is None:
            yield f"zero point '{zero}' must be a constant"
        elif zp.data_type not in _ZERO_POINT_TYPES:
            yield f"zero point of type {onnx.TensorProto.DataType.Name(zp.data_type)}: TensorRT has no such quantized type"
        elif not uses_external_data(zp) and np.any(numpy_helper.to_array(zp).astype(np.float32) != 0):
            yield "zero point not zero: TensorRT quantizes symmetrically only"
        if dq and "output_dtype" in attrs:
            yield "output_dtype with a zero point: the parser refuses the pair"
    int4 = (value is not None and value.data_type == onnx.TensorProto.INT4) or (
        not dq
        and zero is not None
        and _tensor(consts.get(zero)) is not None
        and _tensor(consts.get(zero)).data_type == onnx.TensorProto.INT4
    )
    if int4 and (not dq or value is None):
        yield "INT4 only as DequantizeLinear of a constant weight: TensorRT's INT4 is weight-only"
    if int4 and value is not None and int(np.prod(value.dims)) % 2:
        yield "INT4 weight with an odd number of elements: TensorRT packs two per byte"
    scale_dims = list(scale.dims)
    if int(np.prod(scale_dims or [1])) == 1:
        return  # per tensor
    if len(scale_dims) == 1:  # per channel
        if value is None:
            yield "per-channel scales on an activation: TensorRT quantizes activations per tensor"
        elif value is not None:
            axis = attrs.get("axis", 1)
            dims = list(value.dims)
            if -len(dims) <= axis < len(dims) and dims[axis] != scale_dims[0]:
                yield f"{scale_dims[0]} scales for {dims[axis]} channels along axis {axis}"
        return
    if not dq or value is None or not int4:
        yield "blocked scales only in DequantizeLinear of a constant INT4 weight (TensorRT 10.3 to 10.12)"
        return
    dims = list(value.dims)
    if len(dims) != 2 or len(scale_dims) != 2:
        yield f"blocked INT4 weight of rank {len(dims)}: TensorRT 10.3 blocks 2-D weights only"
        return
    blocked = [i for i in range(2) if scale_dims[i] != dims[i]]
    if len(blocked) != 1:
        yield f"scales {scale_dims} for a weight {dims}: exactly one blocked axis is allowed"
        return
    axis, block = blocked[0], attrs.get("block_size", 0)
    if dims[axis] % scale_dims[axis] or (block and dims[axis] != block * scale_dims[axis]):
        yield (
            f"dimension {dims[axis]} is not a whole number of blocks of {block or '?'} ({scale_dims[axis]} scales): "
            "TensorRT infers the block as dimension / scales"
        )
