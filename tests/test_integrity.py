"""Verified-state records: a bundle is hashed in full once, then only files that changed are re-read."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from typer.testing import CliRunner

from mllm_edge import integrity
from mllm_edge.cli import app
from mllm_edge.errors import MllmEdgeError
from mllm_edge.manifest import load_manifest, verify_bundle_files


@pytest.fixture
def bundle(export_cache, tmp_path, monkeypatch):
    """A copy of a bundle whose files were written long enough ago to be trusted, and a hash counter."""
    source, _ = export_cache("llama_gqa", "none")
    folder = tmp_path / "bundle"
    shutil.copytree(source, folder)
    old = time.time() - 3600
    for path in folder.rglob("*"):
        os.utime(path, (old, old))
    monkeypatch.setenv("MLLM_EDGE_CACHE", str(tmp_path / "cache"))
    hashed = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda path, *a: hashed.append(path.name) or real(path, *a))
    return folder, hashed


def test_unchanged_files_are_not_read_again(bundle):
    folder, hashed = bundle
    manifest = load_manifest(folder)
    assert len(hashed) == len(manifest.files)
    hashed.clear()
    load_manifest(folder)
    assert hashed == []  # sizes, times and inodes as recorded: nothing re-read
    verify_bundle_files(folder, manifest, full=True)
    assert len(hashed) == len(manifest.files)  # `verify` reads everything


def test_a_changed_file_is_read_again_and_damage_found(bundle):
    folder, hashed = bundle
    manifest = load_manifest(folder)
    hashed.clear()
    data = folder / manifest.graphs["llm_tail"].data_files[0]
    damaged = bytearray(data.read_bytes())
    damaged[0] ^= 1
    data.write_bytes(bytes(damaged))  # same size, new time
    with pytest.raises(MllmEdgeError, match="llm_tail.onnx.data does not match its sha256"):
        load_manifest(folder)
    assert hashed == ["llm_tail.onnx.data"]
    with pytest.raises(MllmEdgeError, match="does not match"):  # still refused: the record forgot it
        load_manifest(folder)


def test_a_file_written_just_now_is_not_trusted_yet(bundle):
    """File times are coarse: a file changed within the last moments could change again unseen."""
    folder, hashed = bundle
    manifest = load_manifest(folder)
    os.utime(folder / manifest.graphs["embed"].file)  # now
    load_manifest(folder)
    hashed.clear()
    load_manifest(folder)
    assert hashed == ["embed.onnx"]


def test_an_unwritable_cache_only_means_hashing_every_time(bundle, tmp_path, monkeypatch):
    folder, hashed = bundle
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("MLLM_EDGE_CACHE", str(blocker))
    manifest = load_manifest(folder)
    load_manifest(folder)
    assert len(hashed) == 2 * len(manifest.files)


def test_verify_command_checks_everything_and_names_damage(bundle):
    folder, hashed = bundle
    result = CliRunner().invoke(app, ["verify", str(folder)])
    assert result.exit_code == 0 and "match their sha256" in result.stdout, result.output
    (folder / "tokenizer" / "tokenizer.json").write_text("{}")
    result = CliRunner().invoke(app, ["verify", str(folder)])
    assert result.exit_code == 1 and "tokenizer/tokenizer.json does not match its sha256" in result.stderr
