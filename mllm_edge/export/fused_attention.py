"""ONNX Runtime's fused attention in place of a decoder graph's standard-operator attention: a second
copy of each LLM graph, NAME.onnxruntime.onnx, over the same weight data, which the onnxruntime
backend runs on the CPU (runtime/backends/onnxruntime.py); TensorRT builds NAME.onnx.

A bundle's graphs keep to standard operators, so that TensorRT parses them. On ONNX Runtime's CPU
provider that attention writes the S x S scores out and reads them back op by op (scale, mask,
join, softmax, split), where com.microsoft.GroupQueryAttention keeps each head's scores in the
CPU's caches: a LLaVA-NeXT prompt of 2951 tokens prefilled in half the time (docs/performance.md).

The exporter records each node's module scope in its metadata ("namespace"); the attention core is a
module of its own (models/layers.py: CachedAttentionCore), so its nodes are found by scope, never by
the shape of the graph. Each core becomes If(past length == 1, fused, the core's own nodes). A past
of one row is the null row alone (a first prompt): the null row is masked and the mask is causal,
so the attention is causal self-attention over the new keys, which GroupQueryAttention computes.
With a real past (decode steps, a later turn's prompt) the core's nodes run as exported: they read
the cache where it lies, which none of ONNX Runtime's fused kernels can.

A core is left as it is unless everything checks out: float32, its tensors and head counts found,
one result; a graph with none rewritten gets no copy. Export's verification runs the copies, both
branches (a prompt, then decode steps). The vision towers' attention is not rewritten: their
MultiHeadAttention measured no faster end to end (docs/performance.md).
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from ..manifest import FUSED_SUFFIX, GraphSpec

_SCOPE = re.compile(r"^(?P<path>[\w.]+): [\w.]*\.CachedAttentionCore$")
PROJECTIONS = {"q": ".q_proj.", "k": ".k_proj.", "v": ".v_proj."}


def add_fused_graphs(folder: Path, specs: dict[str, GraphSpec]) -> dict[str, GraphSpec]:
    """Writes the fused copy of each graph in folder that has attention cores to rewrite; returns the
    specs, each with its copy's file (or None)."""
    out = {}
    for name, spec in specs.items():
        model = onnx.load(str(folder / spec.file), load_external_data=False)  # weights stay where they are
        fused_file = None
        if fuse_attention(model):
            fused_file = spec.file.removesuffix(".onnx") + FUSED_SUFFIX
            onnx.save(model, str(folder / fused_file))
        out[name] = replace(spec, onnxruntime_file=fused_file)
    return out


def fuse_attention(model: onnx.ModelProto) -> int:
    """Rewrites the model's attention cores in place; returns how many were rewritten."""
    graph, fused, tried = model.graph, 0, set()
    while True:  # one core at a time: rewriting the graph's node list copies its nodes
        cores: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            path = _core_path(node)
            if path is not None and path not in tried:
                cores.setdefault(path, []).append(node)
        if not cores:
            break
        path, nodes = next(iter(cores.items()))
        tried.add(path)
        plan = _Core(graph, path, nodes).plan()
        if plan is not None:
            _replace(graph, plan)
            fused += 1
    if fused:
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        used = _names_used(graph)  # shape constants only the replaced nodes read
        kept = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return fused


def _names_used(graph: onnx.GraphProto) -> set:
    """Every name a node reads, in the graph and its subgraphs, and the graph's outputs."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                used |= _names_used(attribute.g)
    return used


def _core_path(node: onnx.NodeProto) -> str | None:
    """The module path of the attention core the node belongs to (its scope), if any."""
    for prop in node.metadata_props:
        if prop.key == "namespace":
            for segment in prop.value.split("/"):
                match = _SCOPE.match(segment)
                if match:
                    return match["path"]
    return None


def _dims(tensor_type) -> list:
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]


class _Core:
    """One attention core's nodes, and what its fused replacement needs, found or not."""

    def __init__(self, graph: onnx.GraphProto, path: str, nodes: list):
        self.path, self.nodes = path, nodes
        self.types = {v.name: v.type.tensor_type for v in (*graph.input, *graph.value_info, *graph.output)}
        self.producer = {out: n for n in graph.node for out in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:  # an earlier core's If reads what its branches read
            branches = [a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
            for name in set(n.input).union(*(_names_used(g) for g in branches)):
                self.consumers.setdefault(name, []).append(n)
        self.graph_inputs = {v.name for v in graph.input}
        self.graph_outputs = {v.name for v in graph.output}
        self.initializers = {t.name for t in graph.initializer}

    def plan(self) -> dict | None:
        moved = self._moved()
        if moved is None or not any(n.op_type == "Softmax" for n in moved):
            return None
        outputs = [out for n in moved for out in n.output if self._escapes(out, moved)]
        tensors = self._tensors()
        if len(outputs) != 1 or tensors is None:
            return None
        q, k = _dims(self.types[tensors["q"]]), _dims(self.types[tensors["k"]])
        if _dims(self.types[tensors["v"]]) != k or len(k) != 4 or not k[2] or not k[3]:
            return None  # the cache's new rows, [S, B, G, D]
        if len(q) != 4 or q[3] != k[3] or not q[2] or q[2] % k[2]:
            return None  # the queries, [B, S, H, D]
        heads, kv_heads, head_dim = q[2], k[2], k[3]
        result = _result_shape(
            _dims(self.types[outputs[0]]) if outputs[0] in self.types else [], heads * head_dim
        )
        if result is None:
            return None
        return {
            "path": self.path,
            "moved": moved,
            "output": outputs[0],
            "tensors": tensors,
            "result_shape": result,
            "heads": heads,
            "kv_heads": kv_heads,
            "head_dim": head_dim,
        }

    def _moved(self) -> list | None:
        """The core's nodes that can go into a subgraph: none whose output another node outside needs
        but the core's one result (the exporter shares some shape computations between layers, and
        FastV's attention row a transposed key), nor any such node's ancestors inside the core."""
        moved = list(self.nodes)
        while True:
            stay = {id(n) for n in moved[:-1] if any(self._escapes(out, moved) for out in n.output)}
            if not stay:  # the last node's output, the core's result, escapes by design
                return moved
            ancestors = self._ancestors_within([n for n in moved if id(n) in stay], moved)
            moved = [n for n in moved if id(n) not in stay and id(n) not in ancestors]
            if not moved:
                return None

    def _escapes(self, name: str, moved: list) -> bool:
        inside = {id(n) for n in moved}
        return name in self.graph_outputs or any(id(c) not in inside for c in self.consumers.get(name, []))

    def _ancestors_within(self, starts: list, moved: list) -> set:
        inside = {id(n) for n in moved}
        seen, stack = set(), list(starts)
        while stack:
            for name in stack.pop().input:
                n = self.producer.get(name)
                if n is not None and id(n) in inside and id(n) not in seen:
                    seen.add(id(n))
                    stack.append(n)
        return seen

    def _tensors(self) -> dict | None:
        """What the fused kernel takes, None unless each is found once: the layer's cache tensors by
        name (graphs.py: past_key.i in, new_key.i and new_value.i out) and the query among the
        float inputs of the core's nodes, by the projection it comes from."""
        layer = re.search(r"layers\.(\d+)\.", self.path)
        if layer is None:
            return None
        i = layer[1]
        tensors = {"past_k": f"past_key.{i}", "k": f"new_key.{i}", "v": f"new_value.{i}"}
        if (
            tensors["past_k"] not in self.graph_inputs
            or not {tensors["k"], tensors["v"]} <= self.graph_outputs
        ):
            return None
        inside = {out for n in self.nodes for out in n.output}
        queries = {
            name
            for n in self.nodes
            for name in n.input
            if name not in inside
            and name in self.types
            and self.types[name].elem_type == TensorProto.FLOAT
            and self._projection(name) == "q"
        }
        if len(queries) != 1:
            return None
        return tensors | {"q": queries.pop()}

    def _projection(self, name: str, limit: int = 64) -> str | None:
        """Which of q_proj, k_proj, v_proj the tensor comes from: the projections' weights met first
        going back from it, no further than them (our modules keep transformers' parameter names);
        None if none or several."""
        found, seen, frontier = set(), set(), [name]
        while frontier and len(seen) < limit:
            n = self.producer.get(frontier.pop(0))
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            roles = {
                role
                for source in n.input
                if source in self.initializers
                for role, part in PROJECTIONS.items()
                if part in source
            }
            found |= roles
            if not roles:  # past a projection lies the layer's input, shared by all three
                frontier.extend(source for source in n.input if source and source not in self.initializers)
        return found.pop() if len(found) == 1 else None


def _result_shape(dims: list, width: int) -> list | None:
    """The Reshape target that makes the fused kernel's [B, S, H * D] the core's result: that itself
    ([0, 0, -1]), its 2-D rows, or [B, S, ...] with static trailing dims (the exporter may hand over
    the heads still apart, [B, S, G, R, D]); None if the result is none of these."""
    if len(dims) == 2 and dims[1] == width:
        return [-1, width]
    trailing = dims[2:]
    if len(dims) >= 3 and all(trailing) and math.prod(trailing) == width:
        return [0, 0, *trailing]
    return None


def _replace(graph: onnx.GraphProto, plan: dict) -> None:
    """The core's nodes out, its If in where its last node was: every input of the core is made
    before that, and its result is used only after it."""
    moved = {id(n) for n in plan["moved"]}
    produced = {out for n in plan["moved"] for out in n.output}
    plan["value_info"] = [v for v in graph.value_info if v.name in produced and v.name != plan["output"]]
    new = _if_node(plan)
    nodes, placed = [], False
    for n in reversed(graph.node):
        if id(n) in moved:
            if not placed:
                nodes.extend(reversed(new))
                placed = True
        else:
            nodes.append(n)
    kept_info = [v for v in graph.value_info if v.name not in produced]
    del graph.node[:], graph.value_info[:]
    graph.node.extend(reversed(nodes))
    graph.value_info.extend(kept_info)


def _constant(name: str, values: list, dtype: int = TensorProto.INT64) -> onnx.NodeProto:
    value = helper.make_tensor(f"{name}.value", dtype, [len(values)], values)
    return helper.make_node("Constant", [], [name], value=value)


def _if_node(plan: dict) -> list:
    """Nodes computing the core's result: If(the past is the null row alone, GroupQueryAttention over
    the new keys, the core's own nodes)."""
    t, out = plan["tensors"], plan["output"]
    n = lambda what: f"{plan['path']}.fused.{what}"  # noqa: E731
    fused = [_constant(n("flat"), [0, 0, -1]), _constant(n("one32"), [1], TensorProto.INT32)]
    for role in ("k", "v"):  # the cache's [S, B, G, D] as [B, S, G * D]
        fused += [
            helper.make_node("Transpose", [t[role]], [n(f"{role}.batch_first")], perm=[1, 0, 2, 3]),
            helper.make_node("Reshape", [n(f"{role}.batch_first"), n("flat")], [n(role)]),
        ]
    fused += [
        helper.make_node("Reshape", [t["q"], n("flat")], [n("q")]),  # [B, S, H, D] as [B, S, H * D]
        helper.make_node("Shape", [n("q")], [n("batch")], start=0, end=1),
        helper.make_node("Shape", [n("q")], [n("seq")], start=1, end=2),
        helper.make_node("Cast", [n("seq")], [n("seq32")], to=TensorProto.INT32),
        helper.make_node("Squeeze", [n("seq32")], [n("total")]),
        helper.make_node("Sub", [n("seq32"), n("one32")], [n("last32")]),
        helper.make_node("Expand", [n("last32"), n("batch")], [n("seqlens_k")]),  # each row: S - 1
        helper.make_node(
            "GroupQueryAttention",
            [n("q"), n("k"), n("v"), "", "", n("seqlens_k"), n("total")],
            [n("attended"), n("present_k"), n("present_v")],
            domain="com.microsoft",
            num_heads=plan["heads"],
            kv_num_heads=plan["kv_heads"],
            scale=plan["head_dim"] ** -0.5,
        ),
        _constant(n("result_shape"), plan["result_shape"]),
        helper.make_node("Reshape", [n("attended"), n("result_shape")], [n("out")]),
    ]
    # the other branch: the core's own nodes, its result renamed (a subgraph defines names of its own)
    unfused = [_copy(node) for node in plan["moved"]]
    for node in unfused:
        node.output[:] = [n("unfused") if name == out else name for name in node.output]
    result = lambda name: [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)]  # noqa: E731
    return [
        helper.make_node("Shape", [t["past_k"]], [n("past")], start=0, end=1),
        _constant(n("one"), [1]),
        helper.make_node("Equal", [n("past"), n("one")], [n("first_prompt")]),
        helper.make_node(
            "If",
            [n("first_prompt")],
            [out],
            then_branch=helper.make_graph(fused, n("then"), [], result(n("out"))),
            else_branch=helper.make_graph(
                unfused, n("else"), [], result(n("unfused")), value_info=plan["value_info"]
            ),
        ),
    ]


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy
