"""The manifest protects itself too: every field is checked on load, and an error names the field."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from mllm_edge.cli import app
from mllm_edge.errors import MllmEdgeError
from mllm_edge.manifest import MANIFEST_NAME, load_manifest

CASES = [
    (lambda m: m.pop("files"), "files is missing"),
    (lambda m: m.update(files={}), "files must be the sha256 of every file"),
    (lambda m: m.update(max_context="abc"), "max_context must be a whole number above"),
    (lambda m: m.update(max_context=10), "max_context must be a whole number above the 32 image tokens"),
    (lambda m: m["pruning"].update(method="banana"), "pruning.method must be one of none, fastv"),
    (lambda m: m.update(dtype="int3"), "dtype must be float32 or float16"),
    (lambda m: m["pruning"]["fastv"].update(keep=7), "pruning.fastv.keep 7 disagrees"),
    (lambda m: m["pruning"]["fastv"].update(k=3), "pruning.fastv.k must be FastV's layer"),
    (lambda m: m["pruning"].update(split_layer=99), "pruning.split_layer must be a layer"),
    (lambda m: m["pruning"]["image_tokens"].update(llm=99), "must count down"),
    (lambda m: m["pruning"].update(fastervlm=None), "pruning.fastervlm must be set"),
    (lambda m: m["graphs"].pop("prune"), "graphs must be vision, embed, llm_head, prune, llm_tail"),
    (
        lambda m: m["graphs"]["embed"].update(file="../elsewhere.onnx"),
        "graphs.embed.file must be a path inside the bundle",
    ),
    (
        lambda m: m["files"].pop("llm_tail.onnx.data"),
        "graphs.llm_tail: llm_tail.onnx.data is not in the file list",
    ),
    (
        lambda m: m["architecture"]["text"].update(num_layers=True),
        "architecture.text.num_layers must be a whole number",
    ),
    (
        lambda m: m["tokenizer"].update(eos_token_ids="2"),
        "tokenizer.eos_token_ids must be a list of token ids",
    ),
    (lambda m: m["files"].update({"/etc/passwd": "0" * 64}), "must be a path inside the bundle"),
    # LLaVA-NeXT's geometry: views follow from pinpoints, which a one-view bundle lacks
    (lambda m: m["architecture"].update(max_views=5), "architecture.image_grid_pinpoints must be"),
    (
        lambda m: m["architecture"].update(max_views=4, image_grid_pinpoints=[[128, 128]]),
        "architecture.max_views 4 disagrees with its image_grid_pinpoints (5 views)",
    ),
]


@pytest.fixture(scope="module")
def source(export_cache):
    return export_cache("llama_gqa", "fastv+fastervlm")[0]


@pytest.mark.parametrize("mutate,message", CASES, ids=[m for _, m in CASES])
def test_a_bad_field_is_named(mutate, message, source, tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(source, folder)
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(
        MllmEdgeError, match=f"{MANIFEST_NAME} is damaged: .*{message.replace('(', '.').replace(')', '.')}"
    ):
        load_manifest(folder)
    for command in (["inspect", str(folder)], ["run", "x.png", "--bundle", str(folder)]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 1 and "is damaged" in result.stderr and "Traceback" not in result.output


def test_a_sound_manifest_loads(source):
    assert load_manifest(source).pruning["method"] == "fastv+fastervlm"
