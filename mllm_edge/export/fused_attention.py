"""ONNX Runtime's fused attention kernels in place of a graph's standard-operator attention: a second
copy of each graph with attention, NAME.onnxruntime.onnx, over the same weight data, which the
onnxruntime backend runs (runtime/backends/onnxruntime.py); TensorRT builds NAME.onnx.

A bundle's graphs keep to standard operators, so that TensorRT parses them. On ONNX Runtime's CPU
provider that attention writes the scores out and reads them back op by op (scale, mask, join,
softmax, split), where its contrib kernels keep each head's scores in the CPU's caches: 24 layers of
a 589-token prefill, 16 heads of 64, took 310 ms against GroupQueryAttention's 207 (docs/performance.md).

The exporter records each node's module scope in its metadata ("namespace"); the attention cores are
modules of their own (models/layers.py), so their nodes are found by scope, never by the shape of the
graph:

- AttentionCore (vision towers: no mask, no cache) becomes com.microsoft.MultiHeadAttention.
- CachedAttentionCore (decoders) becomes If(past length == 1, fused, the core's own nodes). A past of
  one row is the null row alone (a first prompt): the null row is masked and the mask is causal, so
  the attention is causal self-attention over the new keys, which com.microsoft.GroupQueryAttention
  computes. With a real past (decode steps, a later turn's prompt) the core's nodes run as exported:
  they read the cache where it lies, which none of ONNX Runtime's fused kernels can.

A core is left as it is unless everything checks out: float32, its tensors and head counts found,
one result; a graph with none rewritten gets no copy. Export's verification runs the copies, both
branches (a prompt, then decode steps).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from ..manifest import FUSED_SUFFIX, GraphSpec

CORES = {"AttentionCore": "vision", "CachedAttentionCore": "cached"}
_SCOPE = re.compile(r"^(?P<path>[\w.]+): [\w.]*\.(?P<cls>" + "|".join(CORES) + r")$")
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
        cores: dict[str, tuple[str, list[onnx.NodeProto]]] = {}
        for node in graph.node:
            scope = _core_scope(node)
            if scope is not None and scope[0] not in tried:
                cores.setdefault(scope[0], (scope[1], []))[1].append(node)
        if not cores:
            break
        path, (kind, nodes) = next(iter(cores.items()))
        tried.add(path)
        plan = _Core(graph, path, kind, nodes, _value_types(graph)).plan()
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


def _core_scope(node: onnx.NodeProto) -> tuple[str, str] | None:
    for prop in node.metadata_props:
        if prop.key == "namespace":
            for segment in prop.value.split("/"):
                match = _SCOPE.match(segment)
                if match:
                    return match["path"], CORES[match["cls"]]
    return None


def _value_types(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto.Tensor]:
    return {v.name: v.type.tensor_type for v in (*graph.input, *graph.value_info, *graph.output)}


def _dims(tensor_type) -> list:
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]


class _Core:
    """One attention core's nodes, and what its fused replacement needs, found or not."""

    def __init__(self, graph, path: str, kind: str, nodes: list, types: dict):
        self.graph, self.path, self.kind, self.types = graph, path, kind, types
        self.producer = {out: n for n in graph.node for out in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for name in n.input:
                self.consumers.setdefault(name, []).append(n)
        self.graph_inputs = {v.name for v in graph.input}
        self.graph_outputs = {v.name for v in graph.output}
        self.initializers = {t.name: t for t in graph.initializer}
        self.nodes = nodes

    def plan(self) -> dict | None:
        moved = self._moved()
        if moved is None or not any(n.op_type == "Softmax" for n in moved):
            return None
        outputs = [out for n in moved for out in n.output if self._escapes(out, moved)]
        if len(outputs) != 1:
            return None
        # the core's inputs are what its nodes read from outside it, whichever of its nodes stay (a
        # transposed key that FastV's or FasterVLM's attention row shares is still the key's copy)
        inside = {out for n in self.nodes for out in n.output}
        external = [
            name
            for n in self.nodes
            for name in n.input
            if name and name not in inside and name not in self.initializers and not self._constant(name)
        ]
        external = list(dict.fromkeys(external))
        tensors = self._roles(external)
        if tensors is None:
            return None
        shapes = {role: _dims(self.types[tensors[role]]) for role in ("q", "k", "v")}
        heads = self._heads(shapes)
        result = _dims(self.types[outputs[0]]) if outputs[0] in self.types else []
        if heads is None or not _result_shape(result, heads["heads"] * heads["head_dim"]):
            return None
        return {
            "path": self.path,
            "kind": self.kind,
            "moved": moved,
            "output": outputs[0],
            "tensors": tensors,
            "ranks": {role: len(dims) for role, dims in shapes.items()},
            "result_shape": _result_shape(result, heads["heads"] * heads["head_dim"]),
            **heads,
        }

    def _heads(self, shapes: dict) -> dict | None:
        """Query and key/value heads and the head size, from the static dims of q, k, v: the key is
        [.., .., G, D]; the query and value the same or [.., H * D] (the exporter may hand over a
        projection's 2-D rows)."""
        k = shapes["k"]
        if len(k) != 4 or not k[2] or not k[3]:
            return None  # the key's dims give the batch, sequence and head dims
        kv_heads, head_dim = k[2], k[3]

        def count(dims: list) -> int | None:
            if len(dims) == 4:
                return dims[2] if dims[3] == head_dim and dims[2] else None
            last = dims[-1] if len(dims) in (2, 3) else None
            return last // head_dim if last and last % head_dim == 0 else None

        heads = count(shapes["q"])
        if heads is None or count(shapes["v"]) != kv_heads or heads % kv_heads:
            return None
        if self.kind == "cached" and len(shapes["v"]) != 4:
            return None  # the cache's new rows, [S, B, G, D]
        if self.kind == "vision" and heads != kv_heads:  # MultiHeadAttention has no grouped keys
            return None
        return {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}

    def _moved(self) -> list | None:
        """The core's nodes that can go into a subgraph: none whose output another node outside needs
        but the core's one result (the exporter may share a shape computation between layers), nor any
        such node's ancestors inside the core."""
        moved = list(self.nodes)
        while True:
            stay = {id(n) for n in moved if sum(self._escapes(out, moved) for out in n.output) > 0}
            # the core's result (its last node's output) escapes by design
            last = moved[-1] if moved else None
            if last is not None:
                stay.discard(id(last))
            if not stay:
                return moved
            ancestors = self._ancestors_within([n for n in moved if id(n) in stay], moved)
            moved = [n for n in moved if id(n) not in stay and id(n) not in ancestors]
            if not moved:
                return None

    def _escapes(self, name: str, moved: list) -> bool:
        inside = {id(n) for n in moved}
        return name in self.graph_outputs or any(id(c) not in inside for c in self.consumers.get(name, []))

    def _ancestors_within(self, starts: list, moved: list) -> set:
        inside = {id(n): n for n in moved}
        seen, stack = set(), list(starts)
        while stack:
            for name in stack.pop().input:
                n = self.producer.get(name)
                if n is not None and id(n) in inside and id(n) not in seen:
                    seen.add(id(n))
                    stack.append(n)
        return seen

    def _constant(self, name: str) -> bool:
        n = self.producer.get(name)
        return n is not None and n.op_type == "Constant"

    def _roles(self, external: list) -> dict | None:
        """The tensors the fused kernel takes, None unless each is found once: for a decoder's core its
        layer's cache tensors by name (graphs.py: past_key.i in, new_key.i out; the exporter may hand
        the core a transposed copy of them, shared with FastV's attention row) and the query among
        the core's inputs; for a vision core q, k and v among them, by the projection they come from."""
        tensors = {}
        if self.kind == "cached":
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
        for name in external:
            value_type = self.types.get(name)
            if value_type is None or value_type.elem_type != TensorProto.FLOAT:
                continue  # shapes and indices (the exporter shares some between layers)
            role = self._projection(name)
            if role is None or self.kind == "cached" and role != "q":
                continue  # a decoder's k and v are its cache's tensors, named above
            if role in tensors:
                return None
            tensors[role] = name
        wanted = {"q", "k", "v"} | ({"past_k"} if self.kind == "cached" else set())
        return tensors if set(tensors) == wanted else None

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


def _replace(graph: onnx.GraphProto, plan: dict) -> None:
    """The core's nodes out, its replacement in where its last node was: every input of the core is
    made before that, and its result is used only after it."""
    moved = {id(n) for n in plan["moved"]}
    produced = {out for n in plan["moved"] for out in n.output}
    plan["value_info"] = [v for v in graph.value_info if v.name in produced and v.name != plan["output"]]
    new = _vision_nodes(plan) if plan["kind"] == "vision" else _cached_nodes(plan)
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


def _name(plan: dict, what: str) -> str:
    return f"{plan['path']}.fused.{what}"


def _flat_inputs(plan: dict, seq_first: bool) -> tuple[list, dict]:
    """Nodes making q, k, v the fused kernels' [B, S, N * D] from [B, S, N, D] (k and v [S, B, N, D]
    if seq_first), from [B, S, N * D], or from 2-D rows [B * S, N * D] (B and S then read off k)."""
    n = lambda what: _name(plan, what)  # noqa: E731
    nodes = [_constant(n("flat_shape"), [0, 0, -1])]
    if 2 in plan["ranks"].values():
        nodes.append(_constant(n("minus_one"), [-1]))
    flat = {}
    for role in ("k", "v", "q"):  # k first: 2-D rows take their shape from it
        source, rank = plan["tensors"][role], plan["ranks"][role]
        if rank == 4 and seq_first and role != "q":
            nodes.append(
                helper.make_node("Transpose", [source], [n(f"{role}.batch_first")], perm=[1, 0, 2, 3])
            )
            source = n(f"{role}.batch_first")
        if rank == 3:
            flat[role] = source
            continue
        shape = n("flat_shape")
        if rank == 2:
            nodes += [
                helper.make_node("Shape", [flat["k"]], [n(f"{role}.batch_seq")], start=0, end=2),
                helper.make_node(
                    "Concat", [n(f"{role}.batch_seq"), n("minus_one")], [n(f"{role}.shape")], axis=0
                ),
            ]
            shape = n(f"{role}.shape")
        nodes.append(helper.make_node("Reshape", [source, shape], [n(f"{role}.flat")]))
        flat[role] = n(f"{role}.flat")
    return nodes, flat


def _result_shape(dims: list, width: int) -> list | None:
    """The Reshape target that makes the fused kernels' [B, S, H * D] the core's result: that itself
    ([0, 0, -1]), its 2-D rows, or [B, S, ...] with static trailing dims (the exporter may hand over
    the heads still apart, [B, S, G, R, D]); None if the result is none of these."""
    if len(dims) == 2 and dims[1] == width:
        return [-1, width]
    trailing = dims[2:]
    if len(dims) >= 3 and all(trailing) and _product(trailing) == width:
        return [0, 0, *trailing]
    return None


def _product(values: list) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _as_result(plan: dict, fused: str, out: str) -> list:
    shape = _name(plan, f"{out}.shape")
    return [_constant(shape, plan["result_shape"]), helper.make_node("Reshape", [fused, shape], [out])]


def _constant(name: str, values: list, dtype: int = TensorProto.INT64) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=helper.make_tensor(f"{name}.value", dtype, [len(values)], values)
    )


def _vision_nodes(plan: dict) -> list:
    nodes, flat = _flat_inputs(plan, seq_first=False)
    nodes.append(
        helper.make_node(
            "MultiHeadAttention",
            [flat["q"], flat["k"], flat["v"]],
            [_name(plan, "out")],
            domain="com.microsoft",
            num_heads=plan["heads"],
            scale=plan["head_dim"] ** -0.5,
        )
    )
    return nodes + _as_result(plan, _name(plan, "out"), plan["output"])


def _cached_nodes(plan: dict) -> list:
    t, out = plan["tensors"], plan["output"]
    fused, flat = _flat_inputs(plan, seq_first=True)
    n = lambda what: _name(plan, what)  # noqa: E731
    fused += [
        helper.make_node("Shape", [flat["q"]], [n("batch")], start=0, end=1),
        helper.make_node("Shape", [flat["q"]], [n("seq")], start=1, end=2),
        helper.make_node("Cast", [n("seq")], [n("seq32")], to=TensorProto.INT32),
        helper.make_node("Squeeze", [n("seq32")], [n("total")]),
        helper.make_node("Sub", [n("seq32"), n("one32")], [n("last32")]),
        helper.make_node("Expand", [n("last32"), n("batch")], [n("seqlens_k")]),
        helper.make_node(
            "GroupQueryAttention",
            [flat["q"], flat["k"], flat["v"], "", "", n("seqlens_k"), n("total")],
            [n("attended"), n("present_k"), n("present_v")],
            domain="com.microsoft",
            num_heads=plan["heads"],
            kv_num_heads=plan["kv_heads"],
            scale=plan["head_dim"] ** -0.5,
        ),
        *_as_result(plan, n("attended"), n("out")),
    ]
    fused.insert(0, _constant(n("one32"), [1], TensorProto.INT32))
    # the else branch: the core's own nodes, its result renamed (a subgraph defines names of its own)
    unfused = [_copy(node) for node in plan["moved"]]
    for node in unfused:
        for i, name in enumerate(node.output):
            if name == out:
                node.output[i] = n("unfused")
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
