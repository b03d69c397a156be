"""`mllm-edge export` and `mllm-edge inspect` from the command line: summaries and clear errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

pytest.importorskip("onnxruntime", reason="export verification needs the onnxruntime extra")
pytest.importorskip("onnx", reason="export needs the export extra")

from mllm_edge.cli import app  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def cli_bundle(tmp_path_factory, tiny_checkpoints):
    out = tmp_path_factory.mktemp("cli") / "bundle"
    model = str(tiny_checkpoints["llama_gqa"])
    result = runner.invoke(
        app, ["export", "--model", model, "--out", str(out), "--method", "fastv", "--ratio", "0.5"]
    )
    return out, result


def test_export_prints_a_summary(cli_bundle):
    out, result = cli_bundle
    assert result.exit_code == 0, result.output + result.stderr
    assert (out / "manifest.json").is_file()
    text = result.stdout
    assert "image tokens 64 -> 64 into the LLM -> 32 from layer 2" in text
    assert "FLOPs" in text and "unpruned" in text
    for graph in ("vision", "embed", "llm_head", "prune", "llm_tail"):
        assert f"{graph} graph" in text
    assert "8 greedy tokens" in text and "identical" in text and "FAIL" not in text


def test_inspect_lists_graphs_and_lint(cli_bundle):
    out, _ = cli_bundle
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    for graph in ("vision", "embed", "llm_head", "prune", "llm_tail"):
        assert f"{graph} ({graph}.onnx)" in result.stdout
    assert result.stdout.count("TensorRT 10 lint: ok") == 5
    prune_ops = next(
        line for line in result.stdout.splitlines() if line.startswith("  ") and "GatherElements" in line
    )
    assert "TopK 2," in prune_ops  # the prune node ranks, then puts the kept ones back in order
    assert "past_key.0 … past_key.1" in result.stdout


def _export_error(args: list[str]):
    result = runner.invoke(app, ["export", *args])
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output + result.stderr
    return result


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "fastv", "--ratio", "1.5"], "ratio must be in [0, 1)"),
        (["--method", "fastv", "--ratio", "-0.5"], "ratio must be in [0, 1)"),
        (["--method", "fastv", "--ratio", "0.5", "--k", "4"], "1 <= K < 4"),
        (["--method", "fastv", "--ratio", "0.5", "--k", "0"], "1 <= K < 4"),
        (["--method", "pdrop"], "unknown pruning method 'pdrop'"),
        (["--ratio", "0.5"], "without a pruning method"),
        (["--dtype", "int3"], "unknown dtype 'int3'"),
        (["--quantize", "int3"], "unknown --precision 'int3' for --target onnxruntime"),
        (["--quantize", "int8", "--dtype", "fp16"], "--quantize int8 needs --dtype fp32"),
        (["--max-context", "10"], "max context must hold the 64 image tokens"),
        (["--max-context", "99999"], "stay within the model's 2048 positions"),
    ],
)
def test_bad_settings_get_a_clear_error(extra, message, tiny_checkpoints, tmp_path):
    out = tmp_path / "b"
    result = _export_error(["--model", str(tiny_checkpoints["llama_gqa"]), "--out", str(out), *extra])
    assert result.exit_code == 1 and message in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_models_and_folders_get_a_clear_error(tiny_checkpoints, tmp_path, cli_bundle):
    unsupported = tmp_path / "unsupported"
    unsupported.mkdir()
    config = json.loads((tiny_checkpoints["llama_gqa"] / "config.json").read_text())
    config["text_config"]["model_type"] = "gemma"
    (unsupported / "config.json").write_text(json.dumps(config))
    siglip = str(tiny_checkpoints["qwen2_siglip"])
    cases = [
        (["--model", str(tmp_path / "missing")], "does not exist"),
        (["--model", str(unsupported)], "language model 'gemma' is not supported"),
        (["--model", siglip, "--method", "fastervlm", "--ratio", "0.5"], "no [CLS] token"),
        (
            ["--model", str(tiny_checkpoints["llama_gqa"]), "--out", str(cli_bundle[0])],
            "already exists; pass --force",
        ),
        (
            ["--model", str(tiny_checkpoints["llama_gqa"]), "--out", str(tmp_path / "no" / "such" / "b")],
            "does not exist",
        ),
    ]
    for args, message in cases:
        if "--out" not in args:
            args = [*args, "--out", str(tmp_path / "out")]
        result = _export_error(args)
        assert result.exit_code == 1 and message in result.stderr, (args, result.stderr)
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_inspect_refuses_missing_and_damaged_bundles(tmp_path, cli_bundle):
    result = runner.invoke(app, ["inspect", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "does not exist" in result.stderr
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(cli_bundle[0], damaged)
    with open(damaged / "prune.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    result = runner.invoke(app, ["inspect", str(damaged)])
    assert result.exit_code == 1 and "prune.onnx does not match its sha256" in result.stderr
    assert "Traceback" not in result.output + result.stderr
