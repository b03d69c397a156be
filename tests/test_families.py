"""Model families are found by registry: adding one is adding a module to models/families."""

from __future__ import annotations

from pathlib import Path

import pytest

from mllm_edge.errors import UnsupportedModelError
from mllm_edge.models import families
from mllm_edge.models.families import ModelFamily, TextFamily, VisionFamily


def test_the_shipped_families_are_found():
    assert families.supported(TextFamily) == ["llama", "qwen2"]
    assert families.supported(VisionFamily) == ["clip_vision_model", "siglip_vision_model"]
    assert families.supported(ModelFamily) == ["llava"]
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
