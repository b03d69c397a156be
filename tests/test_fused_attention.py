"""ONNX Runtime's fused attention copies of a bundle's graphs (export/fused_attention.py).

Every decoder attention core of an fp32 export is rewritten (counted against the checkpoint's config),
the copies compute what the graphs TensorRT builds compute (a prompt through the fused kernels, a
decode step through the same nodes as before), the runtime runs them unless told not to, and a
quantized bundle's copies read its quantized weights. End to end, test_export.py's
test_bundle_matches_pytorch_on_a_new_image runs them against PyTorch for every fixture (grouped
keys included) and method.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the fused copies are ONNX Runtime's")
onnx = pytest.importorskip("onnx", reason="export needs the export extra")

import onnxruntime as ort  # noqa: E402
from onnx import helper  # noqa: E402

from mllm_edge.calibration.calibrate import CalibrateConfig, calibrate_bundle  # noqa: E402
from mllm_edge.errors import MllmEdgeError  # noqa: E402
from mllm_edge.export.fused_attention import fuse_attention  # noqa: E402
from mllm_edge.manifest import load_manifest  # noqa: E402
from mllm_edge.runtime.backends.onnxruntime import session_file  # noqa: E402
from mllm_edge.runtime.pipeline import Pipeline  # noqa: E402
from mllm_edge.testing.checkpoints import sample_image  # noqa: E402

FIXTURES = ("llama_mha", "llama_gqa", "qwen2", "mistral")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fused") / "scene.png"
    sample_image(300, 200, seed=1).save(path)
    return path


def _load(path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def _ops(graph) -> list[str]:
    return [n.op_type for n in graph.node]


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("method", ["none", "fastv", "fastervlm"])
@pytest.mark.parametrize("name", FIXTURES)
def test_every_attention_core_is_fused(name, method, export_cache, tiny_checkpoints):
    folder, _ = export_cache(name, method)
    manifest = load_manifest(folder)
    text = json.loads((tiny_checkpoints[name] / "config.json").read_text())["text_config"]
    heads, kv_heads = (
        text["num_attention_heads"],
        text.get("num_key_value_heads", text["num_attention_heads"]),
    )
    assert manifest.graphs["embed"].onnxruntime_file is None  # no attention in it
    if "prune" in manifest.graphs:
        assert manifest.graphs["prune"].onnxruntime_file is None

    for graph in [g for g in ("llm_head", "llm_tail") if g in manifest.graphs]:
        spec = manifest.graphs[graph]
        fused = _load(folder / spec.onnxruntime_file)
        layers = [t.name for t in fused.graph.input if t.name.startswith("past_key.")]
        branches = [n for n in fused.graph.node if n.op_type == "If"]
        assert len(branches) == len(layers) > 0  # one per layer of the graph
        for node in branches:
            then, other = _attrs(node)["then_branch"], _attrs(node)["else_branch"]
            (gqa,) = [n for n in then.node if n.op_type == "GroupQueryAttention"]
            a = _attrs(gqa)
            assert (a["num_heads"], a["kv_num_heads"]) == (heads, kv_heads)
            assert a["scale"] == pytest.approx((text.get("head_dim") or text["hidden_size"] // heads) ** -0.5)
            assert "Softmax" in _ops(other)  # the graph's own attention, for a real past
        # FastV's last-token row (llm_head's last layer) is all the softmax left outside the branches
        assert _ops(fused.graph).count("Softmax") == (1 if graph == "llm_head" else 0)
        assert {o.domain: o.version for o in fused.opset_import} == {"": 20, "com.microsoft": 1}
        portable = _load(folder / spec.file)
        assert sorted(
            t.name for t in fused.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
        ) == sorted(
            t.name for t in portable.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
        )  # the same weights, in the same data file

    assert manifest.graphs["vision"].onnxruntime_file is None  # not rewritten: no faster end to end


def _llm_tail_feeds(folder, past: int):
    """The export's own prompt sample (past: the null row) or a decode step after `past` random rows."""
    sample = np.load(folder / "samples" / "llm_tail.npz")
    feeds = {k[3:]: v for k, v in sample.items() if k.startswith("in.")}
    if past == 1:
        return feeds
    rng = np.random.default_rng(0)
    feeds["hidden_states"] = feeds["hidden_states"][:, -1:].copy()
    feeds["position_ids"] = np.full((1, 1), past, np.int64)
    for k in [k for k in feeds if k.startswith("past_")]:
        feeds[k] = rng.standard_normal((past, *feeds[k].shape[1:])).astype(np.float32)
    return feeds


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2"])
def test_fused_copies_compute_what_the_graphs_compute(name, export_cache):
    folder, _ = export_cache(name, "none")
    spec = load_manifest(folder).graphs["llm_tail"]
    graph, fused = _session(folder / spec.file), _session(folder / spec.onnxruntime_file)
    prompt = _llm_tail_feeds(folder, past=1)
    want, got = graph.run(None, prompt), fused.run(None, prompt)
    for w, g in zip(want, got):  # the logits, then every layer's new keys and values
        assert np.abs(g - w).max() <= 1e-5 * max(1.0, np.abs(w).max())
    step = _llm_tail_feeds(folder, past=40)  # the If's other branch: the same nodes, the same numbers
    assert all(np.array_equal(w, g) for w, g in zip(graph.run(None, step), fused.run(None, step)))


def test_the_runtime_runs_the_fused_copies_unless_told_not_to(export_cache, monkeypatch, image_file):
    folder, report = export_cache("llama_gqa", "fastv")
    manifest = load_manifest(folder)
    assert session_file(manifest.graphs["llm_tail"]) == "llm_tail.onnxruntime.onnx"
    assert session_file(manifest.graphs["embed"]) == "embed.onnx"
    assert {c.graph for c in report.checks} >= {"llm_head fused", "llm_tail fused"}
    assert all(c.ok for c in report.checks)  # export checked the copies against PyTorch too
    fused = Pipeline.load(folder).generate(image_file, "what is this?", max_new_tokens=6)
    monkeypatch.setenv("MLLM_EDGE_UNFUSED_ATTENTION", "1")
    assert session_file(manifest.graphs["llm_tail"]) == "llm_tail.onnx"
    plain = Pipeline.load(folder).generate(image_file, "what is this?", max_new_tokens=6)
    assert fused.token_ids == plain.token_ids


def test_fp16_graphs_get_no_copy(export_cache):
    """The rewrite takes float32 only: an fp16 bundle runs its graphs as they are (and on x86 CPUs
    at fp32 speed anyway, docs/performance.md)."""
    folder, _ = export_cache("llama_mha", "none", "fp16")
    assert all(spec.onnxruntime_file is None for spec in load_manifest(folder).graphs.values())


def test_a_core_it_does_not_recognise_is_left_alone(export_cache):
    """A core whose query comes from no q_proj (a renamed weight, say) keeps its nodes."""
    folder, _ = export_cache("llama_mha", "none")
    model = _load(folder / "llm_tail.onnx")
    for tensor in model.graph.initializer:
        tensor.name = tensor.name.replace(".q_proj.", ".query.")
    for node in model.graph.node:
        node.input[:] = [i.replace(".q_proj.", ".query.") for i in node.input]
    before = _ops(model.graph)
    assert fuse_attention(model) == 0 and _ops(model.graph) == before


def test_a_quantized_bundle_fuses_its_quantized_graphs(export_cache, tmp_path, image_file):
    source, _ = export_cache("llama_gqa", "none")
    report = calibrate_bundle(CalibrateConfig(source, "int8", "onnxruntime", tmp_path / "int8"))
    manifest = load_manifest(report.out)
    spec = manifest.graphs["llm_tail"]
    fused = _load(report.out / spec.onnxruntime_file)
    assert "MatMulNBits" in _ops(fused.graph) and "If" in _ops(fused.graph)  # made from the int8 graph
    locations = {
        entry.value for t in fused.graph.initializer for entry in t.external_data if entry.key == "location"
    }
    assert locations <= set(spec.data_files)
    result = Pipeline.load(report.out).generate(image_file, "what is this?", max_new_tokens=4)
    assert len(result.token_ids) >= 1


def test_a_manifest_names_its_own_fused_copy_and_lists_it(export_cache, tmp_path):
    import shutil

    folder, _ = export_cache("llama_mha", "none")
    copy = tmp_path / "bundle"
    shutil.copytree(folder, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["graphs"]["llm_tail"]["onnxruntime_file"] = "llm_tail.onnx"  # the graph itself
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(MllmEdgeError, match="onnxruntime_file must be llm_tail.onnxruntime.onnx"):
        load_manifest(copy)
    data["graphs"]["embed"]["onnxruntime_file"] = "embed.onnxruntime.onnx"  # named right, not written
    data["graphs"]["llm_tail"].pop("onnxruntime_file")
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(MllmEdgeError, match="embed.onnxruntime.onnx is not in the file list"):
        load_manifest(copy)
