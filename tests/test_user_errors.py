"""Bad input tried as a new user would: each gets `error: ...`, exit 1 and no traceback, or the right
result with a hint. (Issue 19's list; the image and manifest cases have files of their own.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mllm_edge.cli import app
from mllm_edge.testing.checkpoints import sample_image

runner = CliRunner()


def fails(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output + result.stderr
    assert message in result.stderr, result.stderr
    assert result.stderr.startswith("error: "), repr(result.stderr[:40])  # no blank line first
    return result


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("errors") / "scene.png"
    sample_image(300, 200, seed=1).save(path)
    return path


def test_the_image_token_in_a_prompt_is_refused_by_run_and_reference(picture, export_cache, tiny_checkpoints):
    folder = str(export_cache("llama_gqa", "none")[0])
    fails(
        ["run", str(picture), "--bundle", folder, "--prompt", "what is <image> here"],
        "contains the image token '<image>'",
    )
    fails(reference_args(picture, tiny_checkpoints, "<image> twice"), "contains the image token '<image>'")


def test_reference_refuses_a_prompt_longer_than_the_model(picture, tiny_checkpoints):
    fails(reference_args(picture, tiny_checkpoints, "word " * 3000), "the model holds 2048 positions")


def reference_args(picture, checkpoints, prompt):
    return ["reference", str(picture), "--model", str(checkpoints["llama_gqa"]), "--prompt", prompt]


def write_dataset(folder, rows):
    path = folder / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_eval_names_the_line_of_a_bad_item_and_can_skip_it(picture, export_cache, tmp_path):
    folder = str(export_cache("llama_gqa", "none")[0])
    (tmp_path / "scene.png").write_bytes(picture.read_bytes())
    rows = [
        {"image": "scene.png", "question": "What is it?", "answer": "x"},
        {"image": "missing.png", "question": "What is it?", "answer": "x"},
        {"image": "scene.png", "question": "And now?", "answer": "y"},
    ]
    dataset = write_dataset(tmp_path, rows)
    fails(["eval", "--bundle", folder, "--dataset", str(dataset)], f"{dataset}:2: image")
    result = runner.invoke(
        app, ["eval", "--bundle", folder, "--dataset", str(dataset), "--skip-bad", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["items"] == 2 and len(report["skipped"]) == 1 and f"{dataset}:2:" in report["skipped"][0]


def test_eval_refuses_a_baseline_of_another_model(export_cache, tmp_path):
    pruned = str(export_cache("llama_gqa", "fastv")[0])
    other = str(export_cache("qwen2", "none")[0])
    fails(["eval", "--bundle", pruned, "--baseline", other, "--synthetic", "1"], "is another model than")


def test_smaller_cases(picture, export_cache, tmp_path):
    folder = str(export_cache("llama_gqa", "none")[0])
    fails(
        ["run", str(picture), "--bundle", folder, "--show-pruning", str(tmp_path / "out")],
        "give it an image file extension",
    )
    fails(
        ["run", str(picture), "--bundle", folder, "--show-pruning", str(tmp_path / "out.xyz")],
        "image file extension",
    )
    fails(
        ["run", str(picture), "--bundle", folder, "--backend", "tvm"],
        "choose from auto, onnxruntime, tensorrt",
    )
    fails(["export", "--model", "./nope", "--out", str(tmp_path / "b")], "model folder ./nope does not exist")
    one = runner.invoke(app, ["run", str(picture), "--bundle", folder, "--max-new-tokens", "1"])
    assert one.exit_code == 0 and "no decode step" in one.stderr and "0.0 tokens/s" not in one.stderr
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    done = subprocess.run(
        [sys.executable, "-m", "mllm_edge.testing", str(full)], capture_output=True, text=True
    )
    assert (
        done.returncode == 1
        and "is not an empty folder" in done.stderr
        and (full / "keep.txt").read_text() == "mine"
    )


def test_usage_errors_exit_2_and_bad_input_1(picture):
    assert runner.invoke(app, ["run"]).exit_code == 2  # a missing argument: Click's usage error
    assert runner.invoke(app, ["run", str(picture), "--max-new-tokens", "x"]).exit_code == 2
    assert runner.invoke(app, ["run", str(picture), "--bundle", "/no/such/bundle"]).exit_code == 1


def test_an_empty_answer_gets_a_hint(picture, export_cache, tmp_path):
    import shutil

    from mllm_edge.manifest import load_manifest, write_manifest

    folder = tmp_path / "bundle"
    shutil.copytree(export_cache("llama_gqa", "none")[0], folder)
    first = json.loads(runner.invoke(app, ["run", str(picture), "--bundle", str(folder), "--json"]).stdout)[
        "token_ids"
    ][0]
    manifest = load_manifest(folder)
    manifest.tokenizer["eos_token_ids"] = [first]  # the model's first token now ends the answer
    write_manifest(folder, manifest)
    result = runner.invoke(app, ["run", str(picture), "--bundle", str(folder)])
    assert result.exit_code == 0 and result.stdout.strip() == "" and "the answer is empty" in result.stderr
