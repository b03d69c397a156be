"""Shared fixtures: tiny random LLaVA checkpoints, built once per test session."""

from __future__ import annotations

import os

# Tests never touch the network: set before anything imports huggingface_hub / transformers,
# which read these once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from mllm_edge.testing.checkpoints import FIXTURE_SPECS, make_tiny_llava  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Every checkpoint of FIXTURE_SPECS, by name, as folders in the llava-hf Hub layout."""
    pytest.importorskip("transformers", reason="building checkpoints needs the 'export' extra")
    root = tmp_path_factory.mktemp("tiny_llava")
    return {name: make_tiny_llava(root / name, spec) for name, spec in FIXTURE_SPECS.items()}


@pytest.fixture(scope="session", params=list(FIXTURE_SPECS), ids=list(FIXTURE_SPECS))
def tiny_checkpoint(request, tiny_checkpoints) -> tuple[str, Path]:
    """One checkpoint per test instance: (name, folder), over every entry of FIXTURE_SPECS."""
    return request.param, tiny_checkpoints[request.param]
