"""`mllm-edge calibrate --target onnxruntime` (and its shortcut `export --quantize int8|int4`):
weight-only LLM graphs for ONNX Runtime.

What is checked: the Gemm -> MatMul rewrite computes the same thing; the exported graphs hold
MatMulNBits where the weights were and nothing else changed; verification passes for a sound
quantized graph and fails for one with a wrong weight layout; the runtime's cached decoding on a
quantized bundle equals the plain concatenating chain's on the same graphs; the built-in model
still answers; TensorRT paths refuse such bundles with a clear message.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("onnxruntime", reason="quantization needs the onnxruntime extra")
onnx = pytest.importorskip("onnx", reason="export needs the export extra")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mllm_edge.calibration import matmulnbits, rewrite  # noqa: E402
from mllm_edge.calibration.calibrate import CalibrateConfig, calibrate_bundle  # noqa: E402
from mllm_edge.cli import app  # noqa: E402
from mllm_edge.errors import MllmEdgeError  # noqa: E402
from mllm_edge.export.bundle import ExportConfig, export_bundle  # noqa: E402
from mllm_edge.manifest import load_manifest  # noqa: E402
from mllm_edge.pruning import PruningConfig  # noqa: E402
from mllm_edge.runtime.pipeline import Pipeline  # noqa: E402

runner = CliRunner()


def _node_types(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )[0]


def test_gemm_rewrite_computes_the_same():
    rng = np.random.default_rng(0)
    ws, w1, w2, b2, w3 = (
        rng.standard_normal(s).astype(np.float32) for s in ((4, 4), (6, 4), (5, 6), (5,), (5, 3))
    )
    nodes = [
        helper.make_node("Gemm", ["x", "ws"], ["h0"], transB=1),  # one weight read by two nodes
        helper.make_node("Gemm", ["h0", "ws"], ["h0b"], transB=1),
        helper.make_node("Gemm", ["h0b", "w1"], ["h1"], transB=1),  # Linear without bias
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["h2"], transB=1),  # with bias (Qwen2's q/k/v)
        helper.make_node("Gemm", ["h2", "w3"], ["y"]),  # transB=0: not ours, left alone
    ]
    inits = [
        numpy_helper.from_array(a, n) for a, n in ((ws, "ws"), (w1, "w1"), (w2, "w2"), (b2, "b2"), (w3, "w3"))
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    before = _run(model, {"x": x})
    assert len(rewrite.gemms_to_matmuls(model)) == 4
    assert [n.op_type for n in model.graph.node] == ["MatMul", "MatMul", "MatMul", "MatMul", "Add", "Gemm"]
    assert sorted(t.name for t in model.graph.initializer) == [
        "b2",
        "w1.T",
        "w2.T",
        "w3",
        "ws.T",
    ]  # the originals dropped
    np.testing.assert_allclose(_run(model, {"x": x}), before, rtol=1e-5, atol=1e-5)


def quantized_export(model, out, pruning, weights):
    """export --quantize as the CLI does it: a float bundle, then calibrate --target onnxruntime."""
    source = out.parent / f"{out.name}-float"
    export_bundle(ExportConfig(str(model), source, pruning))
    return calibrate_bundle(CalibrateConfig(source, weights, "onnxruntime", out))


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, export_cache):
    out = tmp_path_factory.mktemp("quantize") / "llama_mha-int8"
    report = calibrate_bundle(
        CalibrateConfig(export_cache("llama_mha", "none")[0], "int8", "onnxruntime", out)
    )
    return out, report


def test_int8_bundle_holds_matmulnbits_in_the_llm_graph_only(int8_bundle, export_cache):
    out, report = int8_bundle
    m = load_manifest(out)
    q = m.quantization
    assert (q["weights"], q["target"], q["format"], q["graphs"], q["backends"]) == (
        "int8",
        "onnxruntime",
        "onnxruntime MatMulNBits",
        ["llm_tail"],
        ["onnxruntime"],
    )
    entry = q["per_graph"]["llm_tail"]
    assert (entry["bits"], entry["block_size"], entry["symmetric"], entry["accuracy_level"]) == (
        8,
        32,
        True,
        4,
    )
    assert q["calibration"] is None  # rounding to nearest: no data
    assert m.weights == "int8" and m.dtype == "float32"
    assert (
        m.schema_version == 3 and load_manifest(export_cache("llama_mha", "none")[0]).schema_version == 1
    )  # float: readable by older versions
    tail = onnx.load(str(out / "llm_tail.onnx"), load_external_data=False)
    quantized = [n for n in tail.graph.node if n.op_type == "MatMulNBits"]
    # every Linear of the LLM: q, k, v, o, gate, up, down per layer, and the LM head
    layers = m.architecture["text"]["num_layers"]
    assert len(quantized) == 7 * layers + 1
    assert "Gemm" not in _node_types(out / "llm_tail.onnx")
    attrs = {a.name: helper.get_attribute_value(a) for a in quantized[0].attribute}
    assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (8, 32, 4)
    float_bundle, _ = export_cache("llama_mha", "none")
    for graph in ("vision", "embed"):  # untouched: the same nodes as the float bundle's
        assert _node_types(out / f"{graph}.onnx") == _node_types(float_bundle / f"{graph}.onnx")
    # one byte per weight (blocks of 32, the last padded) and one fp32 scale per block, for exactly
    # the weights of the float graph's Gemms, in the same order
    float_tail = onnx.load(str(float_bundle / "llm_tail.onnx"), load_external_data=False)
    float_inits = {t.name: t for t in float_tail.graph.initializer}
    gemm_weights = [float_inits[n.input[1]] for n in float_tail.graph.node if n.op_type == "Gemm"]
    inits = {t.name: t for t in onnx.load(str(out / "llm_tail.onnx")).graph.initializer}
    assert len(gemm_weights) == len(quantized)
    for node, original in zip(quantized, gemm_weights):
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        blocks = -(-a["K"] // 32)
        packed, scales = (
            numpy_helper.to_array(inits[node.input[1]]),
            numpy_helper.to_array(inits[node.input[2]]),
        )
        assert packed.dtype == np.uint8 and packed.size == a["N"] * blocks * 32
        assert scales.dtype == np.float32 and scales.size == a["N"] * blocks
        assert list(original.dims) == [a["N"], a["K"]]  # the Gemm's weight, [N, K]
    # verified on export's sample against the limit, and the quantization error is there
    (result,) = report.graphs
    assert result.check.ok and result.check.limit == 0.98 and result.check.cosine < 1 - 1e-7
    assert result.bytes_after < 0.75 * result.bytes_before  # a tiny graph: its .onnx weighs too


def test_runtime_decodes_a_quantized_bundle_as_the_plain_chain_does(int8_bundle, tmp_path):
    """The zero-copy cache against verify's concatenating chain, both on the same int8 graphs."""
    from mllm_edge.export.verify import OnnxChain
    from mllm_edge.runtime.image import load_image
    from mllm_edge.testing.checkpoints import sample_image

    out, _ = int8_bundle
    pipeline = Pipeline.load(out)
    image = tmp_path / "scene.png"
    sample_image(300, 200, seed=1).save(image)
    result = pipeline.generate(image, "what colour is the circle?", max_new_tokens=8)  # may stop early at EOS
    assert len(result.token_ids) >= 4  # enough decode steps through the cache to compare
    pixels = pipeline.preprocess(load_image(image))
    tokens, _ = OnnxChain(out, load_manifest(out)).generate(
        np.asarray([result.prompt_token_ids], np.int64), pixels, len(result.token_ids)
    )
    assert result.token_ids == tokens[0].tolist()
    cli = runner.invoke(app, ["run", str(image), "--bundle", str(out), "--max-new-tokens", "4"])
    assert cli.exit_code == 0 and "onnxruntime on cpu, int8 weights" in cli.stderr, cli.output


def test_quantized_fastv_qwen2_exports_verified(tiny_checkpoints, tmp_path):
    """Both LLM graphs quantized, and Qwen2's q/k/v biases kept as Adds after the MatMulNBits."""
    out = tmp_path / "qwen2-fastv-int8"
    report = quantized_export(tiny_checkpoints["qwen2"], out, PruningConfig.from_method("fastv", 0.5), "int8")
    assert report.manifest.quantization["graphs"] == ["llm_head", "llm_tail"]
    assert all(r.check.ok for r in report.graphs)
    for graph in ("llm_head", "llm_tail"):
        assert "MatMulNBits" in _node_types(out / f"{graph}.onnx") and "Gemm" not in _node_types(
            out / f"{graph}.onnx"
        )


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_verification_catches_a_wrong_weight_layout(weights, tiny_checkpoints, tmp_path, monkeypatch):
    """A plausible bug, the input channels of every weight in the wrong order, must fail the
    calibration at its limits and leave nothing behind; the source bundle is unchanged."""
    from mllm_edge.default_model import checkpoint

    real = matmulnbits.gemms_to_matmuls

    def scrambled(model, folder=None, select=lambda w: True):
        rewritten = real(model, folder, select)
        for t in model.graph.initializer:
            if t.name.endswith(".T"):
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t)[::-1].copy(), t.name))
        return rewritten

    source = tmp_path / "float"
    model = tiny_checkpoints["llama_gqa"] if weights == "int8" else checkpoint()
    export_bundle(ExportConfig(str(model), source, PruningConfig(), verify=False))
    before = {p.name: p.stat().st_mtime_ns for p in source.iterdir()}
    monkeypatch.setattr(matmulnbits, "gemms_to_matmuls", scrambled)
    with pytest.raises(MllmEdgeError, match="loses too much"):
        calibrate_bundle(CalibrateConfig(source, weights, "onnxruntime", tmp_path / "b"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float"]
    assert {p.name: p.stat().st_mtime_ns for p in source.iterdir()} == before


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_the_built_in_model_still_answers(weights, tmp_path):
    """Trained weights, unlike the random test checkpoints', survive int8 and int4: measured 100% on
    300 held-out questions for both (benchmarks/quantization.py); the bar is 90% on 40."""
    from mllm_edge.default_model import checkpoint
    from mllm_edge.evaluate import evaluate, synthetic_items

    out = tmp_path / weights
    report = quantized_export(checkpoint(), out, PruningConfig(), weights)
    assert report.answers.ok and all(r.check.ok for r in report.graphs)
    result = evaluate(out, synthetic_items(40), backend="onnxruntime")
    assert result.accuracy >= 0.9, result.by_kind


def test_tensorrt_paths_refuse_a_quantized_bundle(int8_bundle, tmp_path):
    out, _ = int8_bundle
    result = runner.invoke(app, ["build", str(out)])
    assert (
        result.exit_code == 1
        and "TensorRT cannot build" in result.stderr
        and "Traceback" not in result.output
    ), result.output
    with pytest.raises(MllmEdgeError, match="ONNX Runtime only"):
        Pipeline.load(out, backend="tensorrt")
    inspected = runner.invoke(app, ["inspect", str(out)])
    assert inspected.exit_code == 0
    assert "int8 weights in llm_tail (ONNX Runtime only)" in inspected.stdout
    assert "not linted, int8 weights for ONNX Runtime only" in inspected.stdout


def test_a_version_1_manifest_still_loads(export_cache, tmp_path):
    """Bundles exported before quantization existed (schema 1, no `quantization` key) stay readable."""
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(export_cache("llama_gqa", "none")[0], folder)
    data = json.loads((folder / "manifest.json").read_text())
    data["schema_version"] = 1
    del data["quantization"]
    (folder / "manifest.json").write_text(json.dumps(data))
    m = load_manifest(folder)
    assert m.quantization is None and m.weights == "float32"


def test_importing_the_quantizer_leaves_logging_alone():
    """ONNX Runtime's quantizer module calls logging.basicConfig(level=INFO) on import."""
    code = textwrap.dedent(
        """
        import logging
        from mllm_edge.calibration.matmulnbits import _quantizer_class
        _quantizer_class()
        root = logging.getLogger()
        print(len(root.handlers), root.level)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["0", str(30)]  # no handler added, WARNING as Python starts
