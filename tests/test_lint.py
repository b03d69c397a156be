"""The TensorRT-10 lint: each rule fires on a minimal graph that breaks it, and clean graphs pass."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mllm_edge.export.lint import BANNED_OPS, MAX_TOPK, LintFinding, lint_model, op_counts, supported_ops  # noqa: E402

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64


def make(nodes, inputs, outputs, initializers=(), opset=17, check=True, **kwargs) -> onnx.ModelProto:
    """A model from (name, dtype, shape) inputs/outputs; checked by onnx unless check=False."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(*i) for i in inputs],
        [helper.make_tensor_value_info(*o) for o in outputs],
        list(initializers),
    )
    opsets = kwargs.pop("opset_imports", [helper.make_opsetid("", opset)])
    model = helper.make_model(graph, opset_imports=opsets, **kwargs)
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def i64(name, values) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def topk_model(k_node=None, k_init=None, width=8, opset=17) -> onnx.ModelProto:
    """TopK over the last axis of x, with k from an initializer, a Constant node or (neither) a graph input."""
    nodes = [k_node] if k_node else []
    nodes.append(helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk"))
    inputs = [("x", FLOAT, [1, width])] + ([] if k_node or k_init else [("k", INT64, [1])])
    outputs = [("v", FLOAT, [1, "k"]), ("i", INT64, [1, "k"])]
    return make(nodes, inputs, outputs, [k_init] if k_init else [], opset=opset)


def ops_of(findings) -> list[str]:
    return [f.op for f in findings]


# -- clean graphs ---------------------------------------------------------------------------------


def test_clean_graph_has_no_findings():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
        helper.make_node("Softmax", ["y"], ["p"], name="softmax", axis=-1),
        helper.make_node("TopK", ["p", "k_init"], ["v1", "i1"], name="topk_init"),
        helper.make_node("Constant", [], ["k_const"], name="k", value=i64("k", [5])),
        helper.make_node("TopK", ["p", "k_const"], ["v2", "i2"], name="topk_const"),
    ]
    w = numpy_helper.from_array(np.ones((8, 16), np.float32), "w")
    outputs = [("v1", FLOAT, [2, 5]), ("i1", INT64, [2, 5]), ("v2", FLOAT, [2, 5]), ("i2", INT64, [2, 5])]
    model = make(nodes, [("x", FLOAT, [2, 8])], outputs, [w, i64("k_init", [5])])
    assert lint_model(model) == []


@pytest.mark.parametrize("attr", ["value_ints", "value_int"])
def test_topk_k_from_constant_ints(attr):
    k_node = helper.make_node("Constant", [], ["k"], **{attr: [5] if attr == "value_ints" else 5})
    model = topk_model(k_node=k_node) if attr == "value_ints" else _unchecked_topk(k_node)
    assert lint_model(model) == []


def _unchecked_topk(k_node):
    # value_int makes a scalar k, which onnx's shape inference refuses for TopK; the lint must still read it
    nodes = [k_node, helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk")]
    return make(nodes, [("x", FLOAT, [1, 8])], [("v", FLOAT, None), ("i", INT64, None)], check=False)


def test_slice_and_squeeze_with_constant_axes_pass():
    nodes = [
        helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["s"], name="slice"),
        helper.make_node("Slice", ["x", "starts", "ends", "", "steps"], ["s2"], name="slice_no_axes"),
        helper.make_node("Constant", [], ["ax0"], value_ints=[0]),
        helper.make_node("Unsqueeze", ["s", "ax0"], ["u"], name="unsqueeze"),
        helper.make_node("Squeeze", ["u", "ax0"], ["q"], name="squeeze"),
    ]
    inits = [i64("starts", [1]), i64("ends", [3]), i64("axes", [1]), i64("steps", [1])]
    outputs = [("q", FLOAT, [2, 2]), ("s2", FLOAT, [1, 8])]
    assert lint_model(make(nodes, [("x", FLOAT, [2, 8])], outputs, inits)) == []


# -- model-level rules ----------------------------------------------------------------------------


def test_opset_above_20():
    findings = lint_model(topk_model(k_init=i64("k", [5]), opset=21))
    assert len(findings) == 1 and findings[0].op == ""
    assert "opset 21" in findings[0].message


def test_custom_domain_node_and_its_opset_import():
    node = helper.make_node("MyOp", ["x"], ["y"], name="mine", domain="com.example")
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    model = make([node], [("x", FLOAT, [2])], [("y", FLOAT, [2])], opset_imports=opsets, check=False)
    findings = lint_model(model)
    assert len(findings) == 2
    assert "com.example" in findings[0].message and findings[0].op == ""
    assert findings[1].op == "MyOp" and "custom domain 'com.example'" in findings[1].message


def test_model_local_function():
    body = [helper.make_node("Add", ["a", "b"], ["c"])]
    fn = helper.make_function("local", "AddTwo", ["a", "b"], ["c"], body, [helper.make_opsetid("", 17)])
    node = helper.make_node("AddTwo", ["x", "x"], ["y"], name="call", domain="local")
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    model = make([node], [("x", FLOAT, [2])], [("y", FLOAT, [2])], opset_imports=opsets, functions=[fn])
    messages = [f.message for f in lint_model(model)]
    assert any("model-local function 'local:AddTwo'" in m and "inline" in m for m in messages)


# -- op rules -------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["StringNormalizer", "NotARealOp"])
def test_op_not_in_the_supported_list(op):
    model = make(
        [helper.make_node(op, ["x"], ["y"], name="n")], [("x", FLOAT, [2])], [("y", FLOAT, [2])], check=False
    )
    assert lint_model(model) == [LintFinding("n", op, "not supported by TensorRT 10's ONNX parser")]


@pytest.mark.parametrize("op", ["NonZero", "CumSum"])
def test_banned_ops_in_the_parser_list(op):
    assert op in supported_ops()  # banned by us, not by the parser
    if op == "NonZero":
        node, inits, out = helper.make_node(op, ["x"], ["y"], name="n"), [], ("y", INT64, [1, "n"])
    else:
        node, inits, out = (
            helper.make_node(op, ["x", "axis"], ["y"], name="n"),
            [i64("axis", 0)],
            ("y", FLOAT, [4]),
        )
    findings = lint_model(make([node], [("x", FLOAT, [4])], [out], inits))
    assert findings == [LintFinding("n", op, f"banned: {BANNED_OPS[op]}")]


@pytest.mark.parametrize("op", sorted(BANNED_OPS))
def test_every_banned_op_names_its_reason(op):
    model = make(
        [helper.make_node(op, ["x"], ["y"], name="n")], [("x", FLOAT, [2])], [("y", FLOAT, [2])], check=False
    )
    [finding] = lint_model(model)
    assert finding.op == op and BANNED_OPS[op] in finding.message


def test_topk_with_dynamic_k():
    [finding] = lint_model(topk_model())
    assert finding.op == "TopK" and "k 'k' must be a constant" in finding.message


@pytest.mark.parametrize("k, bad", [(MAX_TOPK - 1, False), (MAX_TOPK, True)])
def test_topk_limit(k, bad):
    for model in (
        topk_model(k_init=i64("k", [k]), width=4000),
        topk_model(k_node=helper.make_node("Constant", [], ["k"], value=i64("kv", [k])), width=4000),
    ):
        findings = lint_model(model)
        if bad:
            assert len(findings) == 1 and f"k={k} must be < 3840" in findings[0].message
            assert str(findings[0]).startswith("TopK 'topk': k=3840")
        else:
            assert findings == []


def test_slice_axes_from_graph_input():
    node = helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"], name="slice")
    model = make(
        [node],
        [("x", FLOAT, [2, 8]), ("axes", INT64, [1])],
        [("y", FLOAT, ["a", "b"])],
        [i64("starts", [1]), i64("ends", [3])],
    )
    [finding] = lint_model(model)
    assert finding.op == "Slice" and "axes 'axes' must be a constant" in finding.message


@pytest.mark.parametrize("op", ["Unsqueeze", "Squeeze"])
def test_squeeze_axes_from_graph_input(op):
    node = helper.make_node(op, ["x", "axes"], ["y"], name="n")
    out_shape = ["a", "b", "c"] if op == "Unsqueeze" else ["a"]
    model = make([node], [("x", FLOAT, [1, 8]), ("axes", INT64, [1])], [("y", FLOAT, out_shape)])
    [finding] = lint_model(model)
    assert finding.op == op and "axes 'axes' must be a constant" in finding.message


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceMax"])
def test_reduce_axes_must_be_constant(op):
    node = helper.make_node(op, ["x", "axes"], ["y"], name="r")
    model = make([node], [("x", FLOAT, [2, 8]), ("axes", INT64, [1])], [("y", FLOAT, ["a", "b"])], opset=18)
    [finding] = lint_model(model)
    assert finding.op == op and "axes 'axes' must be a constant" in finding.message
    constant = make([node], [("x", FLOAT, [2, 8])], [("y", FLOAT, ["a", "b"])], [i64("axes", [1])], opset=18)
    assert lint_model(constant) == []


def test_pad_axes_must_be_constant():
    node = helper.make_node("Pad", ["x", "pads", "", "axes"], ["y"], name="pad")
    model = make(
        [node],
        [("x", FLOAT, [2, 8]), ("axes", INT64, [1])],
        [("y", FLOAT, ["a", "b"])],
        [i64("pads", [1, 1])],
        opset=18,
    )
    [finding] = lint_model(model)
    assert finding.op == "Pad" and "axes 'axes' must be a constant" in finding.message


def test_unsorted_topk_is_a_finding():
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", sorted=0)
    model = make(
        [node], [("x", FLOAT, [1, 8])], [("v", FLOAT, [1, 3]), ("i", INT64, [1, 3])], [i64("k", [3])]
    )
    [finding] = lint_model(model)
    assert "sorted=0" in finding.message


# -- subgraphs ------------------------------------------------------------------------------------


def _branch(nodes, out_name, dtype, shape):
    return helper.make_graph(nodes, "branch", [], [helper.make_tensor_value_info(out_name, dtype, shape)])


def test_banned_op_hidden_in_if_branch():
    then_g = _branch([helper.make_node("NonZero", ["x"], ["t"], name="hidden")], "t", INT64, [1, "n"])
    else_g = _branch([helper.make_node("Constant", [], ["e"], value=i64("e", [[0, 1]]))], "e", INT64, [1, 2])
    node = helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)
    model = make([node], [("x", FLOAT, [4]), ("c", TensorProto.BOOL, [])], [("y", INT64, [1, "n"])])
    findings = lint_model(model)
    assert ops_of(findings) == ["If", "NonZero"]
    assert findings[1].node == "hidden" and "inside If 'branch'" in findings[1].message


def test_banned_op_hidden_in_loop_body():
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("CumSum", ["v_in", "axis"], ["v_out"], name="hidden"),
        ],
        "body",
        [
            helper.make_tensor_value_info("iter", INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", FLOAT, [4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", FLOAT, [4]),
        ],
        [i64("axis", 0)],
    )
    node = helper.make_node("Loop", ["n", "", "x"], ["y"], name="loop", body=body)
    model = make([node], [("x", FLOAT, [4]), ("n", INT64, [])], [("y", FLOAT, [4])])
    assert ops_of(lint_model(model)) == ["Loop", "CumSum"]
    assert op_counts(model) == {"CumSum": 1, "Identity": 1, "Loop": 1}


def test_subgraph_sees_outer_constants():
    # k lives in the outer graph; the TopK inside the branch must still count it as constant
    then_g = _branch([helper.make_node("TopK", ["x", "k"], ["t", "ti"], name="inner")], "t", FLOAT, ["n"])
    else_g = _branch([helper.make_node("Identity", ["x"], ["e"])], "e", FLOAT, [8])
    node = helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)
    model = make(
        [node], [("x", FLOAT, [8]), ("c", TensorProto.BOOL, [])], [("y", FLOAT, ["n"])], [i64("k", [9999])]
    )
    findings = lint_model(model)
    assert ops_of(findings) == ["If", "TopK"] and "k=9999" in findings[1].message


# -- loading, counts, the op list -----------------------------------------------------------------


def test_path_with_external_data_is_not_loaded(tmp_path):
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
        helper.make_node("Constant", [], ["k"], value=i64("kv", [2])),
        helper.make_node("TopK", ["y", "k"], ["v", "i"], name="topk"),
    ]
    w = numpy_helper.from_array(np.ones((8, 16), np.float32), "w")
    model = make(nodes, [("x", FLOAT, [2, 8])], [("v", FLOAT, [2, 2]), ("i", INT64, [2, 2])], [w], opset=21)
    path = tmp_path / "m.onnx"
    onnx.save_model(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="w.data",
        size_threshold=0,
    )
    (tmp_path / "w.data").unlink()  # loading the weights would now fail
    for source in (path, str(path)):
        assert [f.message for f in lint_model(source)] == [
            "opset 21 > 20: TensorRT 10 parses opsets up to 20 (21 for INT4 Q/DQ)"
        ]
        assert op_counts(source) == {"Constant": 1, "MatMul": 1, "TopK": 1}


def test_topk_k_in_external_data_is_a_finding(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(
        topk_model(k_init=i64("k", [5])),
        path,
        save_as_external_data=True,
        location="w.data",
        size_threshold=0,
    )
    [finding] = lint_model(path)
    assert "k cannot be read" in finding.message


def test_op_counts_are_sorted():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Add", ["a", "a"], ["b"]),
        helper.make_node("Relu", ["b"], ["y"]),
    ]
    counts = op_counts(make(nodes, [("x", FLOAT, [2])], [("y", FLOAT, [2])]))
    assert counts == {"Add": 1, "Relu": 2} and list(counts) == ["Add", "Relu"]


def test_finding_str():
    assert str(LintFinding("n1", "TopK", "k=4000 must be < 3840")) == "TopK 'n1': k=4000 must be < 3840"
    assert str(LintFinding("", "", "opset 21 > 20")) == "opset 21 > 20"


def test_supported_ops_from_the_packaged_json():
    ops = supported_ops()
    assert {"MatMul", "TopK", "GatherElements"} <= ops
    listed = json.loads(resources.files("mllm_edge.export").joinpath("trt10_onnx_ops.json").read_text())[
        "supported"
    ]
    assert len(listed) == len(set(listed)) == len(ops)
