"""Shared fixtures: tiny random LLaVA checkpoints, built once per test session."""

from __future__ import annotations

import functools
import os

# Tests never touch the network: set before anything imports huggingface_hub / transformers,
# which read these once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Verified-state records (mllm_edge.integrity) go to a folder of this test session, not the user's cache.
os.environ["MLLM_EDGE_CACHE"] = __import__("tempfile").mkdtemp(prefix="mllm-edge-cache-")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from mllm_edge.testing.checkpoints import FIXTURE_SPECS, make_tiny_llava  # noqa: E402

try:  # tests/test_fuzz.py: CI runs the same examples every time, so a red CI is a real regression
    from hypothesis import settings

    settings.register_profile("ci", max_examples=40, derandomize=True, deadline=None, print_blob=True)
    settings.register_profile("explore", max_examples=400, deadline=None, print_blob=True)  # new ones
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:
    pass


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


RATIO = 0.5  # the pruning ratio of the cached bundles


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory, tiny_checkpoints):
    """Bundles exported once per session: (fixture, method, dtype, ratio) -> (folder, report)."""
    pytest.importorskip("onnxruntime", reason="verifying exports needs the onnxruntime extra")
    from mllm_edge.export.bundle import ExportConfig, export_bundle
    from mllm_edge.pruning import PruningConfig

    root = tmp_path_factory.mktemp("bundles")

    @functools.cache
    def export(name: str, method: str, dtype: str, ratio: float):
        out = root / f"{name}-{method}-{dtype}-{ratio}"
        pruning = PruningConfig.from_method(method, 0.0 if method == "none" else ratio)
        report = export_bundle(ExportConfig(str(tiny_checkpoints[name]), out, pruning, dtype))
        return out, report

    def get(name: str, method: str, dtype: str = "fp32", ratio: float = RATIO):
        return export(name, method, dtype, ratio)  # one cache key however the caller spells it

    return get
