"""`mllm-edge calibrate --target tensorrt`: Model Optimizer's Q/DQ graphs, calibrated on real runs.

What is checked: the recorder saves exactly what the runtime fed each graph (cache included);
calibrated graphs pass the ONNX checker and the TensorRT lint and hold only default-domain ops;
the built-in model's int8 and int4-awq bundles answer held-out questions and agree with fp32;
calibration is deterministic given the seed; the lint's Q/DQ rules fail on graphs TensorRT refuses;
build settings and the fp8 refusal for Orin; bad input is a clear error with nothing written.
TensorRT itself never runs here.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("onnxruntime", reason="calibration needs the onnxruntime extra")
onnx = pytest.importorskip("onnx", reason="calibration needs the export extra")
pytest.importorskip("modelopt.onnx.quantization", reason="the tensorrt target needs the calibrate extra")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mllm_edge.calibration import data as calibration_data  # noqa: E402
from mllm_edge.calibration.calibrate import CalibrateConfig, calibrate_bundle  # noqa: E402
from mllm_edge.calibration.record import load_call, record  # noqa: E402
from mllm_edge.cli import app  # noqa: E402
from mllm_edge.errors import MllmEdgeError  # noqa: E402
from mllm_edge.evaluate import evaluate, synthetic_items  # noqa: E402
from mllm_edge.export.lint import lint_model  # noqa: E402
from mllm_edge.manifest import load_manifest  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def built_in(tmp_path_factory):
    """The built-in model's fp32 bundles: unpruned and FastV K=2 R=0.5."""
    from mllm_edge.default_model import checkpoint
    from mllm_edge.export.bundle import ExportConfig, export_bundle
    from mllm_edge.pruning import PruningConfig

    root = tmp_path_factory.mktemp("calibrate")
    bundles = {}
    for method, ratio in (("none", 0.0), ("fastv", 0.5)):
        bundles[method] = root / method
        export_bundle(
            ExportConfig(str(checkpoint()), bundles[method], PruningConfig.from_method(method, ratio))
        )
    return bundles


@pytest.fixture(scope="module")
def calibrated(built_in):
    """int8 and int4-awq of the FastV bundle (both LLM graphs), on the default synthetic data."""
    return {p: calibrate_bundle(CalibrateConfig(built_in["fastv"], p)) for p in ("int8", "int4-awq")}


def test_recorded_calls_equal_what_the_runtime_fed_the_graphs(built_in, tmp_path):
    from mllm_edge.runtime.pipeline import Pipeline

    items = synthetic_items(2, seed=5)
    recording = record(built_in["fastv"], items, ["llm_head", "llm_tail"], tmp_path, outputs=True)
    seen = {"llm_head": [], "llm_tail": []}
    with Pipeline.load(
        built_in["fastv"], backend="onnxruntime", low_memory=True
    ) as pipeline:  # as record runs
        pipeline.observe(
            lambda g, i, o: g in seen and seen[g].append({k: np.array(v) for k, v in {**i, **o}.items()})
        )
        answers = [pipeline.generate(it.image, it.question, max_new_tokens=8).text for it in items]
    assert recording.answers == answers
    for graph, calls in seen.items():
        assert len(recording.calls[graph]) == len(calls) > len(items)  # decode steps too
        for path, expected in zip(recording.calls[graph], calls):
            inputs, outputs = load_call(path)
            assert set(inputs) | set(outputs) == set(expected)
            for name, value in {**inputs, **outputs}.items():
                np.testing.assert_array_equal(value, expected[name])
        pasts = [
            load_call(p)[0]["past_key.0" if graph == "llm_head" else "past_key.2"]
            for p in recording.calls[graph]
        ]
        assert any(p.shape[0] > 1 and np.abs(p[1:]).max() > 0 for p in pasts)  # a real cache, not zeros


def test_calibrated_graphs_are_standard_qdq_that_lint_clean(calibrated):
    for precision, report in calibrated.items():
        m = report.manifest
        q = m.quantization
        assert (q["weights"], q["target"], q["format"], q["backends"]) == (
            precision,
            "tensorrt",
            "onnx Q/DQ",
            ["onnxruntime", "tensorrt"],
        )
        assert q["graphs"] == ["llm_head", "llm_tail"] and m.schema_version == 3
        cal = q["calibration"]
        library = "nvidia-modelopt" if precision == "int4-awq" else "onnxruntime"  # int8: its ranges
        assert cal["samples"] == 32 and cal["held_out"] == 12 and cal["library"].startswith(library)
        assert cal["recorded_calls"]["llm_head"] > 32  # prefill and decode calls
        for graph in q["graphs"]:
            path = report.out / m.graphs[graph].file
            onnx.checker.check_model(str(path))
            model = onnx.load(str(path), load_external_data=False)
            assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
            assert lint_model(path) == []
            ops = [n.op_type for n in model.graph.node]
            dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
            lm_head = [n for n in model.graph.node if n.op_type == "Gemm"]
            # every weight matrix but the LM head (left in float, as a Gemm)
            assert len(dq) >= 7 * 2 and ("Gemm" in ops) == (graph == "llm_tail") and len(lm_head) <= 1
            inits = {t.name: t for t in model.graph.initializer}
            weights = [inits[n.input[0]] for n in dq if n.input[0] in inits]
            want = TensorProto.INT4 if precision == "int4-awq" else TensorProto.INT8
            assert weights and all(w.data_type == want for w in weights)
            if precision == "int4-awq":
                assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {21}
                assert m.quantization["per_graph"][graph]["block_size"] == 64  # 128 does not divide 192
        for r in report.graphs:
            assert r.check.ok and r.bytes_after < 0.4 * r.bytes_before
        assert report.answers.ok


def test_the_built_in_model_still_answers_in_int8_and_int4_awq(built_in, calibrated):
    """The issue's bar: >= 95% of 60 held-out questions right, and >= 95% the same as fp32's."""
    items = synthetic_items(60)
    for report in calibrated.values():
        result = evaluate(report.out, items, baseline=built_in["fastv"], backend="onnxruntime")
        assert result.accuracy >= 0.95 and result.agreement >= 0.95, (report.precision.name, result.by_kind)


def test_int4_awq_one_weight_at_a_time_equals_model_optimizers_own_driver(built_in, tmp_path):
    """calibrate's lean AWQ-clip (awq.py) against the library's whole-graph driver on the same
    recorded calls: the same int4 values and the same scales for every weight."""
    import modelopt_driver

    from mllm_edge.calibration import awq, precisions

    bundle = built_in["fastv"]
    recording = record(bundle, synthetic_items(3, seed=11), ["llm_tail"], tmp_path / "rec")
    calls = recording.calls["llm_tail"]
    select = lambda weight: "lm_head" not in weight
    (tmp_path / "ours").mkdir()
    (tmp_path / "library").mkdir()
    awq.quantize_graph(bundle, tmp_path / "ours", "llm_tail", 64, select, calls)
    int4 = precisions.precision("int4-awq", "tensorrt")
    modelopt_driver.quantize_graph(
        bundle, tmp_path / "library", "llm_tail", int4, select, calls, 64, "float32", tmp_path / "work"
    )

    def quantized(folder):
        model = onnx.load(str(folder / "llm_tail.onnx"))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        found = {}
        for node in model.graph.node:
            if node.op_type == "DequantizeLinear":
                weight = node.input[0].split(".T_")[0]  # both name them after the transposed weight
                found[weight] = (inits[node.input[0]].astype(np.int8), inits[node.input[1]])
        return found

    ours, library = quantized(tmp_path / "ours"), quantized(tmp_path / "library")
    assert set(ours) == set(library) and len(ours) == 7 * 2  # 2 layers after K=2, the LM head left
    for weight, (q, scales) in library.items():
        assert ours[weight][0].shape == q.shape and ours[weight][1].shape == scales.shape
        assert np.mean(ours[weight][0] == q) > 0.999, weight  # a tie between alphas may go either way
        assert np.mean(np.isclose(ours[weight][1], scales, rtol=1e-6)) > 0.99, weight


def _qdq(folder, name="llm_tail"):
    """The Q/DQ a graph holds: {activation name: its scale}, {weight: (values, scales, zero points)},
    and the names of the MatMuls whose inputs both come from a DequantizeLinear."""
    model = onnx.load(str(folder / f"{name}.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    made = {o: n for n in model.graph.node for o in n.output}
    activations, weights, matmuls = {}, {}, set()
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            activations[node.input[0]] = float(inits[node.input[1]])
            assert not np.any(inits[node.input[2]].astype(np.float32)), "a zero point is not zero"
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits:
            weights[node.input[0].split(".T")[0]] = tuple(inits[i] for i in node.input)
        elif node.op_type == "MatMul":
            if all(made.get(x) is not None and made[x].op_type == "DequantizeLinear" for x in node.input):
                matmuls.add(made[node.input[1]].input[0])  # named by its weight
    return activations, weights, matmuls


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_w8a8_one_weight_at_a_time_equals_model_optimizers_driver(built_in, tmp_path, kind):
    """calibrate's int8/fp8 (qdq.py) against the library's whole-graph driver on the same recorded
    calls: the same MatMuls quantized. int8: the same weights and weight scales, the same activation
    scales (entropy). fp8: activation scales of r / 448 where the driver's (max) are r / 127 * 448 /
    127 (NVIDIA/Model-Optimizer#215), and weights that use E4M3's whole range."""
    import ml_dtypes
    import modelopt_driver

    from mllm_edge.calibration import precisions, qdq

    bundle = built_in["fastv"]
    recording = record(bundle, synthetic_items(3, seed=12), ["llm_tail"], tmp_path / "rec")
    calls = recording.calls["llm_tail"]
    select = lambda weight: "lm_head" not in weight
    precision = precisions.precision(kind, "tensorrt")
    for folder in ("ours", "library"):
        (tmp_path / folder).mkdir()
    qdq.quantize_graph(bundle, tmp_path / "ours", "llm_tail", precision, select, calls)
    modelopt_driver.quantize_graph(
        bundle, tmp_path / "library", "llm_tail", precision, select, calls, None, "float32", tmp_path / "w"
    )
    ours, library = _qdq(tmp_path / "ours"), _qdq(tmp_path / "library")
    assert ours[2] == library[2] and len(ours[2]) == 7 * 2  # 2 layers after K=2, the LM head left
    assert set(ours[0]) == set(library[0])
    source = {
        t.name: numpy_helper.to_array(t) for t in onnx.load(str(bundle / "llm_tail.onnx")).graph.initializer
    }
    for weight, (q, scales, _) in ours[1].items():
        w = source[weight].T  # [K, N]
        if kind == "int8":
            assert np.array_equal(q, library[1][weight][0]), weight
            assert np.allclose(scales, library[1][weight][1], rtol=1e-6), weight
        else:
            assert q.dtype == ml_dtypes.float8_e4m3fn
            values = q.astype(np.float32)
            assert np.allclose(np.abs(values).max(axis=0), 448.0), weight  # each column's largest
            assert np.allclose(values * scales, w, rtol=2**-4, atol=float(scales.max()) * 2**-9), weight
    for x, scale in ours[0].items():
        wanted = library[0][x] * (127 / 448) ** 2 if kind == "fp8" else library[0][x]
        assert scale == pytest.approx(wanted, rel=1e-4), x


def test_awq_rewrites_every_gemm_of_a_shared_weight(tmp_path):
    """Two Gemms over one weight (a tied projection): both read its one DequantizeLinear, and the
    float weight is gone."""
    from mllm_edge.calibration import awq
    from mllm_edge.calibration.rewrite import save_graph

    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32), "w")  # [N, K]
    nodes = [
        helper.make_node("Gemm", ["a", "w"], ["ya"], name="ga", transB=1),
        helper.make_node("Gemm", ["b", "w"], ["yb"], name="gb", transB=1),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["s", 64]) for n in ("a", "b")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["s", 32]) for n in ("ya", "yb")]
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, [w]), opset_imports=[helper.make_opsetid("", 20)]
    )
    model.ir_version = 10
    source, dest = tmp_path / "src", tmp_path / "dst"
    source.mkdir()
    dest.mkdir()
    save_graph(model, source, "g")
    calls = []
    for i in range(3):
        calls.append(tmp_path / f"{i}.npz")
        arrays = {f"in.{n}": rng.standard_normal((5, 64)).astype(np.float32) for n in ("a", "b")}
        np.savez(calls[-1], **arrays)
    from mllm_edge.calibration.record import replay

    replayed = list(replay(model, source / "g.onnx", {"a": TensorProto.FLOAT}, calls))
    for got, call in zip(replayed, calls):  # a graph input as an output: the input's own values
        assert np.array_equal(got["a"], load_call(call)[0]["a"])
    entry = awq.quantize_graph(source, dest, "g", 32, lambda name: True, calls)
    out = onnx.load(str(dest / "g.onnx"))
    dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    matmuls = [n for n in out.graph.node if n.op_type == "MatMul"]
    assert entry["weights"] == ["w"] and len(dq) == 1 and len(matmuls) == 2
    assert all(m.input[1] == dq[0].output[0] for m in matmuls)
    assert "Gemm" not in {n.op_type for n in out.graph.node} and "w" not in {
        t.name for t in out.graph.initializer
    }


def test_the_clip_search_losses_are_the_librarys(tmp_path):
    """The one part awq.py computes itself: each alpha's loss per block, against the library's
    _clip_search on the same rows and weight (here one batch of columns: the library's own layout)."""
    from modelopt.onnx.quantization.int4 import AWQClipHelper, _clip_search

    from mllm_edge.calibration.awq import clip_search

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 256)).astype(np.float32) * rng.uniform(0.1, 4, 256).astype(np.float32)
    w = rng.standard_normal((256, 96)).astype(np.float32) * 0.05
    library = AWQClipHelper(w, 32)
    _clip_search(x, w, library)
    ours = clip_search(x, w, 32)
    np.testing.assert_array_equal(ours, library.best_alpha)
    assert len(set(ours.tolist())) > 3  # a search that chose, not alpha 1 everywhere


def test_awq_reads_the_rows_the_library_reads(built_in, tmp_path):
    """capture keeps of each activation every step-th row of all calls' rows, as the library does
    after concatenating them: compared with the full activations of each call."""
    import onnxruntime as ort

    from mllm_edge.calibration import awq
    from mllm_edge.calibration.rewrite import gemm_weight

    bundle = built_in["none"]
    calls = record(bundle, synthetic_items(2, seed=2), ["llm_tail"], tmp_path).calls["llm_tail"]
    model = onnx.load(str(bundle / "llm_tail.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    types = {}
    for node in model.graph.node:
        w = gemm_weight(node, inits)
        if w and "lm_head" not in w:
            types[node.input[0]] = (inits[w].dims[1], inits[w].data_type)
    kept = awq.capture(model, bundle / "llm_tail.onnx", types, calls)

    full = onnx.load(str(bundle / "llm_tail.onnx"))
    full.graph.output.extend(helper.make_tensor_value_info(x, TensorProto.FLOAT, None) for x in types)
    session = ort.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"])
    names = list(types)
    every = [session.run(names, load_call(c)[0]) for c in calls]
    for i, x in enumerate(names):
        rows = np.concatenate([outs[i].reshape(-1, types[x][0]) for outs in every])
        np.testing.assert_allclose(
            kept[x], rows[:: max(1, len(rows) // awq.MAX_TOKENS)], rtol=1e-5, atol=1e-6
        )
        assert len(rows) > awq.MAX_TOKENS and len(kept[x]) >= awq.MAX_TOKENS


def test_calibration_is_deterministic_given_the_seed(built_in, tmp_path):
    def digest(folder):
        return {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.iterdir()
            if p.name.startswith("llm_tail")
        }

    config = dict(precision="int8", synthetic=10, samples=4, verify=False)
    a = calibrate_bundle(CalibrateConfig(built_in["none"], out=tmp_path / "a", seed=3, **config))
    b = calibrate_bundle(CalibrateConfig(built_in["none"], out=tmp_path / "b", seed=3, **config))
    c = calibrate_bundle(CalibrateConfig(built_in["none"], out=tmp_path / "c", seed=4, **config))
    assert digest(a.out) == digest(b.out) and digest(a.out) != digest(c.out)


def test_fp8_is_refused_for_an_orin_and_its_build_needs_sm_8_9(built_in, tmp_path):
    from mllm_edge.build.build import check_target
    from mllm_edge.engines import Target

    with pytest.raises(MllmEdgeError, match="SM 8.9 or newer; SM 8.7 .Jetson Orin."):
        calibrate_bundle(CalibrateConfig(built_in["none"], "fp8", target_sm="8.7", out=tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    report = calibrate_bundle(CalibrateConfig(built_in["none"], "fp8", out=tmp_path / "fp8", synthetic=12))
    assert report.manifest.quantization["requires"]["min_sm"] == "8.9" and report.answers.ok
    orin = Target("Orin", (8, 7), "10.3.0", True, 30000, 20000)
    with pytest.raises(MllmEdgeError, match="need a GPU of SM 8.9 or newer; this Orin is SM 8.7"):
        check_target(report.out, report.manifest, orin)
    check_target(report.out, report.manifest, Target("RTX 4090", (8, 9), "10.3.0", False, 24000, 20000))


def test_calibrated_bundles_build_strongly_typed_in_their_own_dtype():
    from mllm_edge.build.settings import choose_settings

    s = choose_settings("10.3.0", "float16", None, None, True, quantized="int4-awq")
    assert s.strongly_typed and s.precision == "fp16" and s.builder_flags == []
    with pytest.raises(MllmEdgeError, match="builds strongly typed in its own fp32"):
        choose_settings("10.3.0", "float32", "fp16", None, False, quantized="int8")


def _qdq_model(weight: np.ndarray, scale: np.ndarray, block: int | None, zero=None, dtype=TensorProto.INT4):
    w = helper.make_tensor("w", dtype, list(weight.shape), weight.ravel().tolist())
    s = numpy_helper.from_array(scale.astype(np.float32), "s")
    inits, inputs = [w, s], ["w", "s"]
    if zero is not None:
        inits.append(helper.make_tensor("z", dtype, list(zero.shape), zero.ravel().tolist()))
        inputs.append("z")
    kwargs = {"axis": 0} | ({"block_size": block} if block else {})
    nodes = [
        helper.make_node("DequantizeLinear", inputs, ["wf"], **kwargs),
        helper.make_node("MatMul", ["x", "wf"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight.shape[1]])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_the_lint_knows_tensorrts_qdq_rules():
    w = np.ones((8, 4), np.int64)
    assert lint_model(_qdq_model(w, np.ones((2, 4)), 4)) == []  # 8 = 2 whole blocks of 4
    partial = lint_model(_qdq_model(w, np.ones((2, 4)), 5))
    assert any("not a whole number of blocks" in f.message for f in partial)
    assert any(
        "symmetrically" in f.message
        for f in lint_model(_qdq_model(w, np.ones((2, 4)), 4, np.ones((2, 4), np.int64)))
    )
    two_axes = lint_model(_qdq_model(w, np.ones((2, 2)), 4))
    assert any("exactly one blocked axis" in f.message for f in two_axes)
    int8_blocked = lint_model(_qdq_model(w, np.ones((2, 4)), 4, dtype=TensorProto.INT8))
    assert any(
        "blocked scales only in DequantizeLinear of a constant INT4 weight" in f.message for f in int8_blocked
    )
    # opset 21 is allowed for an INT4 graph, not for a float one
    float_graph = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        ),
        opset_imports=[helper.make_opsetid("", 21)],
    )
    assert any("opset 21 > 20" in f.message for f in lint_model(float_graph))


def test_a_dataset_calibrates_and_bad_input_is_a_clear_error(built_in, tmp_path):
    src = built_in["none"]
    folder = tmp_path / "data"
    folder.mkdir()
    lines = []
    for i, item in enumerate(synthetic_items(6, seed=9)):
        item.image.save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": item.question}))  # answers optional
    (folder / "cal.jsonl").write_text("\n".join(lines) + "\n")
    report = calibrate_bundle(CalibrateConfig(src, "int8", dataset=folder / "cal.jsonl", out=tmp_path / "ok"))
    cal = report.manifest.quantization["calibration"]
    assert (cal["samples"], cal["held_out"], cal["dataset"]) == (5, 1, "cal.jsonl")
    assert cal["dataset_sha256"] == hashlib.sha256((folder / "cal.jsonl").read_bytes()).hexdigest()

    (folder / "empty.jsonl").write_text("\n")
    (folder / "missing.jsonl").write_text(json.dumps({"image": "nope.png", "question": "q?"}) + "\n")
    (folder / "bad.jsonl").write_text("{not json\n")
    cases = [
        (["--dataset", str(folder / "absent.jsonl")], "does not exist"),
        (["--dataset", str(folder / "empty.jsonl")], "holds no questions"),
        (["--dataset", str(folder / "bad.jsonl")], "bad.jsonl:1: not a JSON object"),
        (["--dataset", str(folder / "missing.jsonl")], "1 image.s. named in .* do not exist"),
        (["--precision", "int3"], "unknown --precision 'int3' for --target tensorrt"),
        (["--precision", "fp8", "--target", "onnxruntime"], "--target tensorrt makes fp8"),
        (["--samples", "0"], "--samples must be >= 1"),
        (["--samples", "999"], "--samples 999 is more than"),
        (["--block-size", "100"], "--block-size 100 does not divide"),
        (["--exclude", "("], "is not a regular expression"),
        (["--exclude", "."], "every weight of the llm_tail graph is excluded"),
        (["--graphs", "some"], "unknown --graphs 'some'"),
        (["--seed", "1000003"], "eval's held-out seed"),
    ]
    for extra, message in cases:
        args = ["calibrate", str(src), "--out", str(tmp_path / "never")]
        args += extra if "--precision" in extra else ["--precision", "int4-awq", *extra]
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (extra, result.output)
        assert re.search(message, result.stderr), (extra, result.stderr)
        assert "Traceback" not in result.output and not (tmp_path / "never").exists()
    # a bundle already quantized; an unknown bundle without data; the source is never the output
    again = runner.invoke(app, ["calibrate", str(report.out), "--precision", "int8"])
    assert again.exit_code == 1 and "already quantized (int8" in again.stderr
    other = tmp_path / "other"
    shutil.copytree(src, other)
    data = json.loads((other / "manifest.json").read_text())
    data["source"]["model"] = "someone/else"
    (other / "manifest.json").write_text(json.dumps(data))
    nodata = runner.invoke(app, ["calibrate", str(other), "--precision", "int8"])
    assert nodata.exit_code == 1 and "no calibration data: give --dataset" in nodata.stderr
    same = runner.invoke(app, ["calibrate", str(src), "--precision", "int8", "--out", str(src)])
    assert same.exit_code == 1 and "is the source bundle" in same.stderr
    assert load_manifest(src).quantization is None


def test_an_interrupted_calibration_leaves_nothing(built_in, tmp_path, monkeypatch):
    from mllm_edge.calibration import calibrate as module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "check_graph", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrate_bundle(CalibrateConfig(built_in["none"], "int8", out=tmp_path / "b", synthetic=8))
    assert list(tmp_path.iterdir()) == []


def test_the_split_never_shares_an_item():
    items = synthetic_items(40, seed=2)
    s = calibration_data.split(items, None, True, 0, "x")
    assert len(s.held_out) == 10 and len(s.calibration) == 30
    assert not {id(i) for i in s.calibration} & {id(i) for i in s.held_out}


def test_build_plans_a_calibrated_bundle_strongly_typed_with_its_trtexec_lines(calibrated, tmp_path):
    """What build decides for an int4-awq bundle on an Orin, up to TensorRT (which never runs here)."""
    import subprocess

    from mllm_edge.build.build import BuildConfig, check_graphs, plan_build, write_trtexec
    from mllm_edge.engines import Target

    orin = Target("Orin", (8, 7), "10.3.0", jetson=True, total_memory_mb=7600, free_memory_mb=5000)
    out = calibrated["int4-awq"].out
    manifest = load_manifest(out)
    check_graphs(out, manifest)  # build's own pre-TensorRT check: buildable and lint-clean
    plan = plan_build(BuildConfig(out), orin)
    assert (
        plan.settings.strongly_typed and plan.settings.precision == "fp32" and not plan.settings.builder_flags
    )
    script = write_trtexec(plan, tmp_path).read_text()
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    lines = [line for line in script.splitlines() if "--onnx=" in line]
    assert len(lines) == len(manifest.graphs)
    for line in lines:
        assert "--stronglyTyped" in line
        assert not any(f in line.split() for f in ("--fp16", "--int8", "--int4", "--fp8", "--bf16"))
    with pytest.raises(MllmEdgeError, match="builds strongly typed in its own fp32"):
        plan_build(BuildConfig(out, precision="fp16"), orin)
