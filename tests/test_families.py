"""Model families are found by registry: adding one is adding a module to models/families."""

from __future__ import annotations

from pathlib import Path

import pytest

from mllm_edge.errors import MllmEdgeError, UnsupportedModelError
from mllm_edge.models import families
from mllm_edge.models.families import ModelFamily, TextFamily, VisionFamily


def test_the_shipped_families_are_found():
    assert families.supported(TextFamily) == ["llama", "mistral", "qwen2"]
    assert families.supported(VisionFamily) == ["clip_vision_model", "siglip_vision_model"]
    assert families.supported(ModelFamily) == ["llava", "llava_next"]
    with pytest.raises(UnsupportedModelError, match="language model 'gemma' is not supported"):
        families.text_family("gemma")


def test_a_new_module_is_a_new_family(monkeypatch):
    """No branch to edit: a module with a FAMILY in the folder is looked up like the others."""
    probe = Path(families.__file__).parent / "_probe_family.py"
    probe.write_text(
        'from . import TextFamily\n\nFAMILY = TextFamily("probe", lambda cfg: ("spec of", cfg))\n'
    )
    monkeypatch.setattr(families, "_REGISTRY", None)
    try:
        assert families.text_family("probe").spec("cfg") == ("spec of", "cfg")
    finally:
        probe.unlink()
        families._REGISTRY = None
    with pytest.raises(UnsupportedModelError):
        families.text_family("probe")


def test_each_text_family_gives_its_own_bias_rules(tiny_checkpoints):
    """The rules that were branches before: Qwen2's q/k/v bias without an output or MLP bias."""
    from mllm_edge.models.config import load_llava_spec

    qwen = load_llava_spec(tiny_checkpoints["qwen2"]).text
    llama = load_llava_spec(tiny_checkpoints["llama_gqa"]).text
    assert (qwen.arch, qwen.attention_bias, qwen.mlp_bias, qwen.o_proj_bias) == ("qwen2", True, False, False)
    assert llama.arch == "llama" and llama.o_proj_bias == llama.attention_bias


def test_mistral_keeps_every_context_within_its_sliding_window(tiny_checkpoints, tmp_path):
    """Within the window full causal attention is what Mistral computes, so a bundle may hold at most
    `sliding_window` positions: the default max context and export's check follow it, with a message
    that names the window; a window that is not a positive count is refused."""
    import json

    from mllm_edge.models.config import load_llava_spec
    from mllm_edge.testing.checkpoints import FIXTURE_SPECS

    spec = load_llava_spec(tiny_checkpoints["mistral"])
    window = FIXTURE_SPECS["mistral"].sliding_window
    assert window < spec.text.max_position_embeddings
    assert (spec.text.arch, spec.text.sliding_window, spec.text.max_context) == ("mistral", window, window)
    assert (spec.text.attention_bias, spec.text.mlp_bias, spec.text.o_proj_bias) == (False, False, False)
    assert spec.check_max_context(None) == window
    assert spec.check_max_context(window) == window
    with pytest.raises(MllmEdgeError, match=f"sliding window of {window} tokens"):
        spec.check_max_context(window + 1)

    config = json.loads((tiny_checkpoints["mistral"] / "config.json").read_text())
    for value, allowed in ((None, True), (10**6, True), (0, False), ("all", False)):
        folder = tmp_path / str(value)
        folder.mkdir()
        config["text_config"]["sliding_window"] = value
        (folder / "config.json").write_text(json.dumps(config))
        if allowed:
            text = load_llava_spec(folder).text
            assert text.max_context == text.max_position_embeddings
        else:
            with pytest.raises(UnsupportedModelError, match="sliding_window"):
                load_llava_spec(folder)
