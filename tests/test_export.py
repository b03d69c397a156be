"""`mllm-edge export`: bundles of the tiny fixtures, checked independently of the exporter's own verification.

The exporter verifies on its own sample; these tests run the graphs in ONNX Runtime on a different
image and prompt and compare with our PyTorch reference, with transformers' attention maps for the
kept token sets, and read the ONNX files themselves for the lint and the fp32 islands of fp16 graphs.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="verifying exports needs the onnxruntime extra")
onnx = pytest.importorskip("onnx", reason="export needs the export extra")

from helpers import has_cls, hf_fastervlm_keep, hf_fastv_keep, inputs  # noqa: E402
from onnx.external_data_helper import uses_external_data  # noqa: E402

from mllm_edge.errors import MllmEdgeError  # noqa: E402
from mllm_edge.export import bundle as bundle_module  # noqa: E402
from mllm_edge.export.bundle import ExportConfig, export_bundle  # noqa: E402
from mllm_edge.export.lint import lint_model  # noqa: E402
from mllm_edge.export.verify import OnnxChain  # noqa: E402
from mllm_edge.manifest import load_manifest  # noqa: E402
from mllm_edge.models import generate, load_llava  # noqa: E402
from mllm_edge.pruning import PruningConfig, keep_count  # noqa: E402

FIXTURES = ("llama_mha", "llama_gqa", "qwen2", "mistral")
METHODS = ("none", "fastv", "fastervlm")
DTYPES = ("fp32", "fp16")
RATIO = 0.5


@functools.cache
def reference_model(path: Path, dtype: str):
    return load_llava(path, torch.float16 if dtype == "fp16" else torch.float32)


CASES = [(n, m, d) for n in FIXTURES for m in METHODS for d in DTYPES] + [
    ("llama_gqa", "fastv+fastervlm", d) for d in DTYPES
]


@pytest.mark.parametrize("name,method,dtype", CASES, ids=["-".join(c) for c in CASES])
def test_bundle_matches_pytorch_on_a_new_image(name, method, dtype, export_cache, tiny_checkpoints):
    folder, report = export_cache(name, method, dtype)
    assert all(c.ok for c in report.checks) and report.chain.ok
    manifest = load_manifest(folder)
    path = tiny_checkpoints[name]
    input_ids, pixel_values = inputs(path, seed=1)  # not the exporter's sample
    pruning = PruningConfig.from_method(method, 0.0 if method == "none" else RATIO)
    llava = reference_model(path, dtype)
    ref = generate(llava, input_ids, pixel_values, pruning, max_new_tokens=8)
    chain = OnnxChain(folder, manifest)
    ref_tokens = np.asarray(ref.token_ids)
    tokens, logits = chain.generate(input_ids.numpy(), pixel_values.numpy(), 8, forced=ref_tokens)
    ref_logits = torch.stack(ref.steps_logits, dim=1).numpy()
    tolerance = 1e-4 if dtype == "fp32" else 2e-2
    scale = np.abs(ref_logits[0]).max(axis=-1)
    assert (np.abs(logits[0] - ref_logits[0]).max(axis=-1) / scale).max() < tolerance * 1.5
    top2 = np.sort(ref_logits[0], axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * tolerance * scale  # a closer pair is a tie at this precision
    assert tokens[0][clear].tolist() == ref_tokens[0][clear].tolist()
    if dtype == "fp32":  # free-running too: the same 8 tokens
        assert chain.generate(input_ids.numpy(), pixel_values.numpy(), 8)[0][0].tolist() == ref.token_ids[0]
    kept = {
        "fastv": (chain.kept_image, ref.prefill.kept_llm),
        "fastervlm": (chain.kept_patches, ref.prefill.kept_vision),
    }
    for part in method.split("+"):
        if part not in kept:
            continue
        got, want = kept[part][0][0].tolist(), kept[part][1][0].tolist()
        if dtype == "fp32":
            assert got == want
        else:  # fp16 scores round differently in the two implementations: tokens at the cut may swap
            assert len(set(got) ^ set(want)) <= max(2, len(want) // 20)


@pytest.mark.parametrize("name", FIXTURES)
def test_kept_sets_equal_transformers_attention(name, export_cache, tiny_checkpoints):
    """The graphs' TopK picks what docs/methods.md defines, read from transformers' eager attention maps."""
    path = tiny_checkpoints[name]
    input_ids, pixel_values = inputs(path, seed=1)
    n = int((input_ids == reference_model(path, "fp32").spec.image_token_id).sum())
    folder, _ = export_cache(name, "fastv")
    chain = OnnxChain(folder, load_manifest(folder))
    chain.generate(input_ids.numpy(), pixel_values.numpy(), 1)
    assert chain.kept_image[0].tolist() == hf_fastv_keep(
        path, input_ids, pixel_values, k=2, keep=keep_count(n, RATIO)
    )
    if has_cls(path):
        folder, _ = export_cache(name, "fastervlm")
        chain = OnnxChain(folder, load_manifest(folder))
        chain.generate(input_ids.numpy(), pixel_values.numpy(), 1)
        assert chain.kept_patches[0].tolist() == hf_fastervlm_keep(path, pixel_values, keep_count(n, RATIO))


@pytest.mark.parametrize("name,method,dtype", CASES, ids=["-".join(c) for c in CASES])
def test_every_graph_passes_the_tensorrt_lint(name, method, dtype, export_cache):
    folder, _ = export_cache(name, method, dtype)
    manifest = load_manifest(folder)
    expected = {"none": ["vision", "embed", "llm_tail"], "fastervlm": ["vision", "embed", "llm_tail"]}
    assert list(manifest.graphs) == expected.get(method, ["vision", "embed", "llm_head", "prune", "llm_tail"])
    assert manifest.pruning["method"] == method
    for spec in manifest.graphs.values():
        model = onnx.load(str(folder / spec.file), load_external_data=False)
        assert lint_model(model) == []
        assert {o.domain: o.version for o in model.opset_import} == {"": 20}


@pytest.mark.parametrize("name", FIXTURES)
def test_fp16_graphs_keep_norms_and_softmax_in_fp32(name, export_cache):
    folder, _ = export_cache(name, "fastv", "fp16")
    for graph in ("llm_head", "llm_tail", "vision"):
        model = onnx.shape_inference.infer_shapes(
            onnx.load(str(folder / f"{graph}.onnx"), load_external_data=False)
        )
        types = {
            v.name: v.type.tensor_type.elem_type
            for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]
        }
        softmax_in = [types[n.input[0]] for n in model.graph.node if n.op_type == "Softmax"]
        assert softmax_in and set(softmax_in) == {onnx.TensorProto.FLOAT}, graph
        weights = {t.name: t.data_type for t in model.graph.initializer}
        gemm_weights = [weights[n.input[1]] for n in model.graph.node if n.op_type == "Gemm"]
        assert gemm_weights and set(gemm_weights) == {onnx.TensorProto.FLOAT16}, (
            f"{graph}: projections store fp16 weights"
        )
        if graph != "vision":  # RMSNorm: the mean of squares is taken in fp32
            means = [types[n.input[0]] for n in model.graph.node if n.op_type == "ReduceMean"]
            assert means and set(means) == {onnx.TensorProto.FLOAT}, graph

    # FastV's score row (the last token's attention at layer K-1) is multiplied out in fp32, so its
    # ranking does not rest on fp16 rounding of q.k; the other attention matmuls stay fp16
    model = onnx.shape_inference.infer_shapes(
        onnx.load(str(folder / "llm_head.onnx"), load_external_data=False)
    )
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    matmuls = [{types.get(i) for i in n.input} for n in model.graph.node if n.op_type == "MatMul"]
    assert {onnx.TensorProto.FLOAT} in matmuls and {onnx.TensorProto.FLOAT16} in matmuls


@pytest.mark.parametrize("name,method", [(n, m) for n in FIXTURES for m in METHODS])
def test_manifest_describes_the_bundle(name, method, export_cache, tiny_checkpoints):
    folder, report = export_cache(name, method)
    manifest = load_manifest(folder)  # checks every sha256
    spec = reference_model(tiny_checkpoints[name], "fp32").spec
    n = spec.num_image_tokens
    tokens = manifest.pruning["image_tokens"]
    kept = keep_count(n, RATIO)
    assert tokens == {
        "vision": n,
        "llm": kept if method == "fastervlm" else n,
        "after_fastv": kept if method in ("fastervlm", "fastv") else n,
    }
    assert manifest.architecture["text"]["num_layers"] == spec.text.num_layers
    assert manifest.tokenizer["image_token_id"] == spec.image_token_id
    assert manifest.tokenizer["chat_template"] and manifest.tokenizer["eos_token_ids"]
    # the default: 2048, or less where the model holds fewer (Mistral's window here: 1024)
    assert manifest.preprocessing["image_mean"] and manifest.max_context == min(2048, spec.text.max_context)
    assert set(manifest.files) == {
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
    } - {"manifest.json"}
    tail = manifest.graphs["llm_tail"]
    assert [t.name for t in tail.outputs][:3] == [
        "logits",
        f"new_key.{manifest.pruning['split_layer']}",
        f"new_value.{manifest.pruning['split_layer']}",
    ]
    assert tail.input("hidden_states").shape == ["batch", "seq", spec.text.hidden_size]
    assert tail.inputs[2].shape == [
        "past",
        "batch",
        spec.text.num_kv_heads,
        spec.text.head_dim,
    ]  # sequence-first
    assert tail.output(f"new_key.{spec.text.num_layers - 1}").shape == [
        "seq",
        "batch",
        spec.text.num_kv_heads,
        spec.text.head_dim,
    ]
    assert (
        tail.output("logits").shape == ["batch", spec.text.vocab_size]
        and tail.output("logits").dtype == "float32"
    )


def _external_tensors(folder: Path):
    """(graph, initializer name, location, offset) of every external weight in the bundle."""
    for path in sorted(folder.glob("*.onnx")):
        model = onnx.load(str(path), load_external_data=False)
        for t in model.graph.initializer:
            if uses_external_data(t):
                ext = {e.key: e.value for e in t.external_data}
                yield path.stem, t, ext["location"], int(ext.get("offset", 0)), int(ext["length"])


@pytest.mark.parametrize("name", FIXTURES)
def test_every_weight_is_stored_once(name, export_cache, tiny_checkpoints):
    folder, report = export_cache(name, "fastv")
    contents = {}
    for graph, tensor, location, offset, length in _external_tensors(folder):
        with open(folder / location, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) > 64:  # tiny constants may coincide; weights must not
            assert (location, offset) == contents.setdefault(data, (location, offset)), (
                f"{graph}.{tensor.name} stored twice"
            )
    tied = reference_model(tiny_checkpoints[name], "fp32").spec.text.tie_word_embeddings
    tail_files = set(load_manifest(folder).graphs["llm_tail"].data_files)
    assert ("embed.onnx.data" in tail_files) == tied
    assert (report.shared_bytes > 0) == tied


def test_ratio_zero_gives_the_unpruned_tokens(export_cache, tiny_checkpoints):
    none_folder, none_report = export_cache("llama_gqa", "none")
    for method in ("fastv", "fastervlm"):
        folder, report = export_cache("llama_gqa", method, ratio=0.0)
        assert report.chain.onnx == none_report.chain.onnx
        input_ids, pixel_values = inputs(tiny_checkpoints["llama_gqa"], seed=1)
        a = OnnxChain(folder, load_manifest(folder)).generate(input_ids.numpy(), pixel_values.numpy(), 6)[0]
        b = OnnxChain(none_folder, load_manifest(none_folder)).generate(
            input_ids.numpy(), pixel_values.numpy(), 6
        )[0]
        assert a.tolist() == b.tolist()


def test_graphs_run_at_batch_two(export_cache, tiny_checkpoints):
    """Batch is a dynamic dim: two copies of a prompt give the batch-1 tokens in both rows."""
    folder, _ = export_cache("llama_gqa", "fastv")
    chain = OnnxChain(folder, load_manifest(folder))
    input_ids, pixel_values = inputs(tiny_checkpoints["llama_gqa"], seed=1)
    one = chain.generate(input_ids.numpy(), pixel_values.numpy(), 5)[0]
    two = chain.generate(np.repeat(input_ids.numpy(), 2, 0), np.repeat(pixel_values.numpy(), 2, 0), 5)[0]
    assert two.tolist() == [one[0].tolist()] * 2


def test_failed_verification_stops_the_export(tmp_path, tiny_checkpoints, monkeypatch):
    """Verification must be able to fail: a reference nudged by 1% is caught and nothing is written."""
    real = bundle_module.make_samples

    def nudged(*args, **kwargs):
        samples = real(*args, **kwargs)
        samples.graphs["llm_tail"][1]["logits"] *= 1.01
        return samples

    monkeypatch.setattr(bundle_module, "make_samples", nudged)
    out = tmp_path / "bundle"
    with pytest.raises(MllmEdgeError, match="llm_tail.logits"):
        export_bundle(ExportConfig(str(tiny_checkpoints["llama_gqa"]), out, PruningConfig()))
    assert list(tmp_path.iterdir()) == []


def test_exported_attention_is_one_block(tmp_path, tiny_checkpoints, monkeypatch):
    """The eager reference attends in blocks of query rows; the graphs must not unroll them. Traced
    with blocks far shorter than the sample prompt, the graphs still verify against the (blocked)
    reference at the prompt's length and in decode steps of one token."""
    from mllm_edge.models import layers

    monkeypatch.setattr(layers, "QUERY_BLOCK", 2)  # export traces the LLM graphs with 5 new tokens
    report = export_bundle(
        ExportConfig(
            str(tiny_checkpoints["llama_gqa"]), tmp_path / "bundle", PruningConfig.from_method("fastv", 0.5)
        )
    )
    assert report.chain.ok and all(check.ok for check in report.checks)


def test_failed_chain_check_stops_the_export(tmp_path, tiny_checkpoints, monkeypatch):
    """The decode chain is checked on its own: a reference with wrong decode logits is caught."""
    real = bundle_module.make_samples

    def nudged(*args, **kwargs):
        samples = real(*args, **kwargs)
        samples.chain["step_logits"][:, 3:] *= 1.01  # decode steps only; prefill logits stay right
        return samples

    monkeypatch.setattr(bundle_module, "make_samples", nudged)
    with pytest.raises(MllmEdgeError, match="decode chain: logits error"):
        export_bundle(
            ExportConfig(
                str(tiny_checkpoints["llama_gqa"]),
                tmp_path / "bundle",
                PruningConfig.from_method("fastv", 0.5),
            )
        )
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_only_bundles(tmp_path, tiny_checkpoints):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "important.txt").write_text("keep me")
    with pytest.raises(MllmEdgeError, match="is not a bundle"):
        export_bundle(ExportConfig(str(tiny_checkpoints["llama_gqa"]), precious, PruningConfig(), force=True))
    assert (precious / "important.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_max_context_too_small_for_the_sample(tmp_path, tiny_checkpoints):
    with pytest.raises(MllmEdgeError, match="max context 70 is too small: the sample prompt takes"):
        export_bundle(
            ExportConfig(str(tiny_checkpoints["llama_gqa"]), tmp_path / "b", PruningConfig(), max_context=70)
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stage", ["llm_tail", "verify chain", "manifest"])
def test_interrupted_export_leaves_nothing(stage, tmp_path, tiny_checkpoints):
    def interrupt(name):
        if name == stage:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_bundle(
            ExportConfig(str(tiny_checkpoints["llama_gqa"]), tmp_path / "bundle", PruningConfig()), interrupt
        )
    assert list(tmp_path.iterdir()) == []


def test_existing_bundle_needs_force(tmp_path, export_cache, tiny_checkpoints):
    out = tmp_path / "bundle"
    shutil.copytree(export_cache("llama_gqa", "none")[0], out)
    before = (out / "manifest.json").read_text()
    with pytest.raises(MllmEdgeError, match="--force"):
        export_bundle(
            ExportConfig(str(tiny_checkpoints["llama_gqa"]), out, PruningConfig.from_method("fastv", 0.5))
        )
    assert (out / "manifest.json").read_text() == before
    export_bundle(
        ExportConfig(
            str(tiny_checkpoints["llama_gqa"]),
            out,
            PruningConfig.from_method("fastv", 0.5),
            force=True,
            verify=False,
        )
    )
    assert json.loads((out / "manifest.json").read_text())["pruning"]["method"] == "fastv"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_damaged_bundle_is_refused(tmp_path, export_cache):
    out = tmp_path / "bundle"
    shutil.copytree(export_cache("llama_gqa", "none")[0], out)
    data = out / "llm_tail.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(MllmEdgeError, match="llm_tail.onnx.data"):
        load_manifest(out)
    os.remove(data)
    with pytest.raises(MllmEdgeError, match="llm_tail.onnx.data is missing"):
        load_manifest(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(MllmEdgeError, match="not valid JSON"):
        load_manifest(out)
