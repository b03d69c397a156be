"""Checkpoint loading: key layouts, weight formats, RoPE kinds, and clear errors for bad checkpoints."""

import json
import shutil

import pytest
import torch
from helpers import our_model

from mllm_edge.errors import MllmEdgeError, UnsupportedModelError
from mllm_edge.models import load_llava, load_llava_spec
from mllm_edge.models.checkpoint import resolve_checkpoint
from mllm_edge.models.families.llava import canonical_key
from mllm_edge.models.rope import RotaryEmbedding


@pytest.mark.parametrize(
    "key, expected",
    [
        ("language_model.model.layers.3.mlp.up_proj.weight", "decoder.layers.3.mlp.up_proj.weight"),
        ("model.language_model.layers.3.mlp.up_proj.weight", "decoder.layers.3.mlp.up_proj.weight"),
        ("language_model.lm_head.weight", "decoder.lm_head.weight"),
        ("lm_head.weight", "decoder.lm_head.weight"),
        (
            "vision_tower.vision_model.encoder.layers.0.layer_norm1.weight",
            "vision.encoder.layers.0.layer_norm1.weight",
        ),
        ("vision_tower.encoder.layers.0.layer_norm1.weight", "vision.encoder.layers.0.layer_norm1.weight"),
        ("model.vision_tower.embeddings.class_embedding", "vision.embeddings.class_embedding"),
        ("multi_modal_projector.linear_1.bias", "projector.linear_1.bias"),
        ("model.multi_modal_projector.linear_1.bias", "projector.linear_1.bias"),
    ],
)
def test_canonical_key_maps_every_layout_and_is_idempotent(key, expected):
    assert canonical_key(key) == expected
    assert canonical_key(expected) == expected


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_bin_and_sharded_checkpoints_load_the_same_weights(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file

    src = tiny_checkpoints["llama_gqa"]
    reference = our_model(src).state_dict()
    state = load_file(str(src / "model.safetensors"))
    # Old llava-hf naming in a pytorch_model.bin, loaded with weights_only=True.
    old_names = {
        k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k: v
        for k, v in state.items()
    }
    as_bin = copy_checkpoint(src, tmp_path / "bin")
    (as_bin / "model.safetensors").unlink()
    torch.save(old_names, as_bin / "pytorch_model.bin")
    # Two safetensors shards with an index, as large checkpoints come.
    from safetensors.torch import save_file

    sharded = copy_checkpoint(src, tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for file, names in halves.items():
        save_file({k: state[k] for k in names}, str(sharded / file))
    index = {"weight_map": {k: f for f, names in halves.items() for k in names}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    for folder in (as_bin, sharded):
        loaded = load_llava(folder).state_dict()
        assert loaded.keys() == reference.keys()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_unused_vision_layers_are_not_loaded(tiny_checkpoints):
    llava = our_model(tiny_checkpoints["llama_mha"])
    spec = load_llava_spec(tiny_checkpoints["llama_mha"])
    raw = json.loads((tiny_checkpoints["llama_mha"] / "config.json").read_text())
    assert spec.vision.num_layers == raw["vision_config"]["num_hidden_layers"] - 1  # feature layer -2
    assert len(llava.vision.encoder.layers) == spec.vision.num_layers


def test_truncated_or_misshapen_weights_get_a_clear_error(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    truncated = copy_checkpoint(tiny_checkpoints["llama_gqa"], tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MllmEdgeError, match="cannot be read"):
        load_llava(truncated)
    misshapen = copy_checkpoint(tiny_checkpoints["llama_gqa"], tmp_path / "misshapen")
    state = load_file(str(misshapen / "model.safetensors"))
    state["language_model.model.norm.weight"] = torch.ones(3)
    save_file(state, str(misshapen / "model.safetensors"))
    with pytest.raises(MllmEdgeError, match="does not match its config"):
        load_llava(misshapen)


def test_missing_weight_is_named(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = copy_checkpoint(tiny_checkpoints["llama_gqa"], tmp_path / "broken")
    state = load_file(str(broken / "model.safetensors"))
    del state["language_model.model.norm.weight"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(MllmEdgeError, match="decoder.norm.weight"):
        load_llava(broken)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda c: c["text_config"].update(model_type="gemma"),
            "language model 'gemma' is not supported",
        ),
        (lambda c: c["vision_config"].update(model_type="dinov2"), "vision tower 'dinov2' is not supported"),
        (lambda c: c.update(model_type="idefics3"), "model type 'idefics3' is not supported"),
        (lambda c: c.update(vision_feature_select_strategy="full"), "only 'default'"),
        (
            lambda c: c["text_config"].update(
                rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
            ),
            "RoPE type 'dynamic'",
        ),
    ],
)
def test_unsupported_architectures_get_a_clear_error(tiny_checkpoints, tmp_path, edit, message):
    folder = copy_checkpoint(tiny_checkpoints["llama_gqa"], tmp_path / "ck")
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=message):
        load_llava_spec(folder)


def test_missing_folder_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(MllmEdgeError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere" / "model")
    with pytest.raises(MllmEdgeError, match="not a Hugging Face checkpoint folder"):
        load_llava_spec(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MllmEdgeError, match="cannot get 'llava-hf/no-such-model'"):
        resolve_checkpoint("llava-hf/no-such-model")


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "default", "rope_theta": 1000000.0},
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 500000.0,
        },
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    ],
)
def test_rope_tables_match_transformers(rope):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from mllm_edge.models.config import text_spec

    hf_config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, max_position_embeddings=256, rope_parameters=dict(rope)
    )
    positions = torch.tensor([[0, 1, 5, 63, 64, 200, 255]])
    x = torch.zeros(1, 7, 16)
    hf_cos, hf_sin = LlamaRotaryEmbedding(hf_config)(x, positions)
    cos, sin = RotaryEmbedding(text_spec(hf_config))(positions, torch.float32)
    torch.testing.assert_close(cos[:, :, 0], hf_cos, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin[:, :, 0], hf_sin, rtol=1e-6, atol=1e-6)
