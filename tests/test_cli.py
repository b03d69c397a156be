"""The command line: help and version, the reference command, and clear errors for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mllm_edge import __version__
from mllm_edge.cli import app
from mllm_edge.testing.checkpoints import sample_image

runner = CliRunner()
COMMANDS = [name for name in (c.name or c.callback.__name__ for c in app.registered_commands)]


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"mllm-edge {__version__}"


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_of_every_command(command):
    result = runner.invoke(app, ([command] if command else []) + ["--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "mllm-edge"
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    sample_image().save(path)
    return path


def test_reference_answers_and_reports_kept_tokens(tiny_checkpoints, image_file):
    model = str(tiny_checkpoints["llama_gqa"])
    args = ["reference", str(image_file), "--model", model, "--max-new-tokens", "4"]
    plain = runner.invoke(app, args)
    pruned = runner.invoke(app, args + ["--method", "fastv", "--ratio", "0.5", "--k", "2"])
    assert plain.exit_code == 0, plain.output
    assert pruned.exit_code == 0, pruned.output
    assert "image tokens: 64 -> vision 64 -> llm 32" in pruned.stderr
    assert "image tokens: 64 -> vision 64 -> llm 64" in plain.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ratio", "1.5", "--method", "fastv"], "ratio must be in [0, 1)"),
        (["--ratio", "-0.1", "--method", "fastervlm"], "ratio must be in [0, 1)"),
        (["--k", "0", "--method", "fastv", "--ratio", "0.5"], "1 <= K < 4"),
        (["--k", "4", "--method", "fastv", "--ratio", "0.5"], "1 <= K < 4"),
        (["--method", "sparsevlm"], "unknown pruning method 'sparsevlm'"),
    ],
)
def test_bad_settings_get_a_clear_error(tiny_checkpoints, image_file, extra, message):
    result = runner.invoke(
        app, ["reference", str(image_file), "--model", str(tiny_checkpoints["llama_gqa"]), *extra]
    )
    assert result.exit_code == 1
    assert message in result.stderr
    assert "Traceback" not in result.output + result.stderr


def test_bad_model_and_image_get_a_clear_error(tiny_checkpoints, image_file, tmp_path):
    unsupported = tmp_path / "unsupported"
    unsupported.mkdir()
    config = json.loads((tiny_checkpoints["llama_gqa"] / "config.json").read_text())
    config["text_config"]["model_type"] = "gemma"
    (unsupported / "config.json").write_text(json.dumps(config))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image at all")
    model = str(tiny_checkpoints["llama_gqa"])
    cases = [
        ([str(image_file), "--model", str(tmp_path / "missing")], "does not exist"),
        ([str(image_file), "--model", str(unsupported)], "language model 'gemma' is not supported"),
        ([str(tmp_path / "missing.jpg"), "--model", model], "missing.jpg does not exist"),
        ([str(empty), "--model", model], "is empty"),
        ([str(corrupt), "--model", model], "cannot be read"),
        ([str(tmp_path), "--model", model], "is a folder, not an image file"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["reference", *args])
        assert result.exit_code == 1, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.output + result.stderr
